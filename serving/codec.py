"""Conversions between wire formats and numpy arrays for the model server.

JSON follows TF Serving's REST API: strings are UTF-8 text or {"b64": ...};
numbers must fit the input's dtype (no silent string-to-number parsing).
TensorProto conversions use the typed value fields, as TF Serving does.
tf.Example building follows TF Serving's Classify/Regress JSON rules, except
for features whose kind an estpipe export declares (see `example_kinds`).
The checks and label text both front ends need live here too
(`check_input_names`, `label_text`), so REST and gRPC answer alike, as do
the missing values of an estpipe export's raw-feature signature (`fill_nulls`,
`fill_absent`) and the retyping of Examples sent to `:predict`
(`coerce_serialized`).
"""

import base64
import math

import numpy as np
import tensorflow as tf
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import types_pb2

from serving.errors import invalid

# numpy kinds a JSON value may have for each target dtype kind.
_ACCEPTED_KINDS = {'f': 'fiu', 'i': 'iu', 'u': 'iu', 'b': 'b'}
_KIND_WORDS = {'f': 'a number', 'i': 'an integer', 'u': 'an integer',
               'b': 'a boolean', 'U': 'a string', 'O': 'a mixed or null value'}


def dtype_name(dtype):
  return types_pb2.DataType.Name(tf.as_dtype(dtype).as_datatype_enum)


def shape_str(shape):
  return '[' + ','.join('?' if d is None or d < 0 else str(d)
                        for d in shape) + ']'


def json_to_array(value, name, dtype):
  """A JSON value (nested lists of scalars) as an array of `dtype`."""
  target, accepted = _json_target(dtype)
  if target is None:
    return _json_to_strings(value, name)
  try:
    arr = np.asarray(value)
  except ValueError:
    raise invalid(f'input {name!r}: the nested lists are ragged; every row '
                  'must have the same length') from None
  kind = arr.dtype.kind
  if kind not in accepted:
    if arr.size == 0 and kind == 'f':
      return arr.astype(target)
    got = _KIND_WORDS.get(kind, arr.dtype.name)
    if kind == 'O' and _is_ragged(value):
      raise invalid(f'input {name!r}: the nested lists are ragged; every row '
                    'must have the same length')
    raise invalid(f'input {name!r} expects {dtype_name(dtype)} values, got '
                  f'{got}')
  if target.kind in 'iu' and arr.size:
    info = np.iinfo(target)
    if arr.min() < info.min or arr.max() > info.max:
      raise invalid(f'input {name!r}: value out of range for '
                    f'{dtype_name(dtype)}')
  return arr.astype(target, copy=False)


_JSON_TARGETS = {}


def _json_target(dtype):
  """(numpy dtype or None for strings, accepted JSON kinds) of a dtype."""
  found = _JSON_TARGETS.get(dtype)
  if found is None:
    tf_dtype = tf.as_dtype(dtype)
    if tf_dtype == tf.string:
      found = (None, '')
    else:
      target = np.dtype(tf_dtype.as_numpy_dtype)
      found = (target, _ACCEPTED_KINDS.get(target.kind, ''))
    _JSON_TARGETS[dtype] = found
  return found


def _is_ragged(value):
  try:
    np.asarray(value, dtype=object)
  except ValueError:
    return True
  return False


def _json_to_strings(value, name):
  shape = []
  probe = value
  while isinstance(probe, list):
    shape.append(len(probe))
    if len(shape) > MAX_RANK:  # numpy's limit too: a 400, not a 500
      raise invalid(f'input {name!r} is nested deeper than {MAX_RANK} '
                    f'lists; at most {MAX_RANK} dimensions are supported')
    if not probe:
      break
    probe = probe[0]
  flat = []
  _flatten_strings(value, shape, 0, flat, name)
  arr = np.empty(len(flat), dtype=object)
  arr[:] = flat
  return arr.reshape(shape)


def _flatten_strings(value, shape, depth, out, name):
  if depth == len(shape):
    out.append(decode_string(value, name))
    return
  if not isinstance(value, list) or len(value) != shape[depth]:
    raise invalid(f'input {name!r}: the nested lists are ragged; every row '
                  'must have the same length')
  for item in value:
    _flatten_strings(item, shape, depth + 1, out, name)


