"""`estpipe preprocess`: run the job in staging, check it, publish it."""

import json
import logging

from pipeline import errors
from pipeline import fs
from pipeline import runrecord
from pipeline.rundir import RunDir
from preprocessing import beam_pipeline

_log = logging.getLogger('estpipe')


def preprocess(config, beam_args=()):
  """Runs preprocessing for `config`; returns the summary dict.

  Outputs appear only when the job succeeded: until then they live in a
  staging folder, and preprocess.json (the completeness marker) comes last.
  """
  layout = config.rundir
  fs.makedirs(config.run_dir)
  runrecord.append_history(config.run_dir, 'preprocess', 'started')
  with runrecord.staging_dir(config.run_dir, 'preprocess') as stage:
    try:
      summary = beam_pipeline.run_job(config, stage, beam_args)
      summary['rejects_path'] = layout.rejects
      _log_summary(summary)
      _check_rejects(config, summary, stage)
    except Exception as e:
      runrecord.append_history(config.run_dir, 'preprocess', 'failed',
                               {'error': str(e)})
      raise
    _publish(layout, stage)
    summary['config'] = config.source
    runrecord.write_json(layout.preprocess_summary, summary)
  runrecord.append_history(config.run_dir, 'preprocess', 'succeeded', summary)
  return summary


def _check_rejects(config, summary, stage):
  read = sum(s['read'] for s in summary['splits'].values())
  rejected = sum(s['rejected'] for s in summary['splits'].values())
  try:
    errors.check_reject_fraction(read, rejected,
                                 config.preprocessing.max_reject_fraction,
                                 config.rundir.rejects)
  except errors.TooManyRejects:
    # Rejects are published so the user can see why; data and transform
    # are not, and an earlier complete run stays as it was.
    runrecord.publish(RunDir(stage).rejects, config.rundir.rejects)
    raise


def _publish(layout, stage):
  if fs.exists(layout.preprocess_summary):
    fs.remove(layout.preprocess_summary)
  for name in layout.PREPROCESS_OUTPUTS:
    runrecord.publish(RunDir(stage).path(name), layout.path(name))


def _log_summary(summary):
  for split, counts in summary['splits'].items():
    _log.info('%s: %d rows read, %d written, %d rejected', split,
              counts['read'], counts['written'], counts['rejected'])
  _log.info('preprocessing took %.1f s on %s', summary['wall_seconds'],
            summary['runner'])


def read_rejects(config):
  """All reject records of the last run (a list of dicts)."""
  records = []
  for path in fs.glob(config.rundir.rejects_pattern):
    with fs.open_file(path) as f:
      records.extend(json.loads(line) for line in f if line.strip())
  return records
