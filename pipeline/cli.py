"""The `estpipe` command line.

Every stage command takes the pipeline config and any number of
`--set key.path=value` overrides; the stage packages add their own commands
through a `commands.register(subparsers)` function, so this file stays a
dispatcher. Those modules import `pipeline/args.py` and `pipeline/errors.py`,
never this file: the command line sits above every stage, and only it turns
a UserError or ConfigError into one `estpipe: ...` line.
"""

import argparse
import errno
import importlib
import logging
import sys

from pipeline.errors import ConfigError, UserError

# Stage packages that contribute subcommands, in the order --help lists them.
_COMMAND_MODULES = ('preprocessing.commands', 'estimators.commands',
                    'serving.commands', 'pipeline.commands')


def build_parser():
  parser = argparse.ArgumentParser(
      prog='estpipe',
      description='Estimator pipelines: preprocess, train, export, serve.')
  parser.add_argument('-v', '--verbose', action='store_true',
                      help='show TensorFlow and Beam logs')
  subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
  subparsers.required = True
  for name in _COMMAND_MODULES:
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name:
        raise
      continue
    module.register(subparsers)
  return parser


def main(argv=None):
  _quiet_imports(argv if argv is not None else sys.argv[1:])
  parser = build_parser()
  # Stage commands pass unknown flags through (Beam pipeline options).
  args, extra = parser.parse_known_args(argv)
  if extra and not getattr(args, 'accepts_extra', False):
    parser.error(f'unrecognized arguments: {" ".join(extra)}')
  args.extra = extra
  _setup_logging(args.verbose)
  try:
    return args.func(args) or 0
  except ConfigError as e:
    print(f'estpipe: config error: {e}', file=sys.stderr)
    return 2
  except UserError as e:
    print(f'estpipe: error: {e}', file=sys.stderr)
    return e.exit_code
  except OSError as e:
    if e.errno not in _ACCESS_ERRORS or not e.filename:
      raise
    # An unwritable run_dir (or input, output): the path, not a traceback.
    print(f'estpipe: error: cannot access {e.filename}: {e.strerror}',
          file=sys.stderr)
    return 1


# Permission denied, operation not permitted, read-only file system.
_ACCESS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _quiet_imports(argv):
  # TensorFlow prints C++ start-up noise (CUDA factories, CPU features) when
  # it is imported; decide before anything imports it.
  import os  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top
  if '-v' not in argv and '--verbose' not in argv:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    warnings.filterwarnings('ignore', category=FutureWarning)
    warnings.filterwarnings('ignore', category=DeprecationWarning)


def _setup_logging(verbose):
  logging.basicConfig(
      level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
      datefmt='%H:%M:%S')
  if not verbose:
    for noisy in ('apache_beam', 'tensorflow', 'absl', 'root'):
      logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.getLogger('estpipe').setLevel(logging.INFO)


def run():
  """The console entry point.

  Exits without tearing the interpreter down: Beam's loopback workers and
  TensorFlow leave gRPC threads running, and finalizing under them can abort
  the process (SIGABRT) after a job that succeeded.
  """
  import os  # pylint: disable=g-import-not-at-top
  import traceback  # pylint: disable=g-import-not-at-top
  try:
    code = main()
  except SystemExit as e:  # argparse's usage errors, --help
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == '__main__':
  run()
