"""The Estimators that `model.type` selects.

  baseline, linear, dnn, wide_deep  canned Estimators (Classifier or Regressor
                                    by `label.task`)
  custom                            `custom_model_fn` below (or the user
                                    module's `model_fn`)
  keras                             a Keras model (`keras_models`, or the user
                                    module's `build_keras_model`) wrapped with
                                    `tf.keras.estimator.model_to_estimator`

How the label reaches each kind (`label_format`): canned Estimators get the
class names and `label_vocabulary`, so their exports answer with the
configured class names; the custom model_fn gets the class index and adds the
names itself; Keras models get the index shaped [batch, 1].

Every kind exports the canned heads' signatures: the custom model_fn through
`heads.estimator_spec` from its logits, Keras Estimators from the model's
output (`_with_canned_exports`). Heads and optimizers have modules of their
own (heads.py, optimizers.py) because users' model_fns call them too.
"""

import logging

import tensorflow as tf

from estimators import heads
from estimators import keras_models
from estimators import optimizers
from pipeline import modules
from pipeline.errors import UserError

log = logging.getLogger('estpipe')

CANNED = ('baseline', 'linear', 'dnn', 'wide_deep')


def label_format(config):
  if config.model.type in CANNED:
    return 'names'
  if config.model.type == 'keras':
    return 'keras'
  return 'index'


# --- building the Estimator ---------------------------------------------------

def build(config, columns, run_config):
  """The Estimator for `config.model`, in run_config.model_dir.

  Warm starts are not set here: hooks.with_progress wraps every Estimator
  and applies train.warm_start_from to all kinds alike.
  """
  kind = config.model.type
  if kind in CANNED:
    return _canned(config, columns, run_config)
  if kind == 'custom':
    return _custom(config, columns, run_config)
  return _keras(config, columns, run_config)


def _canned(config, columns, run_config):
  model, task = config.model, config.label.task
  deep_opt = optimizers.optimizer_for(config, model.optimizer,
                                      model.learning_rate)
  linear_opt = optimizers.optimizer_for(config, model.linear_optimizer,
                                        model.linear_learning_rate)
  common = {'config': run_config}
  if task == 'regression':
    common['label_dimension'] = 1
  else:
    common['n_classes'] = config.label.n_classes
    common['label_vocabulary'] = config.label.vocabulary
  est = tf.estimator
  classify = task != 'regression'
  if model.type == 'baseline':
    cls = est.BaselineClassifier if classify else est.BaselineRegressor
    return cls(optimizer=deep_opt, **common)
  if model.type == 'linear':
    cls = est.LinearClassifier if classify else est.LinearRegressor
    return cls(feature_columns=columns.wide, optimizer=linear_opt, **common)
  if model.type == 'dnn':
    cls = est.DNNClassifier if classify else est.DNNRegressor
    return cls(hidden_units=model.hidden_units, feature_columns=columns.deep,
               optimizer=deep_opt, dropout=model.dropout, **common)
  cls = (est.DNNLinearCombinedClassifier if classify else
         est.DNNLinearCombinedRegressor)
  return cls(linear_feature_columns=columns.wide, linear_optimizer=linear_opt,
             dnn_feature_columns=columns.deep, dnn_optimizer=deep_opt,
             dnn_hidden_units=model.hidden_units, dnn_dropout=model.dropout,
             **common)


def _custom(config, columns, run_config):
  if config.model.module:
    user_fn = load_user_function(config, 'model_fn')
    # The user's model_fn gets what it needs to build on ours: the pipeline
    # config and the feature columns, in params.
    params = {'pipeline_config': config, 'wide_columns': columns.wide,
              'deep_columns': columns.deep}
    return tf.estimator.Estimator(model_fn=user_fn, config=run_config,
                                  params=params)

  def model_fn(features, labels, mode):
    return custom_model_fn(features, labels, mode, config, columns)

  return tf.estimator.Estimator(model_fn=model_fn, config=run_config)


def _keras(config, columns, run_config):
  # Keras initializes weights eagerly, before the Estimator's graph seed.
  tf.random.set_seed(config.train.seed)
  custom_objects = dict(keras_models.CUSTOM_OBJECTS)
  if config.model.module:
    builder = load_user_function(config, 'build_keras_model')
    model = builder(config, columns)
    if not isinstance(model, tf.keras.Model):
      raise UserError(f'{config.model.module}: build_keras_model returned '
                      f'{type(model).__name__}, expected a tf.keras.Model')
    module = modules.load_module(config.model.module, 'model.module')
    custom_objects.update(getattr(module, 'CUSTOM_OBJECTS', {}))
  else:
    model = keras_models.build(config, columns)
  if model.optimizer is None:
    keras_models.compile_model(model, config)
  # Subclassed models have no graph to map variable names from: their
  # checkpoints must be name-based (Saver) checkpoints.
  subclassed = not getattr(model, '_is_graph_network', False)
  estimator = tf.keras.estimator.model_to_estimator(
      keras_model=model, config=run_config, custom_objects=custom_objects,
      checkpoint_format='saver' if subclassed else 'checkpoint')
  return _with_canned_exports(estimator, config)


