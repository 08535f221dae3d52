"""What the stage commands share: config arguments and the stage registry.

The command line (`pipeline/cli.py`) loads each stage package's
`commands.py`; those import this module, never the command line itself, so
the stages stay below it. Each stage command module also registers the
function that runs its stage, with what `estpipe run` needs to know to skip
it (pipeline/runs.py), and `estpipe run` chains them in order.
"""

import os

from pipeline import fs
from pipeline import rundir
from pipeline import runs
from pipeline.config import load_config
from pipeline.errors import UserError

# name -> runs.Stage, in registration order.
_STAGES = {}


def add_config_args(parser):
  """The arguments every config-driven command takes."""
  parser.add_argument('config', help='pipeline config (YAML)')
  parser.add_argument('--set', dest='overrides', action='append', default=[],
                      metavar='KEY.PATH=VALUE',
                      help='override a config value, e.g. --set '
                      'train.steps=200 (repeatable)')


def add_detach(parser):
  """--detach: submit the Beam job and return (its id on the last line)."""
  parser.add_argument('--detach', action='store_true',
                      help='submit the job to its runner (a job service, '
                      'Dataflow) and return; the job id is the last line '
                      'of the output (see `estpipe jobs`)')


def config_from_args(args):
  return load_config(args.config, args.overrides)


def register_stage(name, fn, **declaration):
  """Makes `fn(config, beam_args, verbose)` the runner of stage `name`.

  `declaration`: the config sections, inputs and completeness check that
  let `estpipe run` skip the stage (see runs.Stage).
  """
  _STAGES[name] = runs.Stage(name, fn, **declaration)


def declared_stage(name):
  """Stage `name` as declared (runs.Stage), or None when not installed."""
  return _STAGES.get(name)


def add_export_choice(parser):
  """--version V | --export_path DIR: which SavedModel a command reads."""
  group = parser.add_mutually_exclusive_group()
  group.add_argument('--version', type=int, default=None,
                     help='export version under RUN_DIR/export (default: the '
                     'newest)')
  group.add_argument('--export_path', default=None,
                     help='a SavedModel folder anywhere')


def chosen_export(config, args):
  """The SavedModel folder that add_export_choice's flags name."""
  if args.export_path:
    if not fs.exists(os.path.join(args.export_path, 'saved_model.pb')):
      raise UserError(f'{args.export_path} is not a SavedModel folder')
    return fs.abspath(args.export_path)
  try:
    return rundir.version_dir(config.rundir.export, args.version)
  except FileNotFoundError as e:
    raise UserError(f'{e}: run `estpipe train` or `estpipe export` first')
