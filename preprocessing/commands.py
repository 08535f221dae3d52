"""The `preprocess` subcommand and stage, and `estpipe jobs` (Beam jobs on a
job service)."""

import json

from pipeline import args as args_lib
from pipeline import fs
from pipeline import quiet
from pipeline import runrecord
from pipeline.errors import UserError

# What preprocessing's outputs depend on besides its input files.
SECTIONS = ('data', 'features', 'label', 'preprocessing')


def register(subparsers):
  parser = subparsers.add_parser(
      'preprocess', help='raw data -> tf.Transform -> TFRecords',
      description='Analyze the training split with tf.Transform and write '
      'transformed TFRecords for every split. Unknown flags are Beam '
      'pipeline options (--runner, --direct_num_workers, ...).')
  args_lib.add_config_args(parser)
  args_lib.add_detach(parser)
  parser.set_defaults(func=_preprocess, accepts_extra=True)
  args_lib.register_stage('preprocess', run_stage, sections=SECTIONS,
                          inputs=input_files, complete=outputs, beam=True)
  _add_jobs(subparsers)


def run_stage(config, beam_args=(), verbose=False, detach=False):
  from preprocessing import run  # pylint: disable=g-import-not-at-top
  quiet.quiet_tensorflow(verbose)
  try:
    summary = run.preprocess(config, beam_args, detach=detach)
  except FileNotFoundError as e:
    raise UserError(str(e))
  if 'submitted' in summary:
    print('\n'.join(summary['submitted']))
  else:
    print(json.dumps(summary['splits'], sort_keys=True))
  return summary


def input_files(config):
  """The raw data files and the user module that preprocessing reads."""
  files = fs.expand_patterns(config.data.train_patterns, 'data.train')
  if config.data.eval_patterns:
    files += fs.expand_patterns(config.data.eval_patterns, 'data.eval')
  if config.preprocessing.module:
    files.append(config.preprocessing.module)
  return files


def outputs(config):
  """The published summary and row counts; None until preprocess.json is."""
  layout = config.rundir
  if not layout.is_preprocessed():
    return None
  summary = runrecord.read_json(layout.preprocess_summary)
  return {'summary': layout.preprocess_summary, 'transform': layout.transform,
          'data': layout.data, 'splits': summary.get('splits')}


def _preprocess(args):
  run_stage(args_lib.config_from_args(args), args.extra, args.verbose,
            args.detach)


def _add_jobs(subparsers):
  parser = subparsers.add_parser(
      'jobs', help='list, follow and cancel jobs on a Beam job service',
      description='Jobs on a Beam job service (the portable runner\'s, '
      'Flink\'s, Spark\'s), through Beam\'s job API.')
  actions = parser.add_subparsers(dest='action', metavar='ACTION')
  actions.required = True
  for name, func, help_text in (
      ('list', _jobs_list, 'every job: id, state, and the staging folder '
       '(estpipe jobs) or name'),
      ('status', _jobs_status, 'the job\'s state (last line)'),
      ('logs', _jobs_logs, 'the job\'s messages and state changes, until '
       'it ends'),
      ('cancel', _jobs_cancel, 'cancel the job; it publishes nothing')):
    action = actions.add_parser(name, help=help_text)
    if name != 'list':
      action.add_argument('job_id')
    action.add_argument('--job_endpoint', required=True,
                        metavar='HOST:PORT', help='the Beam job service')
    action.set_defaults(func=func)


def _job_service(args):
  from preprocessing import jobs  # pylint: disable=g-import-not-at-top
  return jobs.JobService(args.job_endpoint)


def _jobs_list(args):
  from preprocessing import jobs  # pylint: disable=g-import-not-at-top
  service = _job_service(args)
  for info in service.jobs():
    print(info.job_id, jobs.state_name(info.state),
          jobs.staging_of(info) or info.job_name)


def _jobs_status(args):
  print(_job_service(args).state(args.job_id))


def _jobs_logs(args):
  for line in _job_service(args).messages(args.job_id):
    print(line, flush=True)


def _jobs_cancel(args):
  print(_job_service(args).cancel(args.job_id))
