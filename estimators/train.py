"""`estpipe train` and `estpipe evaluate`.

train: tf.estimator.train_and_evaluate over the transformed data, with
checkpoints, TensorBoard events and eval results in RUN_DIR/model/ and the
final eval metrics in RUN_DIR/metrics.json. Re-running resumes from the
latest checkpoint (the Estimator restores it and trains to the configured
step), so a killed run is finished by running the same command again.

evaluate: one checkpoint on the eval split, optionally per value of raw
categorical features (slices).
"""

import logging
import os
import re

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from estimators import features as features_lib
from estimators import hooks
from estimators import inputs
from estimators import model_record
from estimators import models
from estimators import runconfig
from estimators.trainlib import to_json, train_steps, write_metrics
from pipeline import fs
from pipeline import rundir
from pipeline import signatures
from pipeline.errors import UserError

log = logging.getLogger('estpipe')



def load_tft_output(config):
  layout = rundir.require_preprocessed(config.rundir)
  return tft.TFTransformOutput(layout.transform)


def build_estimator(config, run_config=None, tft_output=None,
                    warm_start=True):
  """The configured Estimator over RUN_DIR/model.

  Without `run_config`, one for local use (evaluation, export) without
  distribution. `warm_start=False` leaves out train.warm_start_from.
  """
  tft_output = tft_output or load_tft_output(config)
  run_config = run_config or runconfig.make_run_config(config,
                                                       distribute=False)
  columns = features_lib.build_feature_columns(config, tft_output)
  warm = warm_start_settings(config) if warm_start else None
  estimator = models.build(config, columns, run_config)
  extra = None
  if config.model.type in models.CANNED and (
      config.label.task == 'regression'):
    extra = hooks.regression_metrics
  return hooks.with_progress(estimator, config, warm, extra,
                             models.feature_transform(config, columns))


def warm_start_settings(config):
  """WarmStartSettings from train.warm_start_from (a run dir or model dir).

  Every variable the source checkpoint shares with this model is copied:
  weights and optimizer state (FTRL and Adam weights without their
  accumulators take a large first step away from where they were), but not
  the global step or optimizer step counters, so training and learning-rate
  schedules start fresh. Vocabularies are not remapped: warm-start from a run
  preprocessed with the same vocabularies.
  """
  source = config.train.warm_start_from
  if not source:
    return None
  if fs.isdir(rundir.RunDir(source).model):
    source = rundir.RunDir(source).model
  checkpoint = tf.train.latest_checkpoint(source)
  if checkpoint is None:
    raise UserError(f'train.warm_start_from: no checkpoint in {source}')
  if fs.abspath(source) == fs.abspath(config.rundir.model):
    raise UserError('train.warm_start_from is this run\'s own model '
                    'directory: re-running train resumes it anyway')
  names = [name for name, _ in tf.train.list_variables(checkpoint)
           if not _STEP_COUNTER.search(name)]
  # A list of names selects among all global variables (slots included),
  # each as a regular expression matched against the variable's name.
  patterns = [re.escape(name) + r'(/part_\d+)?:\d+$' for name in names]
  return tf.estimator.WarmStartSettings(ckpt_to_initialize_from=checkpoint,
                                        vars_to_warm_start=patterns)


_STEP_COUNTER = re.compile(r'(^global_step$|(^|/)iter(ations)?$)')


def train(config, exporters=()):
  """Trains (or resumes) and evaluates; returns the final metrics or None.

  `exporters` (tf.estimator.Exporter) run after each evaluation; the
  training command hands over the serving stage's (serving/export.py).

  In a cluster only the chief (or a local run) writes metrics.json; ps tasks
  serve until they are stopped, and workers and the evaluator return None.
  """
  # Device setup and strategies come before any TensorFlow op runs.
  runconfig.configure_local_devices(config)
  run_config = runconfig.make_run_config(config)
  task = runconfig.task_type()
  tft_output = load_tft_output(config)
  resuming = tf.train.latest_checkpoint(config.rundir.model) is not None
  if task in (None, 'chief'):
    model_record.check_or_record(config, resuming)
  max_steps = train_steps(config)
  estimator = build_estimator(config, run_config, tft_output)
  fmt = models.label_format(config)
  train_input = inputs.make_input_fn(config, tft_output, 'train', True, fmt)
  eval_input = inputs.make_input_fn(config, tft_output, 'eval', False, fmt)
  train_hooks = []
  if config.train.early_stopping:
    train_hooks.append(hooks.early_stopping_hook(
        estimator, config.train.early_stopping))
  train_spec = tf.estimator.TrainSpec(train_input, max_steps=max_steps,
                                      hooks=train_hooks)
  eval_spec = tf.estimator.EvalSpec(
      eval_input, steps=config.train.eval_steps, exporters=list(exporters),
      start_delay_secs=config.train.eval_start_delay_secs,
      throttle_secs=config.train.eval_throttle_secs)
  _log_role(config, task, max_steps)
  result = _train_and_evaluate(config, estimator, train_spec, eval_spec,
                               resuming)
  if task not in (None, 'chief'):
    return None
  metrics = result[0] if result and result[0] else None
  if not metrics:
    # A cluster's chief does not evaluate, and a finished run skips
    # training: evaluate the final checkpoint here.
    metrics = estimator.evaluate(eval_input, steps=config.train.eval_steps,
                                 name='final')
  return write_metrics(config, metrics, estimator.latest_checkpoint())


