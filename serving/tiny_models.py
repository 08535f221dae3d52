"""Tiny canned Estimator exports for the model server's tests and benchmark.

A LinearClassifier or LinearRegressor over a numeric feature `x` and a
categorical feature `c` (one of VOCAB) is trained for a few steps and
exported as canned Estimators are (one serialized tf.Example input:
`serving_default`, `classification` / `regression`, `predict`), plus a
per-feature alternative `raw:predict` taking `x` and `c` tensors directly.
Training takes a few seconds on a CPU.
"""

import os

from pipeline import signatures

VOCAB = ('a', 'b', 'c', 'd')
KINDS = ('classifier', 'regressor')


def train_and_export(kind, work_dir):
  """Trains a tiny canned linear model of `kind` ('classifier': labels
  'no' / 'yes'; 'regressor') in `work_dir`; returns its export folder."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
  rng = np.random.RandomState(0)
  x = rng.rand(64).astype(np.float32)
  c = np.array(list(VOCAB) * 16)
  columns = [tf.feature_column.numeric_column('x'),
             tf.feature_column.categorical_column_with_vocabulary_list(
                 'c', list(VOCAB))]
  config = tf.estimator.RunConfig(model_dir=os.path.join(work_dir, 'model'))
  if kind == 'classifier':
    labels = np.where(x > 0.5, 'yes', 'no')
    estimator = tf.estimator.LinearClassifier(
        columns, config=config, label_vocabulary=['no', 'yes'])
  else:
    labels = (2 * x + (c == 'a')).astype(np.float32)
    estimator = tf.estimator.LinearRegressor(columns, config=config)

  def input_fn():
    return tf.data.Dataset.from_tensor_slices(
        ({'x': x, 'c': c}, labels)).repeat().batch(16)

  estimator.train(input_fn, steps=5)
  spec = {'x': tf.io.FixedLenFeature([], tf.float32),
          'c': tf.io.FixedLenFeature([], tf.string, default_value='')}
  parsing = tf.estimator.export.build_parsing_serving_input_receiver_fn(spec)

  def receiver_fn():
    receiver = parsing()
    # Feeding the parsed features directly gives one tensor per feature.
    return tf.estimator.export.ServingInputReceiver(
        receiver.features, receiver.receiver_tensors,
        receiver_tensors_alternatives={
            signatures.RAW_RECEIVER: dict(receiver.features)})

  exported = estimator.export_saved_model(os.path.join(work_dir, 'export'),
                                          receiver_fn)
  return exported.decode()
