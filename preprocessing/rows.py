"""Raw rows: parse, check and batch them, sending bad rows to rejects.

This is the one place that understands raw records (CSV lines and tf.Example
records). A row either becomes typed values (None where missing) or a reject
that names the file, the line or record number, the field and the reason,
with the raw text, so that nothing is dropped silently.
"""

import ast
import base64
import csv
import hashlib
import math
import operator

import numpy as np
import pyarrow as pa

from apache_beam.io.filesystems import FileSystems


class Reject(Exception):
  """A row that cannot be used, and why."""

  def __init__(self, reason, field=None):
    super().__init__(reason)
    self.reason = reason
    self.field = field


class Column:
  """One raw column the pipeline keeps: its name, kind and value parser."""

  def __init__(self, name, kind):
    self.name = name
    self.kind = kind  # integer | float | string | label

  def __repr__(self):
    return f'Column({self.name!r}, {self.kind!r})'


def _parse_integer(text):
  try:
    return int(text)
  except ValueError:
    value = float(text)  # ValueError propagates: not a number at all.
    if not value.is_integer():
      raise
    return int(value)


def _parse_float(text):
  value = float(text)
  if not math.isfinite(value):
    raise ValueError('not a finite number')
  return value


def _parse_text(text):
  return text.encode('utf-8')


_PARSERS = {'integer': _parse_integer, 'float': _parse_float,
            'string': _parse_text, 'text': _parse_text}

_ARROW_TYPES = {'integer': pa.int64(), 'float': pa.float32(),
                'string': pa.large_binary(), 'text': pa.large_binary()}


