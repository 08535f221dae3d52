"""`train.trainer: keras_fit`: the Keras model trained natively with `fit`.

The same model as the Estimator path builds (`keras_models.build`, or the
user module's `build_keras_model`, compiled by `keras_models.compile_model`
unless the builder compiled it), fed by the same tf.data pipeline of the
transformed TFRecords (inputs.make_dataset: text features arrive as sparse
tensors), trained with `model.fit`:

  - one Keras "epoch" is `train.save_checkpoints_steps` steps; training stops
    at the configured step (train.steps, or train.epochs over the training
    split), validating on the eval split (`train.eval_steps` batches) after
    each epoch;
  - callbacks: progress lines as the Estimator trainer's (`step N loss X
    examples/sec Y | eval@N: ...`), ModelCheckpoint (weights every epoch in
    model/checkpoints/, and the best by `export.best_metric` in
    model/best/ when the `best` exporter is configured), EarlyStopping from
    `train.early_stopping` (steps turned into epochs), TensorBoard into
    RUN_DIR/model/, and BackupAndRestore (model/backup/): a killed run
    resumes from its last finished epoch and ends at the configured step;
  - the learning-rate schedule is the optimizer's (estimators/optimizers.py),
    over its iterations, as on the Estimator path.

At the end: metrics.json (model.evaluate's metrics, the Keras Estimator's
keys, plus global_step), the trained model as TF-format weights
(model/ckpt-<step>, the checkpoint exports and verify-export name), HDF5
weights (model/weights.h5), the architecture (model/model.json, not for
subclassed models unless they have a config) and the whole model
(model/keras_model/, Keras SavedModel), and the export through
serving/keras_export.py (handed over by commands.py as `export_fn`).

Neither the Estimator API nor TF1's compatibility API is used here, even
indirectly through estimators/train.py, hooks.py, models.py or heads.py
(tests/test_native_training.py reads the imports and the source).
"""

import logging
import math
import os

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from estimators import features as features_lib
from estimators import inputs
from estimators import keras_models
from estimators import trainlib
from pipeline import fs
from pipeline import modules
from pipeline import rundir
from pipeline import runrecord
from pipeline.errors import UserError

log = logging.getLogger('estpipe')

# Files of the trained model in RUN_DIR/model/.
STATE_FILE = 'native_state.json'
H5_WEIGHTS = 'weights.h5'
ARCHITECTURE = 'model.json'
WHOLE_MODEL = 'keras_model'


# --- the model ------------------------------------------------------------------

class NativeModel:
  """The Keras model and how transformed features reach it."""

  def __init__(self, config, model, custom_objects, packed_names=None):
    self.config = config
    self.model = model
    self.custom_objects = custom_objects
    self.packed_names = packed_names

  def inputs(self, features):
    """Transformed features (label removed) -> the model's input."""
    if self.packed_names:
      return keras_models.pack_features(features, self.packed_names)
    return features

  def __call__(self, features, training=False):
    return self.model(self.inputs(features), training=training)


def custom_objects_of(config):
  objects = dict(keras_models.CUSTOM_OBJECTS)
  if config.model.module:
    module = modules.load_module(config.model.module, 'model.module')
    objects.update(getattr(module, 'CUSTOM_OBJECTS', None) or {})
  return objects


def build_model(config, tft_output):
  """The configured Keras model, compiled, as the Estimator path builds it."""
  columns = features_lib.build_feature_columns(config, tft_output)
  objects = custom_objects_of(config)
  packed = None
  if config.model.module:
    builder = modules.load_function(
        config.model.module, 'model.module', 'build_keras_model',
        'build_keras_model(config, columns) for model.type keras')
    model = builder(config, columns)
    if not isinstance(model, tf.keras.Model):
      raise UserError(f'{config.model.module}: build_keras_model returned '
                      f'{type(model).__name__}, expected a tf.keras.Model')
  else:
    tf.keras.utils.set_random_seed(config.train.seed)
    model = keras_models.build(config, columns)
    if config.model.keras_style == 'sequential':
      packed, _ = keras_models.packed_features(config, columns.feature_spec)
  if not model.optimizer:
    keras_models.compile_model(model, config)
  return NativeModel(config, model, objects, packed)


# --- data -------------------------------------------------------------------------

def dataset(config, tft_output, native, split, training, batch_size=None):
  files = inputs.data_files(config, split)
  data = inputs.make_dataset(config, files,
                             tft_output.transformed_feature_spec(), training,
                             'keras', batch_size=batch_size)
  return data.map(lambda features, label: (native.inputs(features), label))


# --- callbacks ----------------------------------------------------------------------