def decode_string(value, name):
  """A JSON string value as bytes: text is UTF-8, {"b64": ...} is binary."""
  if isinstance(value, str):
    return value.encode('utf-8')
  if isinstance(value, dict) and len(value) == 1 and 'b64' in value:
    try:
      return base64.b64decode(value['b64'], validate=True)
    except (TypeError, ValueError):
      raise invalid(f'input {name!r}: {{"b64": ...}} holds invalid base64'
                    ) from None
  raise invalid(f'input {name!r} expects DT_STRING values (text or '
                f'{{"b64": ...}}), got {_describe(value)}')


def _describe(value):
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + '...'


def array_to_json(arr, name):
  """An output array as nested JSON lists (strings as text or b64)."""
  if arr.dtype.kind in 'OS':
    values = arr.tolist()
    binary = name.endswith('_bytes')
    if not binary:
      try:
        return _texts(values, arr.ndim)
      except UnicodeDecodeError:
        pass  # some values are binary: those go as b64
    return _strings_to_json(values, binary)
  return arr.tolist()


def _texts(values, depth):
  """Nested lists of UTF-8 bytes as text (the common case, made quick)."""
  if depth == 1:
    return [value.decode('utf-8') for value in values]
  if depth == 0:
    return values.decode('utf-8')
  return [_texts(value, depth - 1) for value in values]


def _strings_to_json(value, binary):
  if isinstance(value, list):
    return [_strings_to_json(v, binary) for v in value]
  if not binary:
    try:
      return value.decode('utf-8')
    except UnicodeDecodeError:
      pass
  return {'b64': base64.b64encode(value).decode('ascii')}


def check_shape(arr, name, spec_shape):
  """Raises a clear error unless `arr` fits the signature's input shape."""
  if spec_shape is None:
    return
  if arr.ndim != len(spec_shape) or any(
      want is not None and want >= 0 and want != got
      for want, got in zip(spec_shape, arr.shape)):
    raise invalid(f'input {name!r} has shape {shape_str(arr.shape)} but the '
                  f'signature expects {shape_str(spec_shape)}')


def check_input_names(signature, names):
  """Raises a clear error unless `names` are exactly the signature's inputs
  (both wire formats name inputs; each checks before converting values).
  Inputs with a fill value (`signature.fill_values`) may be left out."""
  expected = set(signature.inputs)
  got = set(names)
  if got != expected:
    missing = sorted(expected - got - set(signature.fill_values))
    extra = sorted(got - expected)
    if not missing and not extra:
      return
    parts = []
    if missing:
      parts.append(f'missing {missing}')
    if extra:
      parts.append(f'unexpected {extra}')
    raise invalid(f'inputs do not match signature {signature.key!r} (inputs '
                  f'{sorted(expected)}): {"; ".join(parts)}')


def fill_nulls(value, fill):
  """A JSON value with every null (at any depth) replaced by `fill`."""
  if value is None:
    return fill
  if isinstance(value, list):
    return [fill_nulls(item, fill) for item in value]
  return value


def json_fill(signature, name):
  """The JSON value that stands for a missing value of input `name`, or
  None if the input takes no missing values."""
  fill = signature.fill_values.get(name)
  if isinstance(fill, bytes):
    return fill.decode('utf-8')
  return fill


def fill_absent(signature, inputs):
  """`inputs` with each input the request left out filled with its missing
  value (`signature.fill_values`), one per row of the inputs it sent."""
  absent = [name for name in signature.fill_values if name not in inputs]
  if not absent:
    return inputs
  rows = {arr.shape[0] for arr in inputs.values() if arr.ndim}
  if len(rows) != 1:
    return inputs  # nothing sent, or rows disagree: the checks say so
  (count,) = rows
  filled = dict(inputs)
  for name in absent:
    fill = signature.fill_values[name]
    dtype = object if isinstance(fill, bytes) else np.dtype(
        signature.inputs[name][0].as_numpy_dtype)
    arr = np.empty(count, dtype=dtype)
    arr[:] = fill
    filled[name] = arr
  return filled


