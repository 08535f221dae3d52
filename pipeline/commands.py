"""Pipeline-level commands: `generate-data` and the end-to-end `run`."""

import logging

from pipeline import args as args_lib
from pipeline import rundir
from pipeline.errors import UserError

_log = logging.getLogger('estpipe')

# The stages `estpipe run` chains, in order; each is also its own command,
# whose package registers its runner (pipeline/args.py).
RUN_STAGES = ('preprocess', 'train', 'export')


def register(subparsers):
  gen = subparsers.add_parser(
      'generate-data', help='write the built-in synthetic data set',
      description='Write a deterministic, census-like synthetic CSV data set '
      '(numeric, categorical and text columns, a learnable label).')
  gen.add_argument('--rows', type=int, default=20000)
  gen.add_argument('--out', default='runs/synthetic-data')
  gen.add_argument('--seed', type=int, default=0)
  gen.add_argument('--shards', type=int, default=1,
                   help='number of CSV files (parallel reads)')
  gen.set_defaults(func=_generate)

  run = subparsers.add_parser(
      'run', help='run every stage: ' + ' -> '.join(RUN_STAGES),
      description='Run the whole pipeline for a config. Unknown flags are '
      'Beam pipeline options for the preprocessing job.')
  args_lib.add_config_args(run)
  run.set_defaults(func=_run, accepts_extra=True)


def _generate(args):
  from pipeline import synthetic  # pylint: disable=g-import-not-at-top
  if args.rows < 1 or args.shards < 1:
    raise UserError('--rows and --shards must be >= 1')
  paths = synthetic.write_csv(args.out, args.rows, seed=args.seed,
                              shards=args.shards)
  print(f'wrote {args.rows} rows to {", ".join(paths)}')


def _run(args):
  config = args_lib.config_from_args(args)
  before = _versions(config)
  for stage in RUN_STAGES:
    if stage == 'export' and _versions(config) - before:
      # The EvalSpec's exporters already wrote this training's model.
      _log.info('=== export: done by the training exporters (%s)',
                ', '.join(config.export.exporters))
      continue
    runner = args_lib.stage(stage)
    if runner is None:
      _log.warning('stage %s is not installed; stopping after the stages '
                   'before it', stage)
      break
    _log.info('=== %s', stage)
    runner(config, args.extra if stage == 'preprocess' else (), args.verbose)
  return 0


def _versions(config):
  return set(rundir.list_versions(config.rundir.export))
