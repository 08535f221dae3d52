"""Keras models for `model.type: keras`, in the three Keras styles.

All three take the dict of transformed features, turn it into one dense
vector with the deep feature columns (`DenseFeatures`), apply a `CrossLayer`
(a custom layer: explicit feature crosses, as in Deep & Cross networks), then
the hidden layers. The output layer is named like the canned predictions:
`logistic` (binary), `probabilities` (multiclass), `predictions`
(regression).
"""

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package='estpipe')
class CrossLayer(tf.keras.layers.Layer):
  """x0 * (x . w + b) + x: one explicit feature-cross layer (DCN).

  Its config makes it clonable, which model_to_estimator needs: the
  Estimator rebuilds the model in its own graph from `get_config`.
  """

  def __init__(self, use_bias=True, kernel_initializer='glorot_uniform',
               **kwargs):
    super().__init__(**kwargs)
    self.use_bias = use_bias
    self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)

  def build(self, input_shape):
    dim = int(input_shape[-1])
    self.kernel = self.add_weight('kernel', shape=(dim, 1),
                                  initializer=self.kernel_initializer)
    if self.use_bias:
      self.bias = self.add_weight('bias', shape=(dim,), initializer='zeros')
    super().build(input_shape)

  def call(self, inputs):
    cross = inputs * tf.matmul(inputs, self.kernel)
    if self.use_bias:
      cross += self.bias
    return cross + inputs

  def get_config(self):
    config = super().get_config()
    config.update({
        'use_bias': self.use_bias,
        'kernel_initializer': tf.keras.initializers.serialize(
            self.kernel_initializer),
    })
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    config['kernel_initializer'] = tf.keras.initializers.deserialize(
        config['kernel_initializer'])
    return cls(**config)


CUSTOM_OBJECTS = {'CrossLayer': CrossLayer}


def output_spec(config):
  """(units, activation, name) of the output layer for the label's task."""
  task = config.label.task
  if task == 'binary':
    return 1, 'sigmoid', 'logistic'
  if task == 'multiclass':
    return config.label.n_classes, 'softmax', 'probabilities'
  return 1, None, 'predictions'


def build(config, columns):
  """The built-in Keras model in `config.model.keras_style`."""
  style = config.model.keras_style
  if style == 'sequential':
    return sequential_model(config, columns)
  if style == 'functional':
    return functional_model(config, columns)
  return DeepCrossModel(config, columns)


def _hidden_layers(config):
  layers = []
  for i, units in enumerate(config.model.hidden_units):
    layers.append(tf.keras.layers.Dense(units, activation='relu',
                                        name=f'hidden_{i}'))
    if config.model.dropout:
      layers.append(tf.keras.layers.Dropout(config.model.dropout,
                                            name=f'dropout_{i}'))
  return layers


def _output_layer(config):
  units, activation, name = output_spec(config)
  return tf.keras.layers.Dense(units, activation=activation, name=name)


def sequential_model(config, columns):
  return tf.keras.Sequential(
      [tf.keras.layers.DenseFeatures(columns.deep, name='deep_inputs'),
       CrossLayer(name='cross')] + _hidden_layers(config) +
      [_output_layer(config)], name='sequential_deep_cross')


def keras_inputs(feature_spec, names):
  """A tf.keras.Input per transformed feature, shaped as parsing makes it."""
  inputs = {}
  for name in names:
    spec = feature_spec[name]
    if isinstance(spec, tf.io.VarLenFeature):
      inputs[name] = tf.keras.Input(shape=(None,), sparse=True, name=name,
                                    dtype=spec.dtype)
    else:
      inputs[name] = tf.keras.Input(shape=tuple(spec.shape), name=name,
                                    dtype=spec.dtype)
  return inputs


def input_names(config, feature_spec):
  """Transformed features the model reads (tf-idf weights included)."""
  names = []
  for feature in config.features:
    names.append(feature.name)
    if f'{feature.name}_weights' in feature_spec:
      names.append(f'{feature.name}_weights')
  return names


def functional_model(config, columns):
  inputs = keras_inputs(columns.feature_spec,
                        input_names(config, columns.feature_spec))
  net = tf.keras.layers.DenseFeatures(columns.deep, name='deep_inputs')(inputs)
  net = CrossLayer(name='cross')(net)
  for layer in _hidden_layers(config):
    net = layer(net)
  outputs = _output_layer(config)(net)
  return tf.keras.Model(inputs=inputs, outputs=outputs,
                        name='functional_deep_cross')


class DeepCrossModel(tf.keras.Model):
  """The same network as a subclassed model."""

  def __init__(self, config, columns, **kwargs):
    super().__init__(name='subclassed_deep_cross', **kwargs)
    self.features_layer = tf.keras.layers.DenseFeatures(columns.deep,
                                                        name='deep_inputs')
    self.cross = CrossLayer(name='cross')
    self.hidden = _hidden_layers(config)
    self.out = _output_layer(config)

  def call(self, features, training=None):
    net = self.cross(self.features_layer(features))
    for layer in self.hidden:
      net = layer(net, training=training)
    return self.out(net)


def compile_model(model, config):
  """Loss, metrics and optimizer for the label's task (legacy optimizers)."""
  from estimators import models  # pylint: disable=g-import-not-at-top
  task = config.label.task
  optimizer = models.optimizer_fn(config.model.optimizer,
                                  config.model.learning_rate,
                                  config.train.learning_rate_schedule)()
  m = tf.keras.metrics
  if task == 'binary':
    loss = 'binary_crossentropy'
    metrics = [m.BinaryAccuracy(name='accuracy'), m.AUC(name='auc'),
               m.Precision(name='precision'), m.Recall(name='recall')]
  elif task == 'multiclass':
    loss = 'sparse_categorical_crossentropy'
    metrics = [m.SparseCategoricalAccuracy(name='accuracy')]
  else:
    loss = 'mse'
    metrics = [m.RootMeanSquaredError(name='rmse'),
               m.MeanAbsoluteError(name='mae')]
  model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
  return model
