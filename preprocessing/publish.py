"""The preprocessing job's last step: check the staged outputs, publish them.

    written files, transform fn --(side input: wait for all)--+
    per-split counts --SumCounts--(side input)----------------+
                                                  Once --CheckAndPublish-->

It runs inside the job, on one worker, once every output is in staging, so a
job publishes the same way whether its client waits for it, detached from it
(`--detach`), or never ran it (a Dataflow template). The counts it checks are
PCollections, not Beam metrics, which a detached or remote client cannot
read. It applies the reject-fraction rule, renames the outputs into place,
writes preprocess.json last and the history line; a job whose staging holds
the cancel marker (`estpipe jobs cancel`) publishes nothing.
"""

import dataclasses
import logging
import os
import time

import apache_beam as beam

from pipeline import errors
from pipeline import fs
from pipeline import runrecord
from pipeline.rundir import RunDir

_log = logging.getLogger('estpipe')
STAGE = 'preprocess'


@dataclasses.dataclass(frozen=True)
class Job:
  """What the publishing step needs to know about its job (picklable)."""
  run_dir: str
  staging: str  # RUN_DIR/.staging/preprocess-<id>: the job's outputs
  config_source: str
  max_reject_fraction: float
  runner: str
  splits: tuple
  start: float
  # Raw features whose missing values in the train split are counted
  # (preprocess.json's `train_missing`), and those of them filled with 0
  # for want of a default (a warning names each one that was missing).
  features: tuple = ()
  unfilled: tuple = ()

  @property
  def attempt(self):
    return attempt_of(self.staging)


def attempt_of(staging):
  """The id of a job's history lines: its staging folder's name."""
  return os.path.basename(staging.rstrip('/'))


class Publish(beam.PTransform):
  """{'counts': (name, n), 'written': anything} -> publishes the run dir."""

  def __init__(self, job):
    super().__init__()
    self._job = job

  def expand(self, outputs):
    counts = outputs['counts'] | 'SumCounts' >> beam.CombinePerKey(sum)
    return (outputs['counts'].pipeline
            | 'Once' >> beam.Create([None])
            | 'CheckAndPublish' >> beam.ParDo(
                _PublishFn(self._job), beam.pvalue.AsDict(counts),
                beam.pvalue.AsList(outputs['written'])))


class _PublishFn(beam.DoFn):

  def __init__(self, job):
    self._job = job

  def process(self, unused_element, counts, written):
    del written  # only waited for: every output is in staging now
    publish(self._job, counts)


def summary(job, counts):
  """preprocess.json: rows read, written and rejected per split, missing
  values per feature in the train split (`train_missing`), and more."""
  splits = {s: {k: counts.get(f'{s}_{k}', 0)
                for k in ('read', 'written', 'rejected')} for s in job.splits}
  return {'runner': job.runner, 'splits': splits,
          'train_missing': {name: counts.get(missing_key(name), 0)
                            for name in job.features},
          'wall_seconds': round(time.time() - job.start, 2),
          'rejects_path': RunDir(job.run_dir).rejects,
          'config': job.config_source, 'attempt': job.attempt}


def missing_key(feature):
  """The count of a feature's missing values in the train split."""
  return f'train_missing/{feature}'


def _warn_unfilled(job, result):
  """One warning per numeric feature that was missing in training and has
  no default: preprocessing filled it with 0."""
  train = result['splits'].get('train', {})
  rows = train.get('read', 0) - train.get('rejected', 0)
  for name in job.unfilled:
    missing = result['train_missing'].get(name, 0)
    if missing and rows:
      _log.warning('feature %r: %.1f%% of training rows missing and no '
                   'default; filled with 0 (set features.%s.default)', name,
                   100.0 * missing / rows, name)


def publish(job, counts):
  """Checks the staged run and publishes it; raises TooManyRejects."""
  staged, layout = RunDir(job.staging), RunDir(job.run_dir)
  if not fs.exists(staged.data):
    _republish(job)  # a runner retrying this step after it finished
    return
  if fs.exists(staged.cancel_marker):
    _log.info('job %s was cancelled: publishing nothing', job.attempt)
    runrecord.remove_staging(job.staging)
    _history(job, 'cancelled', {})
    return
  result = summary(job, counts)
  _warn_unfilled(job, result)
  try:
    _check_rejects(job, result)
  except errors.TooManyRejects as e:
    # Rejects are published so the user can see why; data and transform
    # are not, and an earlier complete run stays as it was.
    runrecord.publish(staged.rejects, layout.rejects)
    runrecord.remove_staging(job.staging)
    _history(job, 'failed', {'error': str(e), 'error_type': 'TooManyRejects'})
    raise
  if fs.exists(layout.preprocess_summary):
    fs.remove(layout.preprocess_summary)
  for name in layout.PREPROCESS_OUTPUTS:
    runrecord.publish(staged.path(name), layout.path(name))
  runrecord.write_json(layout.preprocess_summary, result)
  runrecord.remove_staging(job.staging)
  _history(job, 'succeeded', result)


def _check_rejects(job, result):
  read = sum(s['read'] for s in result['splits'].values())
  rejected = sum(s['rejected'] for s in result['splits'].values())
  errors.check_reject_fraction(read, rejected, job.max_reject_fraction,
                               result['rejects_path'])


def _history(job, status, details):
  runrecord.append_history(job.run_dir, STAGE, status,
                           {**details, 'attempt': job.attempt})


def _republish(job):
  outcome = outcome_of(job.run_dir, job.attempt)
  if outcome and outcome['status'] == 'failed':
    raise errors.TooManyRejects(outcome['summary']['error'])


def outcome_of(run_dir, attempt):
  """The history line that ended job `attempt`, or None while it runs."""
  return runrecord.last_history(run_dir, STAGE, attempt,
                                ('succeeded', 'failed', 'cancelled'))
