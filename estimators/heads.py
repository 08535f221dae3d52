"""The canned heads, rebuilt for models that are not canned Estimators.

The project's model_fn, users' model_fns and Keras Estimators end here so
that every model type predicts, evaluates and exports as the canned
Estimators do: the same prediction keys, metrics and signatures
(pipeline/signatures.py), whatever made the logits or the output.
"""

import tensorflow as tf

from pipeline import signatures
from serving import keras_export


def estimator_spec(config, mode, logits, labels, make_optimizer):
  """EstimatorSpec for `logits` of the configured task.

  Usable from a user's model_fn too: it only needs the logits, and
  `make_optimizer` (estimators.optimizers.optimizer_fn) for training.
  """
  task = config.label.task
  predictions = _predictions(config, logits)
  if mode == tf.estimator.ModeKeys.PREDICT:
    return tf.estimator.EstimatorSpec(
        mode, predictions=predictions,
        export_outputs=export_outputs(task, predictions))
  per_example = _per_example_loss(task, logits, labels)
  loss = tf.reduce_mean(per_example)
  if mode == tf.estimator.ModeKeys.EVAL:
    return tf.estimator.EstimatorSpec(
        mode, loss=loss, predictions=predictions,
        eval_metric_ops=_metrics(task, labels, predictions, per_example))
  train_op = _train_op(loss, make_optimizer)
  _summaries(task, logits, predictions)
  return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op,
                                    predictions=predictions)


def _predictions(config, logits):
  """The canned predictions of `logits`, the logits included."""
  task = config.label.task
  if task == 'regression':
    return {signatures.PREDICTIONS: logits}
  squash = tf.sigmoid if task == 'binary' else tf.nn.softmax
  predictions = output_predictions(config, squash(logits))
  predictions[signatures.LOGITS] = logits
  return predictions


def output_predictions(config, output):
  """The canned predictions (without logits) of a model's output: one
  definition for Estimator heads and native Keras exports
  (serving/keras_export.py)."""
  return keras_export.output_predictions(config, output)


def _export_output(method, outputs):
  export = tf.estimator.export
  if method == signatures.CLASSIFY_METHOD:
    return export.ClassificationOutput(
        scores=outputs.get(signatures.CLASSIFY_OUTPUT_SCORES),
        classes=outputs.get(signatures.CLASSIFY_OUTPUT_CLASSES))
  if method == signatures.REGRESS_METHOD:
    return export.RegressionOutput(outputs[signatures.REGRESS_OUTPUTS])
  return export.PredictOutput(outputs)


def export_outputs(task, predictions):
  """The EstimatorSpec's export_outputs: the signatures of `task`."""
  return {key: _export_output(method, outputs) for key, (method, outputs) in
          signatures.signature_outputs(task, predictions).items()}


def _per_example_loss(task, logits, labels):
  if task == 'regression':
    labels = tf.reshape(tf.cast(labels, tf.float32), [-1, 1])
    return tf.math.squared_difference(logits, labels)
  labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
  if task == 'binary':
    return tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(tf.expand_dims(labels, 1), tf.float32), logits=logits)
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                        logits=logits)


def _metrics(task, labels, predictions, per_example):
  m = tf.compat.v1.metrics
  metrics = {'average_loss': m.mean(per_example)}
  if task == 'regression':
    labels = tf.reshape(tf.cast(labels, tf.float32), [-1, 1])
    values = predictions[signatures.PREDICTIONS]
    metrics.update({
        'rmse': m.root_mean_squared_error(labels, values),
        'mae': m.mean_absolute_error(labels, values),
        'label/mean': m.mean(labels),
        'prediction/mean': m.mean(values),
    })
    return metrics
  labels = tf.reshape(tf.cast(labels, tf.int64), [-1, 1])
  class_ids = predictions[signatures.CLASS_IDS]
  metrics['accuracy'] = m.accuracy(labels, class_ids)
  if task == 'binary':
    positive = predictions[signatures.LOGISTIC]
    metrics.update({
        'auc': m.auc(labels, positive),
        'auc_precision_recall': m.auc(labels, positive, curve='PR'),
        'precision': m.precision(labels, class_ids),
        'recall': m.recall(labels, class_ids),
        'label/mean': m.mean(tf.cast(labels, tf.float32)),
        'prediction/mean': m.mean(positive),
    })
  else:
    # One-vs-rest over all (example, class) pairs: the micro-averaged AUC.
    probabilities = predictions[signatures.PROBABILITIES]
    one_hot = tf.one_hot(tf.reshape(labels, [-1]), probabilities.shape[1])
    metrics['auc'] = m.auc(one_hot, probabilities)
  return metrics


def _train_op(loss, make_optimizer):
  optimizer = make_optimizer()
  # The optimizer's step counter is the global step, so hooks see progress
  # and learning-rate schedules decay with it.
  optimizer.iterations = tf.compat.v1.train.get_or_create_global_step()
  # Each replica's gradients are summed across replicas: scale to the mean.
  replicas = tf.distribute.get_strategy().num_replicas_in_sync
  scaled = loss / replicas if replicas > 1 else loss
  variables = tf.compat.v1.trainable_variables()
  train_op = optimizer.get_updates(scaled, variables)[0]
  update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
  lr = optimizer._decayed_lr(tf.float32)  # pylint: disable=protected-access
  tf.compat.v1.summary.scalar('learning_rate', lr)
  return tf.group(train_op, *update_ops)


def _summaries(task, logits, predictions):
  tf.compat.v1.summary.histogram('logits', logits)
  if task == 'binary':
    tf.compat.v1.summary.scalar(
        'fraction_predicted_positive',
        tf.reduce_mean(tf.cast(predictions[signatures.CLASS_IDS], tf.float32)))