class StopAtStep(tf.keras.callbacks.Callback):
  """Stops training when the optimizer reaches the target step."""

  def __init__(self, max_steps):
    super().__init__()
    self._max_steps = max_steps

  def on_train_batch_end(self, batch, logs=None):
    if int(self.model.optimizer.iterations) >= self._max_steps:
      self.model.stop_training = True


class Progress(tf.keras.callbacks.Callback):
  """The Estimator trainer's progress lines (trainlib.ProgressLines)."""

  def __init__(self, every_n_steps, batch_size):
    super().__init__()
    self._lines = trainlib.ProgressLines(every_n_steps, batch_size)
    self._eval = None

  def on_train_batch_end(self, batch, logs=None):
    if self._lines.count_step():
      self._lines.log_step(int(self.model.optimizer.iterations),
                           float((logs or {})['loss']), self._eval)

  def on_epoch_end(self, epoch, logs=None):
    values = {k[len('val_'):]: v for k, v in (logs or {}).items()
              if k.startswith('val_')}
    if values:
      self._eval = (int(self.model.optimizer.iterations), values)

  def on_train_end(self, logs=None):
    text = self._lines.eval_text(self._eval)
    if text:
      log.info('step %d%s', int(self.model.optimizer.iterations), text)


class TensorBoard(tf.keras.callbacks.TensorBoard):
  """Keras's TensorBoard callback, writing batch summaries only every
  `every_n_steps` batches.

  Keras's own runs eager summary ops for every logged value on every batch
  and lets `update_freq` drop most of them inside: on the Census model that
  halved keras_fit's examples/sec.
  """

  def __init__(self, log_dir, every_n_steps):
    super().__init__(log_dir, update_freq=every_n_steps, profile_batch=0)
    self._every = every_n_steps
    self._batches = 0

  def on_train_batch_end(self, batch, logs=None):
    self._batches += 1
    if self._batches == 1 or self._batches % self._every == 0:
      super().on_train_batch_end(batch, logs)


def steps_per_epoch(config, max_steps):
  return max(1, min(config.train.save_checkpoints_steps, max_steps))


