"""Training hooks: progress lines, early stopping, and the model_fn wrapper
that attaches them to any Estimator (canned, custom or Keras)."""

import logging
import os

import tensorflow as tf
# read_eval_metrics is not in the public API of this Estimator release.
from tensorflow_estimator.python.estimator import early_stopping

from estimators import trainlib
from pipeline import signatures

log = logging.getLogger('estpipe')

class ProgressHook(tf.estimator.SessionRunHook):
  """Logs step, loss, examples/sec and each new eval result (once).

  Examples/sec counts this process's steps times the global batch size.
  """

  def __init__(self, loss, every_n_steps, batch_size, eval_dir):
    self._loss = loss
    self._lines = trainlib.ProgressLines(every_n_steps, batch_size)
    self._eval_dir = eval_dir
    self._eval_stamp = None
    self._eval_cache = None

  def begin(self):
    self._global_step = tf.compat.v1.train.get_global_step()

  def before_run(self, run_context):
    if self._lines.count_step():
      return tf.estimator.SessionRunArgs({'loss': self._loss})
    return None

  def after_run(self, run_context, run_values):
    if not run_values.results:
      return
    # The step fetched with the train op may be read before its increment.
    step = run_context.session.run(self._global_step)
    self._lines.log_step(step, run_values.results['loss'], self._latest_eval())

  def _latest_eval(self):
    """(step, metrics) of the newest evaluation; re-read only on change."""
    files = tf.io.gfile.glob(os.path.join(self._eval_dir, 'events.out.*'))
    stamp = tuple(sorted((f, tf.io.gfile.stat(f).mtime_nsec) for f in files
                         if tf.io.gfile.exists(f)))
    if stamp != self._eval_stamp:
      self._eval_stamp = stamp
      try:
        evals = early_stopping.read_eval_metrics(self._eval_dir)
      except tf.errors.OpError:
        evals = None
      self._eval_cache = (next(reversed(evals.items())) if evals else None)
    return self._eval_cache


def regression_metrics(labels, predictions):
  """RMSE and MAE, which the canned regressors do not report themselves."""
  values = predictions[signatures.PREDICTIONS]
  labels = tf.reshape(tf.cast(labels, values.dtype), tf.shape(values))
  return {
      'rmse': tf.compat.v1.metrics.root_mean_squared_error(labels, values),
      'mae': tf.compat.v1.metrics.mean_absolute_error(labels, values),
  }


def with_progress(estimator, config, warm_start_from=None, extra_metrics=None,
                  transform_features=None):
  """The same Estimator, its model_fn wrapped to add a ProgressHook.

  Works for any model_fn (as tf.estimator.add_metrics does), so canned,
  custom and Keras Estimators report progress the same way. Also adds
  `extra_metrics(labels, predictions)` to evaluation and applies
  `transform_features` to the features in every mode (exports included).
  The warm start given here replaces the Estimator's own (Keras Estimators
  warm-start from the Keras model's initial weights; a configured warm start
  wins).
  """
  inner = estimator.model_fn
  every = config.train.log_step_count_steps
  batch_size = config.train.batch_size
  eval_dir = estimator.eval_dir()

  def model_fn(features, labels, mode, config):  # pylint: disable=redefined-outer-name
    if transform_features is not None:
      features = transform_features(features)
    spec = inner(features, labels, mode, config)
    if mode == tf.estimator.ModeKeys.TRAIN and warm_start_from is not None:
      warm_start_object_checkpoint(spec, warm_start_from)
    if mode == tf.estimator.ModeKeys.TRAIN:
      hook = ProgressHook(spec.loss, every, batch_size, eval_dir)
      spec = spec._replace(training_hooks=list(spec.training_hooks) + [hook])
    if mode == tf.estimator.ModeKeys.EVAL and extra_metrics:
      metrics = dict(spec.eval_metric_ops)
      metrics.update(extra_metrics(labels, spec.predictions))
      spec = spec._replace(eval_metric_ops=metrics)
    return spec

  warm = warm_start_from or estimator._warm_start_settings  # pylint: disable=protected-access
  return tf.estimator.Estimator(model_fn=model_fn,
                                model_dir=estimator.model_dir,
                                config=estimator.config,
                                warm_start_from=warm)


# Keys of an object-based checkpoint end so; the step counters are skipped.
_VALUE_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'
_OBJECT_STEP_COUNTERS = ('estimator_global_step', 'optimizer/iter')


def warm_start_object_checkpoint(spec, settings):
  """Warm-starts a Keras Estimator whose checkpoints are object-based.

  model_to_estimator's default checkpoints key variables by their path in
  the Keras object graph ('layer_with_weights-0/kernel/.ATTRIBUTES/...'), not
  by graph name, so WarmStartSettings' name matching finds nothing. The
  model_fn's saver knows both: each key it saves is initialized from the
  same key of the source checkpoint. Initializers only run when the model
  directory has no checkpoint yet, so resuming is unaffected.
  """
  saver = spec.scaffold.saver if spec.scaffold else None
  saveables = getattr(saver, '_var_list', None)
  if not isinstance(saveables, list):
    return  # name-based checkpoints: WarmStartSettings handles them
  source = settings.ckpt_to_initialize_from
  available = dict(tf.train.list_variables(source))
  assignment = {}
  for saveable in saveables:
    specs = getattr(saveable, 'specs', ())
    if len(specs) != 1 or not isinstance(saveable.op, tf.Variable):
      continue
    key = specs[0].name
    name = key[:-len(_VALUE_SUFFIX)] if key.endswith(_VALUE_SUFFIX) else key
    if (name not in _OBJECT_STEP_COUNTERS and
        available.get(key) == saveable.op.shape.as_list()):
      assignment[key] = saveable.op
  if not assignment:
    return
  tf.compat.v1.train.init_from_checkpoint(source, assignment)
  log.info('warm start: %d of %d variables from %s', len(assignment),
           len(saveables), source)


def early_stopping_hook(estimator, spec):
  """stop_if_no_decrease_hook / stop_if_no_increase_hook from the config."""
  metric = spec['metric']
  mode = spec.get('mode', 'min')
  make = (tf.estimator.experimental.stop_if_no_decrease_hook if mode == 'min'
          else tf.estimator.experimental.stop_if_no_increase_hook)
  return make(estimator, metric, spec['max_steps_without_improvement'],
              min_steps=spec.get('min_steps', 0),
              run_every_secs=spec.get('check_every_secs', 10))
