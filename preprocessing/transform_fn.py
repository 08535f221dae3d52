"""The generated `preprocessing_fn`: one transform per configured feature.

A user module may replace it (`preprocessing.module`), as TFX module files
do; it can reuse the pieces here (`fill_missing`, `transform_feature`).
"""

import inspect

import tensorflow as tf
import tensorflow_transform as tft
from tensorflow_transform import schema_inference

from pipeline import modules


def build_preprocessing_fn(config):
  """The config's preprocessing_fn, or the user module's."""
  if config.preprocessing.module:
    return _user_preprocessing_fn(config)

  def preprocessing_fn(inputs):
    outputs = {}
    for feature in config.features:
      x = inputs[feature.name]
      if _mode_is_first_id(feature):
        ids = _dense(_vocabulary(x, feature), 0)
        outputs[feature.name] = _annotate_ids(ids, feature)
        continue
      if _statistics_on_present_values(feature, x):
        outputs[feature.name] = _scale_with_present_statistics(feature, x)
        continue
      outputs.update(transform_feature(feature, fill_missing(x, feature)))
    outputs[config.label.name] = _dense(inputs[config.label.name], 0)
    return outputs

  return preprocessing_fn


def _user_preprocessing_fn(config):
  path = config.preprocessing.module
  fn = modules.load_function(path, 'preprocessing.module', 'preprocessing_fn',
                             'preprocessing_fn(inputs) or '
                             'preprocessing_fn(inputs, config)')
  if len(inspect.signature(fn).parameters) == 2:
    return lambda inputs: fn(inputs, config)
  return fn


def _mode_is_first_id(feature):
  # A vocabulary is ordered by frequency, so the most frequent value has id
  # 0: filling missing values with id 0 after the lookup gives the same ids
  # as filling before it, without a second analyzer pass.
  return (feature.transform == 'vocabulary' and
          feature.default == 'most_frequent')


def _statistics_on_present_values(feature, x):
  # A computed default (mean, mode) is an analyzer result; a scaling or
  # bucketizing analyzer over the *filled* values would need it first, and
  # tf.Transform would then make a second pass over the whole training split
  # (held in memory by the runner). Computing the transform's statistics on
  # the values that are present keeps the analysis to one pass.
  return (isinstance(x, tf.SparseTensor) and
          feature.default in ('mean', 'most_frequent') and
          feature.transform in ('z_score', 'scale_0_1', 'bucketize'))


def _scale_with_present_statistics(feature, x):
  values = tf.cast(x.values, tf.float32)
  # One mean analyzer serves both the z-score and a `default: mean` fill.
  mean = tft.mean(values) if feature.transform == 'z_score' else None
  filled = tf.cast(fill_missing(x, feature, mean), tf.float32)
  if feature.transform == 'z_score':
    return tf.math.divide_no_nan(filled - mean, tf.sqrt(tft.var(values)))
  if feature.transform == 'scale_0_1':
    low, high = tft.min(values), tft.max(values)
    return tf.math.divide_no_nan(filled - low, high - low)
  boundaries = tft.quantiles(values, feature.buckets,
                             min(1.0 / feature.buckets, 0.01))
  return tft.apply_buckets(filled, boundaries)


def _dense(x, default):
  """A VarLen input (at most one value per row) -> a dense [batch] tensor."""
  if not isinstance(x, tf.SparseTensor):
    return x
  batch = x.dense_shape[0]
  dense = tf.sparse.to_dense(
      tf.SparseTensor(x.indices, x.values, tf.stack([batch, 1])),
      default_value=tf.cast(default, x.dtype))
  return tf.squeeze(dense, axis=1)


def fill_missing(x, feature, mean=None):
  """Fills missing values with the feature's default (constant or computed).

  `mean`: the float32 tft.mean of the present values, when the caller has
  it already (`default: mean` then adds no analyzer of its own).
  """
  if not isinstance(x, tf.SparseTensor):
    return x
  default = feature.default
  if default == 'mean':
    if mean is None:
      mean = tft.mean(tf.cast(x.values, tf.float32))
    return _dense(x, tf.cast(mean, x.dtype))
  if default == 'most_frequent':
    return _dense(x, _most_frequent(x.values, feature.name))
  if default is None:
    default = '' if x.dtype == tf.string else 0
  return _dense(x, tf.constant(default, dtype=x.dtype) if x.dtype ==
                tf.string else tf.cast(default, x.dtype))


def _most_frequent(values, name):
  """The most frequent value in the training data, as a scalar tensor."""
  as_text = values if values.dtype == tf.string else tf.strings.as_string(
      values, shortest=True) if values.dtype.is_floating else \
      tf.strings.as_string(values)
  path = tft.vocabulary(as_text, top_k=1, vocab_filename=f'{name}__mode')
  table = tf.lookup.StaticHashTable(
      tf.lookup.TextFileInitializer(
          path, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER, tf.string,
          tf.lookup.TextFileIndex.WHOLE_LINE),
      default_value='')
  mode = table.lookup(tf.constant(0, tf.int64))
  if values.dtype == tf.string:
    return mode
  return tf.strings.to_number(mode, out_type=values.dtype)


