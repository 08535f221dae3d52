"""`estpipe preprocess`: run the job in staging, check it, publish it."""

import logging
import os

from pipeline import fs
from pipeline import runrecord
from preprocessing import beam_pipeline

_log = logging.getLogger('estpipe')
OUTPUTS = ('transform', 'data', 'rejects')


class TooManyRejects(Exception):
  pass


def marker_path(config):
  return config.path('preprocess.json')


def is_complete(config):
  return fs.exists(marker_path(config))


def preprocess(config, beam_args=()):
  """Runs preprocessing for `config`; returns the summary dict.

  Outputs appear only when the job succeeded: until then they live in a
  staging folder, and preprocess.json (the completeness marker) comes last.
  """
  fs.makedirs(config.run_dir)
  runrecord.append_history(config.run_dir, 'preprocess', 'started')
  with runrecord.staging_dir(config.run_dir, 'preprocess') as stage:
    try:
      summary = beam_pipeline.run_job(config, stage, beam_args)
    except Exception as e:
      runrecord.append_history(config.run_dir, 'preprocess', 'failed',
                               {'error': str(e)})
      raise
    summary['rejects_path'] = config.path('rejects')
    _log_summary(summary)
    read = sum(s['read'] for s in summary['splits'].values())
    rejected = sum(s['rejected'] for s in summary['splits'].values())
    fraction = rejected / read if read else 0.0
    limit = config.preprocessing.max_reject_fraction
    if read == 0 or fraction > limit:
      # Rejects are published so the user can see why; data and transform
      # are not, and an earlier complete run stays as it was.
      runrecord.publish(os.path.join(stage, 'rejects'), config.path('rejects'))
      message = (f'{rejected} of {read} rows rejected ({fraction:.2%}), more '
                 f'than preprocessing.max_reject_fraction={limit}; see '
                 f'{config.path("rejects")}' if read else
                 'no rows were read')
      runrecord.append_history(config.run_dir, 'preprocess', 'failed',
                               {'error': message})
      raise TooManyRejects(message)
    _publish(config, stage)
    summary['config'] = config.source
    runrecord.write_json(marker_path(config), summary)
  runrecord.append_history(config.run_dir, 'preprocess', 'succeeded', summary)
  return summary


def _publish(config, stage):
  if fs.exists(marker_path(config)):
    fs.remove(marker_path(config))
  for name in OUTPUTS:
    runrecord.publish(os.path.join(stage, name), config.path(name))


def _log_summary(summary):
  for split, counts in summary['splits'].items():
    _log.info('%s: %d rows read, %d written, %d rejected', split,
              counts['read'], counts['written'], counts['rejected'])
  _log.info('preprocessing took %.1f s on %s', summary['wall_seconds'],
            summary['runner'])


def read_rejects(config):
  """All reject records of the last run (a list of dicts)."""
  import json  # pylint: disable=g-import-not-at-top
  records = []
  for path in fs.glob(config.path('rejects', '*.jsonl')):
    with fs.open_file(path) as f:
      records.extend(json.loads(line) for line in f if line.strip())
  return records