def _with_canned_exports(estimator, config):
  """The Keras Estimator, exporting the canned heads' signatures.

  model_to_estimator exports one PredictOutput of the model's outputs as
  `serving_default`. In PREDICT mode this adds the canned predictions of the
  model's output (`_keras_predictions`) and exports them as the custom
  model_fn does (`heads.export_outputs`): `serving_default`, `classification` /
  `regression` and `predict`. TRAIN and EVAL are left as they are, so the
  graph, the variable names and the checkpoints do not change; the Keras
  Estimator's warm start (the Keras model's initial weights) is kept.
  """
  inner = estimator.model_fn
  pipeline_config = config

  def model_fn(features, labels, mode, config):  # pylint: disable=redefined-outer-name
    spec = inner(features, labels, mode, config)
    if mode != tf.estimator.ModeKeys.PREDICT:
      return spec
    predictions = _keras_predictions(pipeline_config, spec.predictions)
    if predictions is None:
      return spec
    return spec._replace(
        predictions=predictions,
        export_outputs=heads.export_outputs(pipeline_config.label.task,
                                            predictions))

  return tf.estimator.Estimator(
      model_fn=model_fn, model_dir=estimator.model_dir,
      config=estimator.config,
      warm_start_from=estimator._warm_start_settings)  # pylint: disable=protected-access


def _keras_predictions(config, outputs):
  """A Keras model's outputs plus the canned predictions of its output.

  The one output is read as the label task's Keras output layer makes it
  (`keras_models.output_spec`): the positive class probability [batch, 1]
  (binary), the class probabilities [batch, n_classes] (multiclass), the
  value (regression). The Keras output keys stay; the canned keys win where
  they coincide. None, with a warning, for a model that has several outputs
  or another shape: its export keeps Keras's predict-only signature.
  """
  if not isinstance(outputs, dict) or len(outputs) != 1:
    log.warning('Keras model with outputs %s: exporting the predict '
                'signature only (classify and regress need one output)',
                sorted(outputs) if isinstance(outputs, dict) else outputs)
    return None
  (name, output), = outputs.items()
  output = tf.cast(output, tf.float32)
  if output.shape.rank == 1:
    output = tf.expand_dims(output, 1)
  width = (config.label.n_classes if config.label.task == 'multiclass'
           else 1)
  if output.shape.rank != 2 or output.shape[1] != width:
    log.warning('Keras model output %r has shape %s, not [batch, %d] for a '
                '%s label: exporting the predict signature only', name,
                output.shape, width, config.label.task)
    return None
  predictions = dict(outputs)
  predictions.update(heads.output_predictions(config, output))
  return predictions


def feature_transform(config, columns):
  """What the Estimator's model_fn does to features before the model, or None.

  The built-in Sequential Keras model reads one packed tensor (see
  keras_models.PackedDenseFeatures); packing inside the model_fn keeps
  training, evaluation and exported SavedModels on the same input.
  """
  if (config.model.type == 'keras' and not config.model.module and
      config.model.keras_style == 'sequential'):
    names, _ = keras_models.packed_features(config, columns.feature_spec)
    return lambda features: keras_models.pack_features(features, names)
  return None


# --- the project's own model_fn -------------------------------------------------

def custom_model_fn(features, labels, mode, config, columns):
  """A deep tower over embeddings, in Keras layers, as a model_fn.

  Returns an EstimatorSpec for TRAIN, EVAL and PREDICT with the same
  predictions, export signatures and metrics as the canned Estimators.
  """
  model = config.model
  training = mode == tf.estimator.ModeKeys.TRAIN
  net = tf.keras.layers.DenseFeatures(columns.deep, name='deep_inputs')(
      features)
  for i, units in enumerate(model.hidden_units):
    net = tf.keras.layers.Dense(units, activation='relu',
                                name=f'hidden_{i}')(net)
    if model.dropout:
      net = tf.keras.layers.Dropout(model.dropout)(net, training=training)
  n_logits = 1 if config.label.task in ('binary', 'regression') else (
      config.label.n_classes)
  logits = tf.keras.layers.Dense(n_logits, name='logits')(net)
  optimizer = optimizers.optimizer_for(config, model.optimizer,
                                       model.learning_rate)
  return heads.estimator_spec(config, mode, logits, labels, optimizer)


# --- user modules ----------------------------------------------------------------

_USER_FUNCTIONS = {
    'model_fn': 'model_fn(features, labels, mode, params, config) for '
                'model.type custom',
    'build_keras_model': 'build_keras_model(config, columns) for model.type '
                         'keras',
}


def load_user_function(config, name):
  return modules.load_function(config.model.module, 'model.module', name,
                               _USER_FUNCTIONS[name])
