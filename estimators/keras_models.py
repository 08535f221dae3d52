"""Keras models for `model.type: keras`, in the three Keras styles.

All three take the dict of transformed features, turn it into one dense
vector with the deep feature columns (`DenseFeatures`), apply a `CrossLayer`
(a custom layer: explicit feature crosses, as in Deep & Cross networks), then
the hidden layers. The output layer is named like the canned predictions
(pipeline/signatures.py): `logistic` (binary), `probabilities` (multiclass),
`predictions` (regression).
"""

import tensorflow as tf

from estimators import optimizers
from pipeline import signatures
from pipeline.errors import ConfigError


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


def output_spec(config):
  """(units, activation, name) of the output layer for the label's task."""
  task = config.label.task
  if task == 'binary':
    return 1, 'sigmoid', signatures.LOGISTIC
  if task == 'multiclass':
    return config.label.n_classes, 'softmax', signatures.PROBABILITIES
  return 1, None, signatures.PREDICTIONS


def build(config, columns):
  """The built-in Keras model in `config.model.keras_style`."""
  style = config.model.keras_style
  if style == 'sequential':
    return sequential_model(config, columns)
  if style == 'functional':
    return functional_model(config, columns)
  return subclassed_model(config, columns)


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


@tf.keras.utils.register_keras_serializable(package='estpipe')
class PackedDenseFeatures(tf.keras.layers.DenseFeatures):
  """DenseFeatures over one packed [batch, n] float tensor of features.

  A Sequential model takes one tensor, and model_to_estimator clones it from
  that tensor: the scalar transformed features are packed in order
  (`pack_features`) and unpacked here, ids cast back to integers.
  """

  def __init__(self, feature_columns, packed_names, packed_dtypes, **kwargs):
    super().__init__(feature_columns, **kwargs)
    self.packed_names = list(packed_names)
    self.packed_dtypes = list(packed_dtypes)

  def call(self, packed, training=None):
    columns = tf.unstack(packed, num=len(self.packed_names), axis=1)
    features = {name: tf.cast(column, dtype) for name, column, dtype in
                zip(self.packed_names, columns, self.packed_dtypes)}
    return super().call(features, training=training)

  def get_config(self):
    config = super().get_config()
    config.update({'packed_names': self.packed_names,
                   'packed_dtypes': self.packed_dtypes})
    return config


PACKED_KEY = 'packed_features'


def packed_features(config, feature_spec):
  """(names, dtype names) of the features a Sequential model reads, packed."""
  names, dtypes = [], []
  for name in input_names(config, feature_spec):
    spec = feature_spec[name]
    if not isinstance(spec, tf.io.FixedLenFeature) or spec.shape:
      raise ConfigError('model.keras_style', f'a sequential Keras model '
                        f'reads scalar features only; {name!r} is not: use '
                        'keras_style functional or subclassed')
    if spec.dtype == tf.string:
      raise ConfigError('model.keras_style', f'a sequential Keras model '
                        f'reads numbers only; {name!r} is a string: use '
                        'keras_style functional or subclassed')
    names.append(name)
    dtypes.append(spec.dtype.name)
  return names, dtypes


def pack_features(features, names):
  """The features dict as {PACKED_KEY: [batch, n] float32}, in `names` order.

  Integer ids stay exact in float32 below 2**24.
  """
  columns = [tf.reshape(tf.cast(features[name], tf.float32), [-1])
             for name in names]
  return {PACKED_KEY: tf.stack(columns, axis=1)}


def sequential_model(config, columns):
  names, dtypes = packed_features(config, columns.feature_spec)
  return tf.keras.Sequential(
      [tf.keras.Input(shape=(len(names),), name=PACKED_KEY),
       PackedDenseFeatures(columns.deep, names, dtypes, name='deep_inputs'),
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


@tf.keras.utils.register_keras_serializable(package='estpipe')
class DeepCrossModel(tf.keras.Model):
  """The same network as a subclassed model.

  model_to_estimator rebuilds a subclassed model in the Estimator's graph
  with `from_config(get_config())`, so the config carries everything,
  feature columns included (through the DenseFeatures layer's config).
  """

  def __init__(self, features_layer, hidden_units, dropout, output_units,
               output_activation, output_name, **kwargs):
    super().__init__(**kwargs)
    if isinstance(features_layer, dict):
      features_layer = tf.keras.layers.deserialize(features_layer)
    self.features_layer = features_layer
    self.hidden_units = list(hidden_units)
    self.dropout = dropout
    self.output_units = output_units
    self.output_activation = output_activation
    self.output_name = output_name
    self.cross = CrossLayer(name='cross')
    self.hidden = []
    for i, units in enumerate(self.hidden_units):
      self.hidden.append(tf.keras.layers.Dense(units, activation='relu',
                                               name=f'hidden_{i}'))
      if dropout:
        self.hidden.append(tf.keras.layers.Dropout(dropout,
                                                   name=f'dropout_{i}'))
    self.out = tf.keras.layers.Dense(output_units,
                                     activation=output_activation,
                                     name=output_name)

  def call(self, features, training=None):
    net = self.cross(self.features_layer(features))
    for layer in self.hidden:
      net = layer(net, training=training)
    return self.out(net)

  def get_config(self):
    return {'features_layer': tf.keras.layers.serialize(self.features_layer),
            'hidden_units': self.hidden_units, 'dropout': self.dropout,
            'output_units': self.output_units,
            'output_activation': self.output_activation,
            'output_name': self.output_name, 'name': self.name}

  @classmethod
  def from_config(cls, config, custom_objects=None):
    return cls(**config)


def subclassed_model(config, columns):
  units, activation, name = output_spec(config)
  return DeepCrossModel(
      tf.keras.layers.DenseFeatures(columns.deep, name='deep_inputs'),
      config.model.hidden_units, config.model.dropout, units, activation,
      name, name='subclassed_deep_cross')


CUSTOM_OBJECTS = {'CrossLayer': CrossLayer,
                  'PackedDenseFeatures': PackedDenseFeatures,
                  'DeepCrossModel': DeepCrossModel}


def compile_model(model, config):
  """Loss, metrics and optimizer for the label's task (legacy optimizers)."""
  task = config.label.task
  optimizer = optimizers.optimizer_for(config, config.model.optimizer,
                                       config.model.learning_rate)()
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