class RowParser:
  """Turns raw records into typed rows for the configured columns.

  Picklable (it holds only plain config data), so Beam workers can use it.
  """

  def __init__(self, config, with_label=True, required=(), key_column=None):
    self.config = config
    self.with_label = with_label
    # A column whose text keys the row (batch prediction): it comes last in
    # a row's values; a row without one is rejected.
    self.key_column = key_column
    self.columns = [Column(f.name, f.type) for f in config.features]
    # Positions of the features a row must have (an export's required
    # features, for batch prediction and the skew check): a row without
    # one is a reject, as the export would refuse it.
    self.required = [i for i, c in enumerate(self.columns)
                     if c.name in set(required)]
    label = config.label
    self.label_name = label.name
    self.label_task = label.task
    self.label_index = (None if label.expression or label.task == 'regression'
                        else {str(v): i for i, v in enumerate(label.values)})
    self.expression = (_Expression(label.expression) if label.expression
                       else None)
    self.missing = frozenset(config.data.missing)
    self.delimiter = config.data.delimiter

  @property
  def output_names(self):
    names = [c.name for c in self.columns]
    return names + [self.label_name] if self.with_label else names

  def arrow_schema(self):
    fields = [pa.field(c.name, pa.large_list(_ARROW_TYPES[c.kind]))
              for c in self.columns]
    if self.with_label:
      label_type = pa.float32() if self.label_task == 'regression' else \
          pa.int64()
      fields.append(pa.field(self.label_name, pa.large_list(label_type)))
    return pa.schema(fields)

  # --- values -------------------------------------------------------------

  def _value(self, column, text):
    """One CSV field as a typed value, or None if it means missing."""
    text = text.strip()
    if text in self.missing:
      return None
    try:
      return _PARSERS[column.kind](text)
    except ValueError:
      expected = 'an integer' if column.kind == 'integer' else 'a number'
      raise Reject(f'field {column.name!r}: expected {expected}, got '
                   f'{text!r}', column.name)

  def _check_required(self, values):
    for i in self.required:
      if values[i] is None:
        name = self.columns[i].name
        raise Reject(f'field {name!r} is missing, and the model requires it '
                     '(it was never missing in training and has no default)',
                     name)

  def _label(self, text, lookup):
    """The label of a row; `lookup(name)` gives any other raw field."""
    if self.expression:
      return self.expression.evaluate(lookup, self.label_task)
    if text is None or text.strip() in self.missing:
      raise Reject(f'label {self.label_name!r} is missing', self.label_name)
    text = text.strip()
    if self.label_index is None:
      try:
        return _parse_float(text)
      except ValueError:
        raise Reject(f'label {self.label_name!r}: expected a number, got '
                     f'{text!r}', self.label_name)
    try:
      return self.label_index[text]
    except KeyError:
      raise Reject(f'label {self.label_name!r}: {text!r} is not one of the '
                   f'declared values {list(self.label_index)}',
                   self.label_name)

  def read_file(self, path, data_format=None):
    """Yields (number, raw, values-or-Reject) for one raw file.

    `data_format` defaults to the config's; CSV files without a header take
    the config's column names.
    """
    data = self.config.data
    if (data_format or data.format) == 'tfrecord':
      return self.read_tfrecord(path)
    return self.read_csv(path, None if data.header else list(data.columns))

  # --- CSV ----------------------------------------------------------------

  def csv_header_positions(self, names):
    """Positions of the needed columns given a file's column names."""
    index = {n: i for i, n in enumerate(names)}
    needed = [c.name for c in self.columns]
    if self.with_label:
      needed += (self.expression.names if self.expression
                 else [self.label_name])
    if self.key_column:
      needed.append(self.key_column)
    absent = [n for n in needed if n not in index]
    if absent:
      raise ValueError(f'columns {absent} are not in the header '
                       f'({", ".join(names)})')
    return index

  def parse_csv_fields(self, fields, index):
    """A CSV row (list of strings) -> list of typed values (label last)."""
    if len(fields) != len(index):
      raise Reject(f'expected {len(index)} columns, got {len(fields)}')
    values = [self._value(c, fields[index[c.name]]) for c in self.columns]
    self._check_required(values)
    if self.with_label:
      def lookup(name):
        text = fields[index[name]].strip()
        return None if text in self.missing else text
      label_text = (None if self.expression
                    else fields[index[self.label_name]])
      values.append(self._label(label_text, lookup))
    if self.key_column:
      values.append(self._key(fields[index[self.key_column]]))
    return values

  def _key(self, text):
    """The row's key: its key column's text, which may not be missing."""
    text = None if text is None else text.strip()
    if not text or text in self.missing:
      raise Reject(f'key column {self.key_column!r} is empty',
                   self.key_column)
    return text

  def read_csv(self, path, header_names=None):
    """Yields (line_number, raw_text, values-or-Reject) for a CSV file."""
    with FileSystems.open(path) as raw:
      tap = _LineTap(_text_lines(raw))
      reader = csv.reader(tap, delimiter=self.delimiter)
      names = header_names
      if names is None:
        names = [n.strip() for n in next(reader, [])]
        tap.take()
      index = self.csv_header_positions(names)
      for fields in reader:
        raw_text = tap.take()
        if not fields:
          continue  # a blank line is no row
        line = reader.line_num
        try:
          _check_utf8(raw_text)
          yield line, raw_text, self.parse_csv_fields(fields, index)
        except Reject as r:
          yield line, raw_text, r

  # --- tf.Example ---------------------------------------------------------

  def parse_example(self, serialized):
    """A serialized tf.Example -> list of typed values (label last)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      example = tf.train.Example.FromString(serialized)
    except Exception:  # pylint: disable=broad-except
      raise Reject('not a serialized tf.Example')
    feature = example.features.feature

    def raw(name):
      if name not in feature:
        return None
      kind = feature[name].WhichOneof('kind')
      values = getattr(feature[name], kind).value if kind else []
      if len(values) > 1:
        raise Reject(f'field {name!r}: expected one value, got '
                     f'{len(values)}', name)
      if not values:
        return None
      value = values[0]
      return value.decode('utf-8', 'replace') if isinstance(value, bytes) \
          else str(value)

    values = []
    for c in self.columns:
      text = raw(c.name)
      values.append(None if text is None else self._value(c, text))
    self._check_required(values)
    if self.with_label:
      values.append(self._label(None if self.expression else
                                raw(self.label_name), raw))
    if self.key_column:
      values.append(self._key(raw(self.key_column)))
    return values

  def read_tfrecord(self, path):
    """Yields (record_number, raw_text, values-or-Reject) for a TFRecord file."""
    from apache_beam.io.tfrecordio import _TFRecordUtil  # pylint: disable=g-import-not-at-top
    with FileSystems.open(path) as f:
      number = 0
      while True:
        try:
          record = _TFRecordUtil.read_record(f)
        except Exception as e:  # pylint: disable=broad-except
          number += 1
          yield number, '', Reject(f'corrupt TFRecord framing: {e}')
          return
        if record is None:
          return
        number += 1
        try:
          yield number, record, self.parse_example(record)
        except Reject as r:
          yield number, record, r

  # --- batches ------------------------------------------------------------

  def record_batch(self, rows):
    """Typed rows -> one Arrow RecordBatch of list columns (TFXIO layout)."""
    schema = self.arrow_schema()
    arrays = []
    for i, field in enumerate(schema):
      column = [row[i] for row in rows]
      arrays.append(_list_array(column, field.type.value_type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _list_array(values, value_type):
  """[v or None, ...] -> LargeListArray with one or zero items per row."""
  present = np.array([v is not None for v in values], dtype=bool)
  offsets = np.zeros(len(values) + 1, dtype=np.int64)
  np.cumsum(present, out=offsets[1:])
  flat = pa.array([v for v in values if v is not None], type=value_type)
  return pa.LargeListArray.from_arrays(pa.array(offsets), flat)


def _text_lines(binary):
  """Decoded lines of a binary file, compressed (.gz, .bz2) or not.

  Beam's compressed files are not io objects (no TextIOWrapper), but all
  have readline; bad UTF-8 is kept as surrogates and rejected per row.
  """
  while True:
    line = binary.readline()
    if not line:
      return
    yield line.decode('utf-8', 'surrogateescape')


class _LineTap:
  """Feeds lines to csv.reader and remembers them, for the rejects' raw text."""

  def __init__(self, lines):
    self._lines = iter(lines)
    self._seen = []

  def __iter__(self):
    return self

  def __next__(self):
    line = next(self._lines)
    self._seen.append(line)
    return line

  def take(self):
    text = ''.join(self._seen)
    self._seen = []
    return text.rstrip('\r\n')


