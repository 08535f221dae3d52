"""SavedModel exports of natively trained Keras models, to the same contract.

The Estimator exports (serving/export.py) come from a receiver fn and
`export_saved_model`; a model trained with `model.fit` has no Estimator, so
this module writes the same SavedModel with `tf.function` signatures and
`tf.saved_model.save`:
  - `serving_default`, `classification` / `regression` (input `inputs`) and
    `predict` (input `examples`): serialized raw tf.Example in;
  - `raw:predict`: one tensor per raw feature (numbers float64 with NaN for
    missing, strings with '' for missing);
the same output keys (pipeline/signatures.py), the tf.Transform graph inside
(`TFTransformOutput.transform_features_layer()`), the required-features
assertion, `assets.extra/estpipe_export.json` and the warmup file, published
into RUN_DIR/export/<version> as every export is.

`tf.saved_model.save` writes every signature with the predict method; the
classify and regress signatures get their method names afterwards (TF Serving
and the model server dispatch `:classify` / `:regress` on them).

Raw features whose names are not valid Python identifiers keep their names
in the SignatureDef (`raw:predict` input 'a-b', what TF Serving and `estpipe
serve` read); only Python's `loaded.signatures['raw:predict']` callable takes
the keyword `a_b`, as `tf.function` sanitizes parameter names.

It never imports estimators/: the trainer hands over `predict_fn`, a
callable from the transformed features (label removed) to the model's one
output (`keras_models.output_spec`).
"""

import logging
import os

import tensorflow as tf

from pipeline import runrecord
from pipeline import signatures
from serving import export

log = logging.getLogger('estpipe')


def output_predictions(config, output):
  """The canned predictions (without logits) of a model's output.

  `output`: the positive class probability [batch, 1] (binary), the class
  probabilities [batch, n_classes] (multiclass), the value [batch, 1]
  (regression). The one definition Estimator heads (estimators/heads.py) and
  native exports share.
  """
  task = config.label.task
  if task == 'regression':
    return {signatures.PREDICTIONS: output}
  if task == 'binary':
    logistic = output
    probabilities = tf.concat([1.0 - logistic, logistic], axis=1)
    predictions = {signatures.LOGISTIC: logistic}
  else:
    probabilities = output
    predictions = {}
  class_ids = tf.argmax(probabilities, axis=1)
  names = tf.constant(config.label.vocabulary)
  batch = tf.shape(probabilities)[0]
  predictions.update({
      signatures.PROBABILITIES: probabilities,
      signatures.CLASS_IDS: tf.expand_dims(class_ids, 1),
      signatures.CLASSES: tf.expand_dims(tf.gather(names, class_ids), 1),
      signatures.ALL_CLASS_IDS: tf.tile(
          tf.expand_dims(tf.range(config.label.n_classes), 0), [batch, 1]),
      signatures.ALL_CLASSES: tf.tile(tf.expand_dims(names, 0), [batch, 1]),
  })
  return predictions


def model_output(output):
  """A model's output as [batch, width] float32."""
  output = tf.cast(output, tf.float32)
  if output.shape.rank == 1:
    output = tf.expand_dims(output, 1)
  return output


class ServingModule(tf.Module):
  """The model, the transform layer and the serving functions over them."""

  def __init__(self, config, model, predict_fn):
    super().__init__()
    import tensorflow_transform as tft  # pylint: disable=g-import-not-at-top
    # The model's variables, not the Keras model: saving a Keras model
    # inside traces every layer for Keras's own loader (seconds), which
    # these signatures do not need.
    self.model_variables = list(model.variables)
    self.transform = tft.TFTransformOutput(
        config.rundir.transform).transform_features_layer()
    self._config = config
    self._predict_fn = predict_fn
    self._spec = export.serving_feature_spec(config)
    self._missing = list(config.data.missing)
    self._required = set(export.required_features(config))

  def predictions(self, raw_inputs):
    """Dense raw inputs [batch] -> the canned predictions."""
    raw_features = export.sparsify_raw(raw_inputs, self._spec, self._missing,
                                       self._required)
    transformed = self.transform(raw_features)
    features = {k: v for k, v in transformed.items()
                if k != self._config.label.name}
    output = model_output(self._predict_fn(features))
    return output_predictions(self._config, output)

  def parse(self, serialized):
    """Serialized raw tf.Example -> dense raw inputs, as the receiver does."""
    return export.parse_raw_examples(serialized, self._spec)

  def raw_specs(self):
    return {name: tf.TensorSpec([None], export.raw_input_dtype(spec.dtype),
                                name=name)
            for name, spec in sorted(self._spec.items())}


def serving_signatures(module, config):
  """{signature key: concrete function} of the export contract.

  The transform and the model are traced once, as one function of the dense
  raw inputs that every signature calls; `serving_default` is the same
  function as the signature it stands for.
  """
  task = config.label.task
  core = tf.function(module.predictions,
                     input_signature=[module.raw_specs()])

  def outputs_of(key):
    return lambda predictions: signatures.signature_outputs(
        task, predictions)[key][1]

  def on_examples(key, input_name):
    pick = outputs_of(key)

    def fn(serialized):
      return pick(core(module.parse(serialized)))
    return tf.function(fn).get_concrete_function(
        tf.TensorSpec([None], tf.string, name=input_name))

  result = {}
  result[signatures.PREDICT_SIGNATURE] = on_examples(
      signatures.PREDICT_SIGNATURE, signatures.EXAMPLES_INPUT)
  sources = signatures.output_sources(task)
  for key in sources:
    if key != signatures.DEFAULT_SIGNATURE:
      result[key] = on_examples(key, signatures.CLASSIFY_INPUTS)
  default = next(key for key, value in sources.items()
                 if key != signatures.DEFAULT_SIGNATURE and
                 value == sources[signatures.DEFAULT_SIGNATURE])
  result[signatures.DEFAULT_SIGNATURE] = result[default]
  predict = outputs_of(signatures.PREDICT_SIGNATURE)
  result[signatures.RAW_SIGNATURE] = tf.function(
      lambda raw: predict(core(raw))).get_concrete_function(
          module.raw_specs())
  return result


def set_method_names(path, config):
  """Gives the classify / regress signatures their TF Serving methods."""
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  pb_path = os.path.join(path, 'saved_model.pb')
  saved_model = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(pb_path, 'rb') as f:
    saved_model.ParseFromString(f.read())
  methods = {key: method for key, (method, _) in
             signatures.output_sources(config.label.task).items()}
  for meta_graph in saved_model.meta_graphs:
    for key, signature_def in meta_graph.signature_def.items():
      if key in methods:
        signature_def.method_name = methods[key]
  with tf.io.gfile.GFile(pb_path, 'wb') as f:
    f.write(saved_model.SerializeToString())


def export_keras_model(config, model, predict_fn, checkpoint, global_step,
                       exporter='final', metrics=None):
  """Exports a trained Keras model to RUN_DIR/export/<version>; its path.

  `checkpoint`: the TF-format weights it was trained to (the metadata names
  it; verify-export restores the model from it).
  """
  module = ServingModule(config, model, predict_fn)
  fns = serving_signatures(module, config)
  with runrecord.staging_dir(config.run_dir, 'export') as staging:
    written = os.path.join(staging, 'saved_model')
    tf.saved_model.save(module, written, signatures=fns)
    set_method_names(written, config)
    target = export.publish_export(
        config, written, exporter=exporter, trainer=config.train.trainer,
        checkpoint=checkpoint, global_step=global_step, metrics=metrics)
  log.info('exported %s (%s) to %s', checkpoint, exporter, target)
  return target
