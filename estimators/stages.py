"""What `estpipe run` knows of train, evaluate, export and verify-export.

Each check answers a stage's outputs when they are complete and belong to
the model now in RUN_DIR/model, else None (pipeline/runs.py then runs the
stage). A checkpoint's name alone does not say which model wrote it: a
model trained afresh reaches `model.ckpt-100` again. So an evaluation or an
export counts only when it was written after the checkpoint was.
"""

import datetime
import logging
import math
import os
import uuid

import tensorflow as tf

from estimators import train
from pipeline import fs
from pipeline import rundir
from pipeline import runrecord
from serving import export

log = logging.getLogger('estpipe')


def model_inputs(config):
  """Files besides the config that shape the model: the user's model module."""
  return [config.model.module] if config.model.module else []


def start_afresh(config):
  """Removes the model and its metrics, so training starts at step 0.

  Exports stay: they are versioned, the new model's get higher versions (TF
  Serving serves the highest), and an older one may still be wanted.
  """
  model = config.rundir.model
  if fs.isdir(model):
    log.info('removing the old model %s', model)
    # Moved aside first: a half-deleted model_dir must never be resumed.
    doomed = f'{model}.old-{uuid.uuid4().hex[:8]}'
    fs.replace(model, doomed)
    fs.rmtree(doomed)
  if fs.exists(config.rundir.metrics):
    fs.remove(config.rundir.metrics)


def trained(config):
  """A checkpoint at the target step, with its final metrics.json."""
  checkpoint = tf.train.latest_checkpoint(config.rundir.model)
  if not checkpoint or not fs.exists(config.rundir.metrics):
    return None
  record = runrecord.read_json(config.rundir.metrics)
  if not _same_checkpoint(record.get('checkpoint'), checkpoint):
    return None
  step = record['global_step']
  # Early stopping ends training before the target step, for good.
  if step < train.train_steps(config) and not config.train.early_stopping:
    return None
  return {'checkpoint': checkpoint, 'global_step': step,
          'metrics_file': config.rundir.metrics}


def evaluated(config):
  """RUN_DIR/evaluation.json of the latest checkpoint, written after it."""
  checkpoint = tf.train.latest_checkpoint(config.rundir.model)
  path = config.rundir.evaluation
  if not checkpoint or not fs.exists(path):
    return None
  result = runrecord.read_json(path)
  if not (_same_checkpoint(result.get('checkpoint'), checkpoint)
          and fs.stat(path)[1] >= _written_at(checkpoint)):
    return None
  return {'evaluation': path, 'checkpoint': checkpoint,
          'global_step': result['global_step'], 'metrics': result['metrics']}


def exported(config):
  """The newest export version of the latest checkpoint, made after it."""
  checkpoint = tf.train.latest_checkpoint(config.rundir.model)
  if not checkpoint:
    return None
  since = math.floor(_written_at(checkpoint))  # export times are in seconds
  for version in reversed(rundir.list_versions(config.rundir.export)):
    path = config.rundir.version(version)
    meta = export.read_metadata(path)
    if (_same_checkpoint(meta.get('checkpoint'), checkpoint)
        and _seconds(meta.get('time')) >= since):
      return {'export_version': version, 'path': path,
              'checkpoint': checkpoint, 'exporter': meta.get('exporter')}
  return None


def export_is_current(outputs):
  """Why `estpipe run` skips the export stage (usually: training exported)."""
  return (f'{os.path.basename(outputs["checkpoint"])} is exported already, '
          f'as version {outputs["export_version"]} by the '
          f'{outputs["exporter"]} exporter')


def verified(config):
  """A verify-export success recorded for the newest export version."""
  versions = rundir.list_versions(config.rundir.export)
  if not versions:
    return None
  path = fs.abspath(config.rundir.version(versions[-1]))
  for line in reversed(runrecord.read_history(config.run_dir)):
    summary = line.get('summary') or {}
    if (line.get('stage') == 'verify-export' and summary.get('export') == path
        and line.get('status') == 'succeeded'):
      return {'export': path, 'verified_version': versions[-1],
              'rows': summary.get('rows'), 'time': line.get('time')}
  return None


def _same_checkpoint(recorded, checkpoint):
  # By name: a run directory may have moved since the record was written.
  return bool(recorded) and (os.path.basename(recorded) ==
                             os.path.basename(checkpoint))


def _written_at(checkpoint):
  return fs.stat(checkpoint + '.index')[1]


def _seconds(iso_time):
  if not iso_time:
    return -1
  return datetime.datetime.fromisoformat(iso_time).timestamp()