def coerce_serialized(signature, inputs):
  """Serialized tf.Examples retyped by `signature.example_kinds`, as
  :classify's are (coerce_example), for predict on an Example signature."""
  if len(inputs) != 1:
    return inputs  # the input check says what is wrong
  ((name, batch),) = inputs.items()
  if batch.ndim != 1 or batch.dtype.kind not in 'OS':
    return inputs
  out = None
  for i, serialized in enumerate(batch):
    try:
      example = example_pb2.Example.FromString(serialized)
    except Exception:  # pylint: disable=broad-except
      continue  # not an Example: the model's parser says so
    if coerce_example(example, signature.example_kinds, f'{name}[{i}]'):
      if out is None:
        out = np.empty(len(batch), dtype=object)
        out[:] = list(batch)
      out[i] = example.SerializeToString()
  return inputs if out is None else {name: out}


def label_text(label):
  """A class label as text for an answer: models give bytes, JSON and
  ClassificationResult want strings (invalid UTF-8 replaced, not fatal)."""
  return label.decode('utf-8', 'replace') if isinstance(label, bytes) else label


# TensorProto value fields for the dtypes clients send, as TF Serving fills
# them (Tensor::AsProtoField); other dtypes go through tf.make_ndarray.
_PROTO_FIELDS = {
    types_pb2.DT_FLOAT: ('float_val', np.float32),
    types_pb2.DT_DOUBLE: ('double_val', np.float64),
    types_pb2.DT_INT32: ('int_val', np.int32),
    types_pb2.DT_INT16: ('int_val', np.int16),
    types_pb2.DT_INT8: ('int_val', np.int8),
    types_pb2.DT_UINT8: ('int_val', np.uint8),
    types_pb2.DT_UINT16: ('int_val', np.uint16),
    types_pb2.DT_INT64: ('int64_val', np.int64),
    types_pb2.DT_UINT32: ('uint32_val', np.uint32),
    types_pb2.DT_UINT64: ('uint64_val', np.uint64),
    types_pb2.DT_BOOL: ('bool_val', np.bool_),
    types_pb2.DT_STRING: ('string_val', object),
}


# Dtypes that tf.make_ndarray reads from their own value fields (half_val,
# scomplex_val, dcomplex_val) or from tensor_content. Every other dtype
# (DT_RESOURCE, DT_VARIANT, reference types, unknown numbers) is refused.
_NDARRAY_DTYPES = (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16,
                   types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128)
# Limits on a client's TensorProto, checked before anything is allocated:
# numpy 1.x's own rank limit, and the memory one input may take once filled
# (TF's convention lets one value fill a whole shape, so a tiny request can
# declare a huge tensor).
MAX_RANK = 32
MAX_TENSOR_BYTES = 1 << 28  # 256 MiB


def proto_to_array(proto, name):
  """A TensorProto from a client as a numpy array.

  The declared dtype, shape and value count are checked first (see
  `check_tensor_proto`), so a bad tensor is an INVALID_ARGUMENT error and
  never an attempt to allocate what it declares.
  """
  shape = check_tensor_proto(proto, name)
  field = _PROTO_FIELDS.get(proto.dtype)
  if proto.tensor_content or field is None:
    try:
      return tf.make_ndarray(proto)
    except (TypeError, ValueError) as e:
      raise invalid(f'input {name!r}: cannot read the tensor: {e}') from None
  values = getattr(proto, field[0])
  if field[1] is object:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
  else:
    arr = np.array(values, dtype=field[1])
  size = math.prod(shape)
  if arr.size == size:
    return arr.reshape(shape)
  # check_tensor_proto allows only one value here: TF's convention, one
  # value fills the whole shape.
  return np.full(shape, arr[0], dtype=arr.dtype)


