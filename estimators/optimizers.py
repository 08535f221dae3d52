"""Optimizers and learning-rate schedules for every model type.

Canned Estimators, the project's model_fn, Keras models and users' model_fns all
build their optimizer here, so `model.optimizer`, the schedule and the
multi-worker fix mean the same thing for each.
"""

import tensorflow as tf

_OPTIMIZERS = {
    'adam': tf.keras.optimizers.legacy.Adam,
    'adagrad': tf.keras.optimizers.legacy.Adagrad,
    'ftrl': tf.keras.optimizers.legacy.Ftrl,
    'sgd': tf.keras.optimizers.legacy.SGD,
    'rmsprop': tf.keras.optimizers.legacy.RMSprop,
}


def learning_rate(base, schedule):
  """A float, or a Keras LearningRateSchedule over the optimizer's steps.

  Exponential and cosine decay start from `base`; piecewise `values` are
  factors of `base`, so one schedule fits the linear and the deep optimizer
  of a wide & deep model.
  """
  if not schedule:
    return base
  schedules = tf.keras.optimizers.schedules
  kind = schedule['type']
  if kind == 'exponential':
    return schedules.ExponentialDecay(
        base, schedule['decay_steps'], schedule['decay_rate'],
        staircase=bool(schedule.get('staircase', False)))
  if kind == 'cosine':
    return schedules.CosineDecay(base, schedule['decay_steps'],
                                 alpha=float(schedule.get('alpha', 0.0)))
  return schedules.PiecewiseConstantDecay(
      [int(b) for b in schedule['boundaries']],
      [float(v) * base for v in schedule['values']])


def optimizer_fn(name, base_rate, schedule, dense_gradients=False):
  """A callable that builds the optimizer inside the Estimator's graph.

  Estimators need the legacy (OptimizerV2) Keras optimizers; building one per
  graph keeps its variables in the graph that uses them. `dense_gradients`:
  see _with_dense_gradients.
  """
  cls = _OPTIMIZERS[name]
  if dense_gradients:
    cls = _with_dense_gradients(cls)

  def make():
    return cls(learning_rate=learning_rate(base_rate, schedule))
  return make


def optimizer_for(config, name, base_rate):
  """optimizer_fn with the config's schedule and distribution."""
  return optimizer_fn(
      name, base_rate, config.train.learning_rate_schedule,
      dense_gradients=config.train.distribution == 'multi_worker_mirrored')


def _with_dense_gradients(cls):
  """`cls` whose gradients are dense tensors, never IndexedSlices.

  Under MultiWorkerMirroredStrategy in graph mode the all-reduce of sparse
  gradients (embeddings, linear weights of sparse columns) fails with a
  collective shape mismatch: each worker's batch touches a different number
  of rows. Dense gradients have the same shape everywhere.
  """
  class DenseGradients(cls):

    def get_gradients(self, loss, params):
      grads = super().get_gradients(loss, params)
      return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices)
              else g for g in grads]

  DenseGradients.__name__ = f'DenseGradients{cls.__name__}'
  return DenseGradients