def _train_and_evaluate(config, estimator, train_spec, eval_spec, resuming):
  """train_and_evaluate; checkpoints that do not fit fail as a UserError."""
  try:
    return tf.estimator.train_and_evaluate(estimator, train_spec, eval_spec)
  except tf.errors.OpError as e:
    incompatible = resuming and model_record.restore_error(config, e)
    if incompatible:
      raise incompatible from e
    raise


def _log_role(config, task, max_steps):
  what = f'{config.model.type} ({config.label.task}) in {config.rundir.model}'
  if task == 'ps':
    log.info('ps task serving the variables of %s; it runs until stopped',
             what)
  elif task == 'evaluator':
    log.info('evaluating and exporting each new checkpoint of %s until step '
             '%d', what, max_steps)
  else:
    log.info('training %s to step %d%s', what, max_steps,
             f' as {task}' if task else '')


def predict_transformed(config, checkpoint, batches):
  """The Estimator's predictions on transformed batches: {key: array}.

  What verify-export compares an export's signatures against.
  """
  estimator = build_estimator(config, warm_start=False)

  def input_fn():
    def gen():
      for batch in batches:
        yield batch
    first = batches[0]
    signature = {k: (tf.SparseTensorSpec([None, None], v.dtype)
                     if isinstance(v, tf.SparseTensor) else
                     tf.TensorSpec([None] + v.shape[1:].as_list(), v.dtype))
                 for k, v in first.items()}
    return tf.data.Dataset.from_generator(gen, output_signature=signature)

  outputs = {}
  for batch in estimator.predict(input_fn, checkpoint_path=checkpoint,
                                 yield_single_examples=False):
    for key, value in batch.items():
      outputs.setdefault(key, []).append(np.asarray(value))
  return {k: np.concatenate(v) for k, v in outputs.items()}


# --- evaluate ---------------------------------------------------------------------

def resolve_checkpoint(config, checkpoint):
  """A checkpoint path from None (latest), a step number, or a path."""
  if checkpoint is None:
    path = tf.train.latest_checkpoint(config.rundir.model)
    if path is None:
      raise UserError(f'no checkpoint in {config.rundir.model}: train first')
    return path
  if str(checkpoint).isdigit():
    path = os.path.join(config.rundir.model, f'model.ckpt-{checkpoint}')
  else:
    path = checkpoint
  if not tf.compat.v1.train.checkpoint_exists(path):
    raise UserError(f'checkpoint {path} does not exist')
  return path


def evaluate(config, checkpoint=None, slices=()):
  """Metrics of one checkpoint on the eval split, overall and per slice."""
  tft_output = load_tft_output(config)
  path = resolve_checkpoint(config, checkpoint)
  for name in slices:
    _check_slice_feature(config, name)
  estimator = build_estimator(config, tft_output=tft_output,
                              warm_start=False)
  fmt = models.label_format(config)
  eval_input = inputs.make_input_fn(config, tft_output, 'eval', False, fmt)
  metrics = estimator.evaluate(eval_input, steps=config.train.eval_steps,
                               checkpoint_path=path, name='cli')
  result = {'checkpoint': path, 'global_step': int(metrics['global_step']),
            'metrics': to_json(metrics)}
  if slices:
    result['slices'] = slice_metrics(config, estimator, tft_output, path,
                                     slices)
  return result


def _check_slice_feature(config, name):
  try:
    feature = config.feature(name)
  except KeyError:
    raise UserError(f'--slice {name}: not a feature of this config')
  categorical = feature.transform in ('vocabulary', 'hash', 'bucketize') or (
      feature.transform == 'identity' and feature.type == 'string')
  if not categorical:
    raise UserError(f'--slice {name}: slicing needs a categorical feature '
                    f'(vocabulary, hash, bucketize or a string), {name} is '
                    f'{feature.type} with transform {feature.transform}')


