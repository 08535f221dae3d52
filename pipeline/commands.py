"""Pipeline-level commands: `generate-data` and the end-to-end `run`."""

import logging

from pipeline import args as args_lib
from pipeline import runs
from pipeline.errors import UserError, rejects_message

_log = logging.getLogger('estpipe')

# The stages `estpipe run` chains, in order; each is also its own command,
# whose package registers its runner (pipeline/args.py).
RUN_STAGES = ('preprocess', 'train', 'evaluate', 'export', 'verify-export')


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
      description='Run the whole pipeline for a config, recording it in '
      'RUN_DIR/run.json and each stage\'s log in RUN_DIR/logs/. A re-run '
      'skips every stage whose inputs, config and upstream outputs are '
      'unchanged and whose outputs are complete. Unknown flags are Beam '
      'pipeline options for the Beam stages.')
  args_lib.add_config_args(run)
  run.add_argument('--force', choices=RUN_STAGES, metavar='STAGE',
                   help='redo this stage and every one after it (train: '
                   'start the model afresh); one of ' + ', '.join(RUN_STAGES))
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
  stages = []
  for name in RUN_STAGES:
    declared = args_lib.declared_stage(name)
    if declared is None:
      _log.warning('stage %s is not installed; stopping after the stages '
                   'before it', name)
      break
    stages.append(declared)
  command = {'config_file': config.source, 'overrides': args.overrides,
             'force': args.force}
  record = runs.Run(config, stages, args.extra, args.verbose, args.force,
                    command).run()
  _log.info('run complete: %s (%s)', _summary(record),
            config.rundir.run_record)
  message = _rejects(record, config)
  if message:
    _log.info('%s', message)
  return 0


def _rejects(record, config):
  """Where preprocessing's rejects are, when it rejected rows."""
  for stage in record['stages']:
    splits = (stage.get('outputs') or {}).get('splits')
    if stage['name'] == 'preprocess' and splits:
      return rejects_message(sum(c['read'] for c in splits.values()),
                             sum(c['rejected'] for c in splits.values()),
                             config.rundir.rejects)
  return None


def _summary(record):
  done = [s['name'] for s in record['stages'] if s['status'] == runs.SUCCEEDED]
  parts = [f'ran {", ".join(done)}' if done else 'every stage skipped']
  if record.get('export_version') is not None:
    parts.append(f'export version {record["export_version"]}')
  return '; '.join(parts)