def early_stopping(config, per_epoch):
  """EarlyStopping from train.early_stopping (steps -> epochs)."""
  spec = config.train.early_stopping
  patience = max(1, math.ceil(spec['max_steps_without_improvement'] /
                              per_epoch))
  return tf.keras.callbacks.EarlyStopping(
      monitor=f'val_{spec["metric"]}', mode=spec.get('mode', 'auto'),
      patience=patience, restore_best_weights=False,
      start_from_epoch=int(spec.get('min_steps', 0) or 0) // per_epoch)


def callbacks(config, max_steps, per_epoch):
  model_dir = config.rundir.model
  result = [
      StopAtStep(max_steps),
      Progress(config.train.log_step_count_steps, config.train.batch_size),
      tf.keras.callbacks.BackupAndRestore(os.path.join(model_dir, 'backup')),
      tf.keras.callbacks.ModelCheckpoint(
          os.path.join(model_dir, 'checkpoints', 'epoch-{epoch:04d}'),
          save_weights_only=True),
      TensorBoard(model_dir, config.train.save_summary_steps),
  ]
  if 'best' in config.export.exporters:
    metric = config.export.best_metric or 'loss'
    mode = config.export.best_mode
    if mode == 'auto':
      mode = 'min' if _smaller_is_better(metric) else 'max'
    result.append(tf.keras.callbacks.ModelCheckpoint(
        os.path.join(model_dir, 'best', 'best'), monitor=f'val_{metric}',
        mode=mode, save_best_only=True, save_weights_only=True))
  if config.train.early_stopping:
    result.append(early_stopping(config, per_epoch))
  return result


def _smaller_is_better(metric):
  return any(word in metric.lower() for word in
             ('loss', 'error', 'mse', 'mae', 'rmse'))


# --- training -------------------------------------------------------------------

def _state_path(config):
  return os.path.join(config.rundir.model, STATE_FILE)


def read_state(config):
  path = _state_path(config)
  return runrecord.read_json(path) if fs.exists(path) else None


def train(config, export_fn=None):
  """Trains (or resumes, or finds finished) and evaluates; returns the
  metrics.json record. `export_fn(config, native, checkpoint, step,
  metrics)` exports the trained model (commands.py hands over
  serving/keras_export.py's)."""
  tft_output = tft.TFTransformOutput(
      rundir.require_preprocessed(config.rundir).transform)
  max_steps = trainlib.train_steps(config)
  native = build_model(config, tft_output)
  fs.makedirs(config.rundir.model)
  state = read_state(config)
  train_data = dataset(config, tft_output, native, 'train', True)
  eval_data = dataset(config, tft_output, native, 'eval', False)
  per_epoch = steps_per_epoch(config, max_steps)
  what = f'{config.model.type} ({config.label.task}) in {config.rundir.model}'
  if state and state.get('finished'):
    log.info('%s already trained to step %d (keras_fit): evaluating it', what,
             state['global_step'])
    _build(native, eval_data)
    native.model.load_weights(state['checkpoint']).expect_partial()
  else:
    log.info('training %s to step %d with keras_fit', what, max_steps)
    epochs = math.ceil(max_steps / per_epoch)
    native.model.fit(train_data, epochs=epochs, steps_per_epoch=per_epoch,
                     validation_data=eval_data,
                     validation_steps=config.train.eval_steps,
                     callbacks=callbacks(config, max_steps, per_epoch),
                     verbose=0)
  step = int(native.model.optimizer.iterations.numpy())
  if state and state.get('finished'):
    step = state['global_step']
  metrics = native.model.evaluate(eval_data, steps=config.train.eval_steps,
                                  return_dict=True, verbose=0)
  metrics = {k: float(v) for k, v in metrics.items()}
  metrics['global_step'] = step
  checkpoint = (state['checkpoint'] if state and state.get('finished') else
                save_model(config, native, step))
  record = trainlib.write_metrics(config, metrics, checkpoint)
  finished_before = bool(state and state.get('finished'))
  if export_fn is not None and not (finished_before and
                                    _exported(config, checkpoint)):
    export_fn(config, native, checkpoint, step, metrics)
  return record


def _exported(config, checkpoint):
  """Whether an export of `checkpoint` exists (a finished run, run again,
  does not export it twice)."""
  for version in rundir.list_versions(config.rundir.export):
    path = config.rundir.version(version)
    meta_path = os.path.join(path, 'assets.extra', 'estpipe_export.json')
    if fs.exists(meta_path) and (
        runrecord.read_json(meta_path).get('checkpoint') == checkpoint):
      return True
  return False


def _build(native, data):
  """Builds the model's variables by calling it on one batch."""
  features, _ = next(iter(data.take(1)))
  native.model(features, training=False)


def save_model(config, native, step):
  """The trained model in every format; returns the TF checkpoint prefix."""
  model_dir = config.rundir.model
  model = native.model
  checkpoint = os.path.join(model_dir, f'ckpt-{step}')
  model.save_weights(checkpoint)
  model.save_weights(os.path.join(model_dir, H5_WEIGHTS))
  try:
    text = model.to_json()
  except NotImplementedError as e:
    log.info('%s has no architecture JSON: %s', model.name, e)
  else:
    with tf.io.gfile.GFile(os.path.join(model_dir, ARCHITECTURE), 'w') as f:
      f.write(text)
  model.save(os.path.join(model_dir, WHOLE_MODEL), save_format='tf',
             include_optimizer=False)
  runrecord.write_json(_state_path(config), {
      'finished': True, 'global_step': step, 'checkpoint': checkpoint,
      'trainer': config.train.trainer, 'time': runrecord.now()})
  return checkpoint


# --- loading, predictions ---------------------------------------------------------

def restore(config, checkpoint=None, tft_output=None):
  """The configured model with the weights of `checkpoint` (default: the
  finished run's)."""
  tft_output = tft_output or tft.TFTransformOutput(config.rundir.transform)
  if checkpoint is None:
    state = read_state(config)
    if not state:
      raise UserError(f'no keras_fit model in {config.rundir.model}: train '
                      'first')
    checkpoint = state['checkpoint']
  native = build_model(config, tft_output)
  _build(native, dataset(config, tft_output, native, 'eval', False,
                         batch_size=2))
  native.model.load_weights(checkpoint).expect_partial()
  return native, checkpoint


def predict_transformed(config, checkpoint, batches):
  """The model's canned predictions on transformed batches: {key: array}.

  What verify-export compares an export's signatures against.
  """
  from serving import keras_export  # pylint: disable=g-import-not-at-top
  native, _ = restore(config, checkpoint)
  outputs = {}
  for batch in batches:
    output = keras_export.model_output(native(batch, training=False))
    for key, value in keras_export.output_predictions(config, output).items():
      outputs.setdefault(key, []).append(np.asarray(value))
  return {k: np.concatenate(v) for k, v in outputs.items()}


def evaluate(config, checkpoint=None):
  """model.evaluate of a checkpoint on the eval split (estpipe evaluate)."""
  tft_output = tft.TFTransformOutput(config.rundir.transform)
  native, path = restore(config, checkpoint, tft_output)
  data = dataset(config, tft_output, native, 'eval', False)
  metrics = native.model.evaluate(data, steps=config.train.eval_steps,
                                  return_dict=True, verbose=0)
  state = read_state(config) or {}
  return {'checkpoint': path, 'global_step': state.get('global_step', 0),
          'metrics': {k: float(v) for k, v in metrics.items()}}
