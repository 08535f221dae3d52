"""User module files, TFX-style: a `preprocessing_fn`, a `model_fn` or a
Keras model builder that a config names by path.

One loader for every stage, so a module is imported once per process under
one name and a broken module is reported the same way everywhere.
"""

import hashlib
import importlib.util
import os
import sys

from pipeline.errors import ConfigError, UserError


def _module_name(path):
  # Two module files of the same base name (a transform and a model module
  # both called `module.py`) must not share an entry in sys.modules.
  digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
  stem = os.path.splitext(os.path.basename(path))[0]
  return f'estpipe_user_{stem}_{digest}'


def load_module(path, key):
  """Imports the module file at `path`; `key` is the config key naming it."""
  name = _module_name(path)
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise ConfigError(key, f'cannot import {path}')
  module = importlib.util.module_from_spec(spec)
  # tf.function's autograph resolves the module's globals through
  # sys.modules, so it must be registered before it runs.
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    del sys.modules[name]
    raise UserError(f'{path}: importing the module ({key}) failed: '
                    f'{type(e).__name__}: {e}') from e
  return module


def load_function(path, key, name, expected):
  """`name` from the module at `path`; UserError saying what was expected."""
  fn = getattr(load_module(path, key), name, None)
  if not callable(fn):
    raise UserError(f'{path} defines no {name}: expected {expected}')
  return fn