def _check_utf8(text):
  try:
    text.encode('utf-8')
  except UnicodeEncodeError:
    raise Reject('not valid UTF-8 text')


def is_eval_row(raw, eval_fraction):
  """Stable train/eval assignment from the raw record's bytes.

  The same row lands in the same split on every run and every runner.
  """
  if isinstance(raw, str):
    raw = raw.encode('utf-8', 'surrogateescape')
  bucket = int.from_bytes(hashlib.md5(raw).digest()[:8], 'little')
  return bucket / 2.0**64 < eval_fraction


def raw_for_json(raw):
  if isinstance(raw, bytes):
    return 'base64:' + base64.b64encode(raw).decode('ascii')
  return raw.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')


# --- derived labels ------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub,
           ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt,
           ast.LtE: operator.le, ast.Eq: operator.eq, ast.NotEq: operator.ne}


class _Expression:
  """A label expression such as `tips > 0.2 * fare`, over raw numeric fields.

  Only arithmetic, comparisons, and/or/not, numbers and column names are
  allowed: it is evaluated safely, without eval().
  """

  def __init__(self, text):
    self.text = text
    self.tree = ast.parse(text, mode='eval').body
    self.names = sorted({n.id for n in ast.walk(self.tree)
                         if isinstance(n, ast.Name)})
    self._check(self.tree)

  def _check(self, node):
    allowed = (ast.BinOp, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.Name,
               ast.Constant, ast.Load, ast.And, ast.Or, ast.Not, ast.USub,
               *_BINARY)
    for child in ast.walk(node):
      if not isinstance(child, allowed):
        raise ValueError(f'label expression {self.text!r}: '
                         f'{type(child).__name__} is not allowed')

  def evaluate(self, lookup, task):
    env = {}
    for name in self.names:
      text = lookup(name)
      if text is None:
        raise Reject(f'label expression needs {name!r}, which is missing',
                     name)
      try:
        env[name] = _parse_float(text)
      except ValueError:
        raise Reject(f'field {name!r}: expected a number, got {text!r}', name)
    value = self._eval(self.tree, env)
    return float(value) if task == 'regression' else int(bool(value))

  def _eval(self, node, env):
    if isinstance(node, ast.Constant):
      return node.value
    if isinstance(node, ast.Name):
      return env[node.id]
    if isinstance(node, ast.UnaryOp):
      value = self._eval(node.operand, env)
      return -value if isinstance(node.op, ast.USub) else not value
    if isinstance(node, ast.BinOp):
      try:
        return _BINARY[type(node.op)](self._eval(node.left, env),
                                      self._eval(node.right, env))
      except ZeroDivisionError:
        raise Reject(f'label expression {self.text!r} divides by zero')
    if isinstance(node, ast.BoolOp):
      values = [self._eval(v, env) for v in node.values]
      return all(values) if isinstance(node.op, ast.And) else any(values)
    left = self._eval(node.left, env)
    for op, right_node in zip(node.ops, node.comparators):
      right = self._eval(right_node, env)
      if not _BINARY[type(op)](left, right):
        return False
      left = right
    return True
