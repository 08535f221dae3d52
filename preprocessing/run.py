"""`estpipe preprocess`: check the options, submit the job, wait or detach.

The job publishes its own outputs as its last step (preprocessing/publish.py),
so waiting for it only reports: the outcome is its history line.
"""

import json
import logging

from pipeline import errors
from pipeline import fs
from pipeline import runrecord
from preprocessing import beam_pipeline
from preprocessing import publish
from preprocessing import runners

_log = logging.getLogger('estpipe')


def preprocess(config, beam_args=(), detach=False):
  """Runs preprocessing for `config`; returns the summary dict.

  Outputs appear only when the job succeeded: until then they live in a
  staging folder, and preprocess.json (the completeness marker) comes last.
  A job that estpipe does not wait for (--detach, a Dataflow job build)
  returns {'submitted': lines saying where, 'job_id': id or None}.
  """
  options = runners.pipeline_options(beam_args)
  target = runners.check(options, detach, _worker_paths(config))
  fs.makedirs(config.run_dir)
  if not target.waits:
    return _submit_detached(config, options, target)
  runrecord.append_history(config.run_dir, publish.STAGE, 'started')
  with runrecord.staging_dir(config.run_dir, publish.STAGE) as stage:
    try:
      beam_pipeline.submit(config, stage, runners.with_staging(
          options, stage)).wait_until_finish()
    except Exception as e:
      _raise_outcome(config, stage, e)
  summary = _outcome(config, stage)
  _log_summary(summary, config.rundir.rejects)
  return summary


def _worker_paths(config):
  paths = {'run_dir': config.run_dir}
  for i, pattern in enumerate(config.data.train_patterns +
                              config.data.eval_patterns):
    paths[f'data input {i + 1}'] = pattern
  return paths


def _submit_detached(config, options, target):
  stage = runrecord.new_staging(config.run_dir, publish.STAGE, detached=True)
  try:
    result = beam_pipeline.submit(config, stage,
                                  runners.with_staging(options, stage))
  except Exception:
    runrecord.remove_staging(stage)
    raise
  lines, job_id = runners.submitted(result, options, target)
  if target.kind == 'dataflow_build':
    # Nothing runs yet; the job's workers create the folder when it does.
    runrecord.remove_staging(stage)
  runrecord.append_history(config.run_dir, publish.STAGE, 'submitted', {
      'attempt': publish.attempt_of(stage), 'runner': target.runner,
      'job_id': job_id})
  return {'submitted': lines, 'job_id': job_id}


def _outcome(config, stage):
  outcome = publish.outcome_of(config.run_dir, publish.attempt_of(stage))
  if outcome is None:
    raise RuntimeError('the preprocessing job ended without publishing')
  if outcome['status'] == 'cancelled':
    raise errors.UserError('the job was cancelled: nothing was published')
  if outcome['status'] == 'failed':
    raise errors.TooManyRejects(outcome['summary']['error'])
  return outcome['summary']


def _raise_outcome(config, stage, error):
  """A failed job: the publishing step's verdict, or the job's error."""
  outcome = publish.outcome_of(config.run_dir, publish.attempt_of(stage))
  if outcome and outcome['status'] == 'failed':
    raise errors.TooManyRejects(outcome['summary']['error']) from None
  runrecord.append_history(config.run_dir, publish.STAGE, 'failed', {
      'error': str(error), 'attempt': publish.attempt_of(stage)})
  raise error


def _log_summary(summary, rejects_path):
  for split, counts in summary['splits'].items():
    _log.info('%s: %d rows read, %d written, %d rejected', split,
              counts['read'], counts['written'], counts['rejected'])
  _log.info('preprocessing took %.1f s on %s', summary['wall_seconds'],
            summary['runner'])
  message = errors.rejects_message(
      sum(c['read'] for c in summary['splits'].values()),
      sum(c['rejected'] for c in summary['splits'].values()),
      summary.get('rejects_path', rejects_path))
  if message:
    _log.info('%s', message)


def read_rejects(config):
  """All reject records of the last run (a list of dicts)."""
  records = []
  for path in fs.glob(config.rundir.rejects_pattern):
    with fs.open_file(path) as f:
      records.extend(json.loads(line) for line in f if line.strip())
  return records
