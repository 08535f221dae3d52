"""What shaped a model, kept next to its checkpoints.

A checkpoint restores only into the model that wrote it: another model type,
other layers, other features, transforms or label make TensorFlow fail deep
in the restore with a traceback. Training therefore records the config that
shaped the model when it starts one (RUN_DIR/model/estpipe_model.json) and
compares it when it resumes, so a change fails first, with what changed.
"""

import re

import tensorflow as tf

from pipeline import fs
from pipeline import runrecord
from pipeline.errors import UserError

# How many changes the error lists before "and N more".
_SHOWN = 3
AFRESH = ('`estpipe run CONFIG --force train` (or a new run_dir) starts the '
          'model afresh')


def shaping(config):
  """The config that decides a model's variables, as flat key paths.

  Keys are written as `--set` takes them (`features.age.transform`).
  """
  tree = config.to_dict()
  flat = {}
  _flatten('model', tree['model'], flat)
  _flatten('label', tree['label'], flat)
  for feature in tree['features']:
    name = feature.pop('name')
    _flatten(f'features.{name}', feature, flat)
  if config.model.module:
    flat['model.module (content)'] = fs.sha256(config.model.module)
  return flat


def _flatten(prefix, value, out):
  if isinstance(value, dict):
    for key, item in value.items():
      _flatten(f'{prefix}.{key}', item, out)
  else:
    out[prefix] = value


def check_or_record(config, resuming):
  """Records the shaping of a model that starts now; checks a resumed one.

  Raises UserError naming what changed when the checkpoints in
  RUN_DIR/model were written by a model shaped otherwise. Checkpoints from
  before these records are left to TensorFlow (see restore_error).
  """
  path = config.rundir.model_record
  current = shaping(config)
  if not resuming:
    runrecord.write_json(path, current)
    return
  if not fs.exists(path):
    return
  changes = differences(runrecord.read_json(path), current)
  if changes:
    shown = '; '.join(changes[:_SHOWN])
    if len(changes) > _SHOWN:
      shown += f'; and {len(changes) - _SHOWN} more'
    raise UserError(f'{config.rundir.model} holds checkpoints of another '
                    f'model ({shown}): {AFRESH}')


def differences(before, now):
  """['key: old -> new', ...] for every key path whose value changed."""
  changes = []
  for key in sorted(set(before) | set(now)):
    if before.get(key) != now.get(key):
      changes.append(f'{key}: {_show(before.get(key))} -> '
                     f'{_show(now.get(key))}')
  return changes


def _show(value):
  if isinstance(value, str) and len(value) == 64:
    return value[:8]  # a content hash
  return 'unset' if value is None else str(value)


# TensorFlow's words for checkpoint values that do not fit the graph: a
# variable the checkpoint lacks, or one of another shape (found at restore,
# or at the first op that uses it).
_RESTORE_ERRORS = re.compile(r'not found in checkpoint|Assign requires shapes|'
                             r'shapes? (do not|mismatch)|size-incompatible',
                             re.I)


def restore_error(config, error):
  """A UserError for a TF error that says the checkpoints do not fit, or None.

  Only meaningful while resuming from checkpoints: the safety net for
  checkpoints that have no shaping record.
  """
  if not isinstance(error, (tf.errors.NotFoundError,
                            tf.errors.InvalidArgumentError)):
    return None
  message = getattr(error, 'message', str(error))
  match = _RESTORE_ERRORS.search(message)
  if not match:
    return None
  line = next(l for l in message.splitlines() if match.group(0) in l)
  return UserError(f'the checkpoints in {config.rundir.model} do not fit '
                   f'this model ({line.strip()[:300]}): {AFRESH}')
