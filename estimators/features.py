"""Feature columns for every model type, built from the transformed metadata.

This is the one place that maps transformed features to feature columns.
Sizes (vocabulary ids, buckets, hash buckets, text ids) come from the
transformed schema that tf.Transform wrote, never from the config again, so a
model always agrees with the data it reads.

  - numeric features (z_score, scale_0_1, log, numeric identity): a
    numeric_column in both parts, and in the wide part also its buckets
    (`model.wide_numeric_buckets`; not for identity, whose scale is unknown).
  - categorical ids (vocabulary, bucketize, hash): an identity column; the
    wide part uses it as is, the deep part one-hot (small) or embedded.
  - text: the sparse term ids (tf-idf weighted when the text_output is
    tfidf); the deep part embeds them with a sqrtn combiner.
  - string identity: hashed (`model.string_hash_buckets`).
  - crosses (`model.crosses`): crossed columns in the wide part only.
"""

import collections

import tensorflow as tf

from pipeline.errors import ConfigError

CATEGORICAL_TRANSFORMS = ('vocabulary', 'bucketize', 'hash')

# Bucket boundaries for numeric features that take part in a cross: the
# transform fixes their scale, so fixed boundaries make sensible buckets.
_Z_SCORE_BOUNDARIES = [-1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5]
_UNIT_BOUNDARIES = [i / 10.0 for i in range(1, 10)]
_LOG_BOUNDARIES = [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0,
                   11.0, 12.0]

FeatureColumns = collections.namedtuple(
    'FeatureColumns',
    ['wide', 'deep', 'categorical', 'numeric', 'feature_spec'])


def build_feature_columns(config, tft_output):
  """Returns the FeatureColumns for `config`.

  `wide` and `deep` are the column lists of the two model parts;
  `categorical` and `numeric` map a feature name to its column, for model
  code that needs one feature's column; `feature_spec` is the transformed
  feature spec (label included) that the columns read.
  """
  spec = tft_output.transformed_feature_spec()
  wide, deep = [], []
  categorical, numeric = {}, {}
  for feature in config.features:
    _check_in_spec(feature.name, spec)
    kind = feature_kind(feature, spec)
    if kind == 'numeric':
      column = tf.feature_column.numeric_column(feature.name)
      numeric[feature.name] = column
      wide.append(column)
      deep.append(column)
      if config.model.wide_numeric_buckets:
        bucketized = _bucketized(feature, column, strict=False)
        if bucketized is not None:
          # A linear model cannot bend a numeric input: its buckets can.
          wide.append(bucketized)
      continue
    column, size = _categorical_column(feature, kind, spec, tft_output,
                                       config.model)
    categorical[feature.name] = column
    wide.append(column)
    deep.append(_deep_column(column, size, kind, config.model))
  for cross in config.model.crosses:
    wide.append(_crossed_column(cross, config, categorical, numeric,
                                tft_output))
  return FeatureColumns(wide, deep, categorical, numeric, spec)


def feature_kind(feature, spec):
  """numeric | categorical | text | string, from the config and the spec."""
  if feature.transform == 'text':
    return 'text'
  if feature.transform in CATEGORICAL_TRANSFORMS:
    return 'categorical'
  if spec[feature.name].dtype == tf.string:
    return 'string'
  return 'numeric'


def _check_in_spec(name, spec):
  if name not in spec:
    raise ConfigError('features', f'{name!r} is not in the transformed data '
                      '(was the run directory preprocessed with this '
                      'feature list?)')


def _num_ids(tft_output, name):
  """Number of ids of a transformed categorical feature, from its schema."""
  try:
    return int(tft_output.num_buckets_for_transformed_feature(name))
  except ValueError as e:
    raise ConfigError('features', f'the transformed schema has no id range '
                      f'for {name!r}: {e}')


def _categorical_column(feature, kind, spec, tft_output, model):
  """(categorical column, number of ids) for one non-numeric feature."""
  name = feature.name
  fc = tf.feature_column
  if kind == 'string':
    size = model.string_hash_buckets
    return fc.categorical_column_with_hash_bucket(name, size), size
  size = _num_ids(tft_output, name)
  column = fc.categorical_column_with_identity(name, num_buckets=size)
  weights = f'{name}_weights'
  if kind == 'text' and feature.text_output == 'tfidf' and weights in spec:
    column = fc.weighted_categorical_column(column, weights)
  return column, size


def _deep_column(column, size, kind, model):
  fc = tf.feature_column
  if kind != 'text' and size <= model.max_indicator_size:
    return fc.indicator_column(column)
  # Text is a bag of ids: average them so long texts do not dominate.
  combiner = 'sqrtn' if kind == 'text' else 'mean'
  return fc.embedding_column(column, dimension=model.embedding_dim,
                             combiner=combiner)


def _crossed_column(cross, config, categorical, numeric, tft_output):
  keys, size = [], 1
  for name in cross:
    if name in numeric:
      column = _bucketized(config.feature(name), numeric[name])
      size *= len(column.boundaries) + 1
    elif name in categorical and config.feature(name).transform != 'text':
      column = categorical[name]
      size *= column.num_buckets
    else:
      raise ConfigError('model.crosses', f'{name!r} cannot be crossed: only '
                        'numeric and categorical (vocabulary, bucketize, '
                        'hash) features can')
    keys.append(column)
  buckets = int(min(size, config.model.cross_buckets))
  return tf.feature_column.crossed_column(keys, hash_bucket_size=buckets)


def _bucketized(feature, column, strict=True):
  """Buckets of a transformed numeric feature (None if its scale is unknown
  and not `strict`)."""
  boundaries = {'z_score': _Z_SCORE_BOUNDARIES,
                'scale_0_1': _UNIT_BOUNDARIES,
                'log': _LOG_BOUNDARIES}.get(feature.transform)
  if boundaries is None and not strict:
    return None
  if boundaries is None:
    raise ConfigError('model.crosses', f'{feature.name!r} ({feature.transform}'
                      ') has no known scale to bucketize for a cross; use '
                      'z_score, scale_0_1, log or bucketize')
  return tf.feature_column.bucketized_column(column, boundaries)