def transform_feature(feature, x):
  """One dense raw feature -> {output name: transformed tensor}."""
  name, kind = feature.name, feature.transform
  if kind == 'z_score':
    return {name: tft.scale_to_z_score(tf.cast(x, tf.float32))}
  if kind == 'scale_0_1':
    return {name: tft.scale_to_0_1(tf.cast(x, tf.float32))}
  if kind == 'log':
    # log1p keeps zeros (common in money columns) at zero; negatives clip.
    return {name: tf.math.log1p(tf.maximum(tf.cast(x, tf.float32), 0.0))}
  if kind == 'bucketize':
    return {name: tft.bucketize(tf.cast(x, tf.float32), feature.buckets)}
  if kind == 'vocabulary':
    return {name: _vocabulary(x, feature)}
  if kind == 'hash':
    ids = tf.strings.to_hash_bucket_fast(_as_string(x), feature.buckets)
    schema_inference.set_tensor_schema_override(ids, tf.constant(0, tf.int64),
                                                tf.constant(feature.buckets -
                                                            1, tf.int64))
    return {name: ids}
  if kind == 'text':
    return _text(x, feature)
  if feature.type in ('integer', 'float'):
    return {name: tf.cast(x, tf.float32)}
  return {name: x}


def _as_string(x):
  return x if x.dtype == tf.string else tf.strings.as_string(x)


def _vocabulary(x, feature):
  return tft.compute_and_apply_vocabulary(
      x, top_k=feature.top_k, frequency_threshold=feature.frequency_threshold,
      num_oov_buckets=feature.oov_buckets, vocab_filename=feature.name)


def _tokens(x, ngrams):
  """Lower-cased whitespace tokens (and n-grams) as a SparseTensor."""
  tokens = tf.strings.split(tf.strings.lower(x)).to_sparse()
  if ngrams > 1:
    tokens = tft.ngrams(tokens, (1, ngrams), separator=' ')
  return tokens


def _text(x, feature):
  name = feature.name
  if feature.text_output == 'vocabulary':
    return {name: _vocabulary(_tokens(x, 1), feature)}
  if feature.text_output == 'bag_of_words':
    terms = tft.bag_of_words(_tokens(x, 1), (1, feature.ngrams),
                             separator=' ')
    return {name: _vocabulary(terms, feature)}
  index, weights = _tfidf(x, feature)
  _annotate_ids(index.values, feature)
  return {name: index, f'{name}_weights': weights}


# Document frequencies are looked up by term; ' ' (the n-gram separator)
# would split a line of the frequency file, so keys use another character.
_DF_SPACE = '\u2423'


def _tfidf(x, feature):
  """Term ids and tf-idf weights, with a single analysis pass.

  tft.tfidf counts document frequencies of vocabulary *ids*: an analyzer
  over another analyzer's output, which costs a second pass over the
  training split (held in memory by the runner meanwhile). Here document
  frequencies are counted over the terms themselves, in the same pass as
  the vocabulary. Weights follow tft.tfidf's smooth formula:
  tf = count / terms in the document, idf = log((1 + N) / (1 + df)) + 1.
  """
  terms = _tokens(x, feature.ngrams)
  ids = _vocabulary(terms, feature)
  docs = tft.size(tf.ones_like(x, dtype=tf.int64))
  unique_terms = tft.bag_of_words(_tokens(x, 1), (1, feature.ngrams),
                                  separator=' ')
  df_path = tft.vocabulary(_df_key(unique_terms.values), store_frequency=True,
                           vocab_filename=f'{feature.name}__df')
  df_table = tf.lookup.StaticHashTable(
      tf.lookup.TextFileInitializer(df_path, tf.string, 1, tf.int64, 0,
                                    delimiter=' '),
      default_value=0)
  df = df_table.lookup(_df_key(terms.values))

  # One entry per distinct (document, id): its count and document frequency.
  rows = terms.indices[:, 0]
  width = tf.reduce_max(tf.concat([ids.values, [0]], 0)) + 1
  keys = rows * width + ids.values
  unique_keys, position, counts = tf.unique_with_counts(keys)
  order = tf.argsort(unique_keys)
  unique_keys = tf.gather(unique_keys, order)
  counts = tf.gather(counts, order)
  term_df = tf.gather(tf.math.unsorted_segment_max(
      df, position, tf.size(unique_keys)), order)
  doc_rows = unique_keys // width
  doc_ids = unique_keys % width
  doc_length = tf.gather(tf.math.bincount(
      tf.cast(rows, tf.int32), minlength=tf.shape(x)[0], dtype=tf.int64),
                         doc_rows)
  term_frequency = tf.cast(counts, tf.float32) / tf.cast(doc_length,
                                                         tf.float32)
  idf = tf.math.log((1.0 + tf.cast(docs, tf.float32)) /
                    (1.0 + tf.cast(term_df, tf.float32))) + 1.0
  index = tf.RaggedTensor.from_value_rowids(
      doc_ids, doc_rows, nrows=tf.cast(tf.shape(x)[0], tf.int64)).to_sparse()
  weights = tf.SparseTensor(index.indices, term_frequency * idf,
                            index.dense_shape)
  return index, weights


def _df_key(terms):
  return tf.strings.regex_replace(terms, ' ', _DF_SPACE)


def _annotate_ids(ids, feature):
  """Records the id range of a vocabulary output in the schema.

  tft annotates the direct output of compute_and_apply_vocabulary; outputs
  derived from it need the range set again so training can read it.
  """
  vocab_size = tft.experimental.get_vocabulary_size_by_name(feature.name)
  schema_inference.set_tensor_schema_override(
      ids, tf.constant(0, tf.int64),
      tf.cast(vocab_size, tf.int64) + feature.oov_buckets - 1)
  return ids