def check_tensor_proto(proto, name):
  """The shape a client's TensorProto declares, once it is known to fit.

  Raises INVALID_ARGUMENT for a dtype the server takes no inputs of, an
  unknown rank, a rank above MAX_RANK, a negative dimension, a tensor above
  MAX_TENSOR_BYTES, or a value count that is neither the shape's size nor
  one value to fill it with (tensor_content: exactly the size's bytes).
  Nothing the proto declares is allocated here.
  """
  dtype = proto.dtype
  if dtype == types_pb2.DT_INVALID:
    raise invalid(f'input {name!r} has no dtype')
  field = _PROTO_FIELDS.get(dtype)
  if field is None and dtype not in _NDARRAY_DTYPES:
    try:
      dtype_text = f'dtype {types_pb2.DataType.Name(dtype)}'
    except ValueError:
      dtype_text = f'an unknown dtype ({dtype})'
    raise invalid(f'input {name!r} has {dtype_text}, which a request '
                  'cannot carry; send a numeric, boolean or string tensor')
  tensor_shape = proto.tensor_shape
  if tensor_shape.unknown_rank:
    raise invalid(f'input {name!r} has an unknown rank; a request tensor '
                  'needs a fully defined shape')
  dims = tensor_shape.dim
  if len(dims) > MAX_RANK:
    raise invalid(f'input {name!r} has rank {len(dims)}; at most {MAX_RANK} '
                  'dimensions are supported')
  shape = [d.size for d in dims]
  if any(s < 0 for s in shape):
    raise invalid(f'input {name!r} has a negative dimension in shape '
                  f'{_short_shape(shape)}: a request tensor '
                  'needs every dimension known (0 or more)')
  itemsize = 8 if field is not None and field[1] is object else (
      np.dtype(tf.as_dtype(dtype).as_numpy_dtype).itemsize)
  size = 1
  for s in shape:  # Python integers: no overflow, stops once too large
    size *= s
    if size * itemsize > MAX_TENSOR_BYTES:
      raise invalid(f'input {name!r} has shape {_short_shape(shape)}: above '
                    f'the limit of {MAX_TENSOR_BYTES >> 20} MiB for one '
                    'input tensor')
  if proto.tensor_content and dtype != types_pb2.DT_STRING:
    if len(proto.tensor_content) != size * itemsize:
      raise invalid(f'input {name!r}: tensor_content holds '
                    f'{len(proto.tensor_content)} bytes but shape '
                    f'{shape_str(shape)} of {types_pb2.DataType.Name(dtype)} '
                    f'takes {size * itemsize}')
    return shape
  count = _value_count(proto, field)
  if count != size and not (count == 1 and size > 0):
    raise invalid(f'input {name!r} has {count} values for shape '
                  f'{shape_str(shape)} ({size} values)')
  return shape


def _value_count(proto, field):
  """How many values a TensorProto's value field holds."""
  if field is not None:
    return len(getattr(proto, field[0]))
  if proto.dtype in (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16):
    return len(proto.half_val)
  if proto.dtype == types_pb2.DT_COMPLEX64:
    return len(proto.scomplex_val) // 2
  return len(proto.dcomplex_val) // 2


def _short_shape(shape):
  text = '[' + ','.join(map(str, shape)) + ']'
  return text if len(text) <= 60 else text[:57] + '...]'


def array_to_proto(arr):
  """An output array as a TensorProto with typed value fields."""
  dtype = tf.as_dtype(arr.dtype if arr.dtype != object else tf.string)
  proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum)
  for size in arr.shape:
    proto.tensor_shape.dim.add(size=size)
  field = _PROTO_FIELDS.get(proto.dtype)
  if field is None:
    return tf.make_tensor_proto(arr)
  getattr(proto, field[0]).extend(arr.ravel().tolist())
  return proto


# The tf.Example value list of each raw feature kind an estpipe export
# declares in its metadata (serving.export.raw_feature_kinds).
_KIND_LISTS = {'float': 'float_list', 'integer': 'int64_list',
               'string': 'bytes_list'}
_KIND_WANTS = {'float': ('a float', 'numbers'),
               'integer': ('an integer', 'whole numbers'),
               'string': ('a string', 'text or {"b64": ...}')}
_INT64 = np.iinfo(np.int64)


def example_kinds(kinds, where):
  """Checks {feature: 'float' | 'integer' | 'string'} from export metadata.

  Raises ValueError naming `where` unless every kind is one of those.
  """
  if not isinstance(kinds, dict) or not all(
      isinstance(name, str) and kind in _KIND_LISTS
      for name, kind in kinds.items()):
    raise ValueError(f'{where}: raw_features must map feature names to one '
                     f'of {", ".join(_KIND_LISTS)}, got {_describe(kinds)}')
  return dict(kinds)


