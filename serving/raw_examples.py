"""Raw rows as serving inputs: tf.Examples and raw-feature tensors.

Rows are parsed by preprocessing.rows.RowParser (the one place that knows
CSV and tf.Example records, missing tokens and rejects); this module only
turns its typed values (None where missing) into what the exported
signatures take. Picklable helpers only: Beam workers use them.
"""

import math

from pipeline import fs
from preprocessing import rows as rows_lib


def row_parser(config, required=(), key_column=None):
  """A parser for raw serving rows: the features, no label needed; a row
  without one of the `required` features (an export's, see
  serving.export.required_features) is a reject. With `key_column`, the
  row's key comes last in its values."""
  return rows_lib.RowParser(config, with_label=False, required=required,
                            key_column=key_column)


def to_example(parser, values):
  """Typed feature values (None = missing) -> serialized tf.Example.

  A missing value is an absent feature, as in a VarLen raw column.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  features = {}
  for column, value in zip(parser.columns, values):
    if value is None:
      continue
    if column.kind == 'integer':
      feature = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    elif column.kind == 'float':
      feature = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
    else:
      feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    features[column.name] = feature
  return tf.train.Example(features=tf.train.Features(
      feature=features)).SerializeToString()


def to_raw_instance(parser, values):
  """Typed values -> one JSON-friendly instance for the raw signature.

  Missing strings become '' and missing numbers NaN, the raw signature's
  missing markers (see serving.export).
  """
  instance = {}
  for column, value in zip(parser.columns, values):
    if column.kind in ('integer', 'float'):
      instance[column.name] = math.nan if value is None else float(value)
    else:
      instance[column.name] = '' if value is None else value.decode('utf-8')
  return instance


def raw_tensors(parser, instances):
  """Instances -> {feature: tensor} for the raw-feature signature."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tensors = {}
  for column in parser.columns:
    values = [i[column.name] for i in instances]
    dtype = tf.float64 if column.kind in ('integer', 'float') else tf.string
    tensors[column.name] = tf.constant(values, dtype=dtype)
  return tensors


def eval_rows(config, parser, limit=None):
  """The raw eval split, row by row: (location, raw, values-or-Reject).

  The same rows preprocessing put in the eval split: the eval files, or the
  training files' rows that the stable hash assigns to eval.
  """
  data = config.data
  split_by_hash = not data.eval_patterns
  patterns = data.train_patterns if split_by_hash else data.eval_patterns
  files = fs.expand_patterns(
      patterns, 'data.train' if split_by_hash else 'data.eval')
  count = 0
  for path in files:
    for number, raw, result in parser.read_file(path):
      if split_by_hash and not rows_lib.is_eval_row(raw, data.eval_fraction):
        continue
      yield f'{path}:{number}', raw, result
      count += 1
      if limit and count >= limit:
        return