def _slice_value_names(config, tft_output, name):
  """Maps a transformed id to the raw value it stands for, as a string."""
  feature = config.feature(name)
  if feature.transform == 'vocabulary':
    vocab = [v.decode() if isinstance(v, bytes) else str(v)
             for v in tft_output.vocabulary_by_name(name)]
    return lambda i: vocab[i] if 0 <= i < len(vocab) else '<OOV>'
  if feature.transform in ('hash', 'bucketize'):
    return lambda i: f'bucket {i}'
  return lambda v: v.decode() if isinstance(v, bytes) else str(v)


def _eval_arrays(config, tft_output, slices):
  """Labels and slice values of the eval split, in input order."""
  files = inputs.data_files(config, 'eval')
  spec = tft_output.transformed_feature_spec()
  dataset = inputs.make_dataset(config, files, spec, training=False,
                                label_format='index', batch_size=1024)
  if config.train.eval_steps:
    dataset = dataset.take(config.train.eval_steps)
  labels, values = [], {name: [] for name in slices}
  for features, label in dataset:
    labels.append(label.numpy())
    for name in slices:
      values[name].append(features[name].numpy())
  return (np.concatenate(labels),
          {k: np.concatenate(v) for k, v in values.items()})


def _predicted(config, estimator, tft_output, checkpoint):
  """Positive-class probability, class probabilities or predicted values."""
  fmt = models.label_format(config)
  predict_input = inputs.make_input_fn(config, tft_output, 'eval', False, fmt)
  outputs = []
  for batch in estimator.predict(predict_input, checkpoint_path=checkpoint,
                                 yield_single_examples=False):
    outputs.append(_prediction_values(config, batch))
  return np.concatenate(outputs)


def _prediction_values(config, batch):
  task = config.label.task
  if task == 'regression':
    return np.reshape(batch[signatures.PREDICTIONS], [-1])
  if signatures.PROBABILITIES in batch:
    return batch[signatures.PROBABILITIES]
  positive = np.reshape(batch[signatures.LOGISTIC], [-1, 1])
  return np.concatenate([1.0 - positive, positive], axis=1)


def slice_metrics(config, estimator, tft_output, checkpoint, slices):
  """{feature: {raw value: metrics}} for each slice feature."""
  labels, values = _eval_arrays(config, tft_output, slices)
  predicted = _predicted(config, estimator, tft_output, checkpoint)
  # eval_steps cuts the labels; predictions follow the same input order.
  predicted = predicted[:len(labels)]
  if len(predicted) != len(labels):
    raise UserError('predictions and labels of the eval split differ in '
                    'length: the eval data changed during evaluation')
  result = {}
  for name in slices:
    to_name = _slice_value_names(config, tft_output, name)
    per_value = {}
    column = values[name]
    for value in np.unique(column):
      mask = column == value
      per_value[to_name(value)] = _numpy_metrics(config, labels[mask],
                                                 predicted[mask])
    result[name] = dict(sorted(per_value.items(),
                               key=lambda kv: -kv[1]['count']))
  return result


def _numpy_metrics(config, labels, predicted):
  metrics = {'count': int(len(labels))}
  if config.label.task == 'regression':
    error = predicted - labels.astype(np.float64)
    metrics['rmse'] = float(np.sqrt(np.mean(error ** 2)))
    metrics['mae'] = float(np.mean(np.abs(error)))
    metrics['label/mean'] = float(np.mean(labels))
    return metrics
  labels = labels.astype(np.int64)
  probs = np.clip(predicted, 1e-7, 1.0)
  metrics['accuracy'] = float(np.mean(np.argmax(predicted, 1) == labels))
  metrics['average_loss'] = float(
      -np.mean(np.log(probs[np.arange(len(labels)), labels])))
  if config.label.task == 'binary':
    metrics['auc'] = binary_auc(labels, predicted[:, 1])
    metrics['label/mean'] = float(np.mean(labels))
  return metrics


def binary_auc(labels, scores):
  """ROC AUC by the rank-sum statistic; None when one class is absent."""
  positives = int(np.sum(labels == 1))
  negatives = len(labels) - positives
  if positives == 0 or negatives == 0:
    return None
  order = np.argsort(scores, kind='mergesort')
  ranks = np.empty(len(scores), dtype=np.float64)
  sorted_scores = scores[order]
  # Average ranks over ties.
  _, first, counts = np.unique(sorted_scores, return_index=True,
                               return_counts=True)
  average = first + (counts + 1) / 2.0
  ranks[order] = np.repeat(average, counts)
  rank_sum = float(np.sum(ranks[labels == 1]))
  return (rank_sum - positives * (positives + 1) / 2.0) / (positives *
                                                           negatives)