def json_to_example(features, where, kinds=None):
  """A tf.Example from a JSON object {feature: value or list of values}.

  Features in `kinds` (see example_kinds) get the value list the export's
  parser expects: JSON has one number type, so an integer sent for a float
  feature is a float, and a whole number for an integer feature an integer;
  a value of the wrong kind is an error naming the feature, and null is a
  missing value (the feature is left out). Other features are typed from
  their values, as TF Serving does.
  """
  if not isinstance(features, dict):
    raise invalid(f'{where} must be a JSON object of features, got '
                  f'{_describe(features)}')
  kinds = kinds or {}
  example = example_pb2.Example()
  feature_map = example.features.feature
  for key, value in features.items():
    if value is None and key in kinds:
      continue  # null: a missing value, as an absent feature
    values = value if isinstance(value, list) else [value]
    if key in kinds:
      _fill_kind(feature_map[key], values, kinds[key], key, f'{where}.{key}')
    else:
      _fill_feature(feature_map[key], values, f'{where}.{key}')
  return example


def coerce_example(example, kinds, where):
  """Retypes an Example's features in `kinds` in place, as json_to_example.

  For gRPC clients, whose Examples arrive typed: an int64_list for a float
  feature becomes a float_list and so on; text for a number (or the reverse)
  is an error naming the feature. Returns whether anything was retyped.
  """
  feature_map = example.features.feature
  changed = False
  for name, kind in kinds.items():
    if name not in feature_map:
      continue
    feature = feature_map[name]
    have = feature.WhichOneof('kind')
    if have is None or have == _KIND_LISTS[kind]:
      continue
    values = list(getattr(feature, have).value)
    if have == 'bytes_list' and values:
      raise _wrong_kind(name, kind, values[0], where)
    feature.Clear()
    _fill_kind(feature, values, kind, name, where)
    changed = True
  return changed


def _fill_kind(feature, values, kind, name, where):
  """Fills `feature` with `values` as the value list of a declared kind."""
  if kind == 'string':
    for value in values:
      if not isinstance(value, (str, dict)):
        raise _wrong_kind(name, kind, value, where)
    feature.bytes_list.value.extend(decode_string(v, where) for v in values)
    feature.bytes_list.SetInParent()
    return
  numbers = [_number(v, kind, name, where) for v in values]
  value_list = getattr(feature, _KIND_LISTS[kind])
  value_list.value.extend(numbers)
  value_list.SetInParent()


def _number(value, kind, name, where):
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _wrong_kind(name, kind, value, where)
  if kind == 'float':
    try:
      return float(value)
    except OverflowError:
      raise invalid(f'{where}: feature {name!r}: {_describe(value)} is out '
                    'of range for a float') from None
  if isinstance(value, float) and not (math.isfinite(value) and
                                       value.is_integer()):
    raise _wrong_kind(name, kind, value, where)
  if not _INT64.min <= value <= _INT64.max:
    raise invalid(f'{where}: feature {name!r}: {_describe(value)} is out of '
                  'range for int64')
  return int(value)


def _wrong_kind(name, kind, value, where):
  if isinstance(value, bytes):
    value = value.decode('utf-8', 'replace')
  article_kind, wants = _KIND_WANTS[kind]
  return invalid(f'{where}: feature {name!r} is {article_kind} feature of '
                 f'this model and takes {wants}, got {_describe(value)}')


def _fill_feature(feature, values, where):
  if not values:
    feature.float_list.SetInParent()
    return
  if all(isinstance(v, (str, dict)) for v in values):
    feature.bytes_list.value.extend(decode_string(v, where) for v in values)
  elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
    for v in values:
      if not _INT64.min <= v <= _INT64.max:
        raise invalid(f'{where}: {_describe(v)} is out of range for an '
                      'int64 feature')
    feature.int64_list.value.extend(values)
  elif all(isinstance(v, (int, float)) and not isinstance(v, bool)
           for v in values):
    feature.float_list.value.extend(values)
  else:
    raise invalid(f'{where}: a feature holds numbers or strings (text or '
                  f'{{"b64": ...}}) of one kind, got {_describe(values)}')
