"""The raw schema: which columns the pipeline reads and their TF types.

Every raw column is a VarLenFeature: a value may be missing, and the
transform graph (not the reader) decides what a missing value becomes, so
training, evaluation and serving fill it the same way.
"""

import tensorflow as tf

_DTYPES = {'integer': tf.int64, 'float': tf.float32, 'string': tf.string,
           'text': tf.string}


def feature_dtype(feature):
  return _DTYPES[feature.type]


def label_dtype(label):
  # Classification labels are stored as class indices (the reader maps the
  # declared values to 0..n-1); regression targets as floats.
  return tf.float32 if label.task == 'regression' else tf.int64


def serving_feature_spec(config):
  """Raw features a client sends: the config's features, no label."""
  return {f.name: tf.io.VarLenFeature(feature_dtype(f))
          for f in config.features}


def raw_feature_spec(config):
  """What preprocessing reads: the features plus the label."""
  spec = serving_feature_spec(config)
  spec[config.label.name] = tf.io.VarLenFeature(label_dtype(config.label))
  return spec


def unfilled_numeric(config):
  """Numeric features that preprocessing fills with 0 when missing: no
  `default` in the config (and the generated preprocessing_fn, not a user
  module, decides the fill)."""
  if config.preprocessing.module:
    return []
  return [f.name for f in config.features
          if f.is_numeric and f.default is None]


def required_features(config, train_missing):
  """Raw features a client must send: numeric, never missing in the
  training split, and no `default` to fill them with.

  Filling such a feature with 0 at serving time would feed the model a
  value it never saw for it. `train_missing` is preprocess.json's
  {feature: missing values in the train split}; None (a run from before
  the counts were kept) requires nothing.
  """
  if not isinstance(train_missing, dict):
    return []
  return sorted(name for name in unfilled_numeric(config)
                if train_missing.get(name) == 0)


def raw_schema(config):
  from tensorflow_transform.tf_metadata import schema_utils  # pylint: disable=g-import-not-at-top
  return schema_utils.schema_from_feature_spec(raw_feature_spec(config))
