"""A loaded SavedModel version and its callable signatures.

Signatures are handled generically from their input/output specs, so any
export works: canned Estimator exports (one serialized tf.Example input) and
per-feature signatures (one tensor per raw feature) alike.
"""

import inspect
import os

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2

from pipeline import signatures
from serving import codec
from serving import export
from serving.errors import ServingError, from_tf_error, invalid


def is_complete_export(path):
  """Whether `path` holds a finished SavedModel (exporters write it last)."""
  return (os.path.isfile(os.path.join(path, 'saved_model.pb')) or
          os.path.isfile(os.path.join(path, 'saved_model.pbtxt')))


class Signature:
  """One signature of a loaded version: specs, method and the function."""

  def __init__(self, key, signature_def, function):
    self.key = key
    self.method_name = signature_def.method_name
    self.function = function
    _, kwargs = function.structured_input_signature
    # name -> (tf.DType, shape list with None for unknown dims)
    self.inputs = {name: (spec.dtype, spec.shape.as_list()
                          if spec.shape.rank is not None else None)
                   for name, spec in kwargs.items()}
    self.outputs = {name: (t.dtype, t.shape.as_list()
                           if t.shape.rank is not None else None)
                    for name, t in function.structured_outputs.items()}
    # Merging requests along dim 0 is only valid when every input and
    # output is batched (unknown leading dimension).
    self.batchable = bool(self.inputs) and all(
        shape and shape[0] is None
        for _, shape in list(self.inputs.values()) +
        list(self.outputs.values()))
    # name -> (numpy dtype, takes strings, rank or None, {axis: fixed
    # size}): what a request's arrays are checked against.
    self.input_checks = {
        name: (np.dtype(dtype.as_numpy_dtype), dtype == tf.string,
               None if shape is None else len(shape),
               {axis: size for axis, size in enumerate(shape or ())
                if size is not None and size >= 0})
        for name, (dtype, shape) in self.inputs.items()}
    # Set for estpipe exports (ServableVersion): {input: the value that
    # means missing} of a raw-feature signature, whose inputs a request may
    # leave out or send as null; {raw feature: kind} of a signature taking
    # serialized tf.Examples, which are retyped as :classify's are.
    self.fill_values = {}
    self.example_kinds = None
    self.batcher = None  # set by the server when batching is on
    self._flat_order = _flat_call_order(function, self.inputs)

  def run(self, inputs):
    """Calls the signature on numpy inputs; returns numpy outputs."""
    if self.batcher is not None and self.batchable:
      return self.batcher.run(self, inputs)
    return self.call(inputs)

  def submit(self, inputs, callback):
    """Queues the inputs for a batched call, whose batch thread calls
    `callback(outputs, error)`; False if batching is off for this signature
    or the inputs can't join a batch (then the caller runs them)."""
    if self.batcher is not None and self.batchable:
      return self.batcher.submit(self, inputs, callback)
    return False

  def call(self, inputs):
    try:
      outputs = self._invoke(inputs)
    except tf.errors.OpError as e:
      raise from_tf_error(e) from None
    except (TypeError, ValueError) as e:
      raise invalid(f'signature {self.key!r} rejected the inputs: '
                    f'{str(e).splitlines()[0]}') from None
    return {name: value.numpy() for name, value in outputs.items()}

  def _invoke(self, inputs):
    # Functions loaded from TF1 SavedModels only take tensors. Calling the
    # flat function skips argument binding, a third of the cost of a
    # one-row call; the public call is the fallback.
    order = self._flat_order
    if order is not None:
      return self.function._call_flat(  # pylint: disable=protected-access
          [tf.constant(inputs[name]) for name in order],
          self.function.captured_inputs)
    return self.function(**{name: tf.constant(value)
                            for name, value in inputs.items()})


def _flat_call_order(function, inputs):
  """Input names in flat-call order, or None to use the public call."""
  order = getattr(function, '_arg_keywords', None)
  flat = getattr(function, '_call_flat', None)
  if order is None or flat is None or sorted(order) != sorted(inputs):
    return None
  try:
    params = list(inspect.signature(flat).parameters)
  except (TypeError, ValueError):
    return None
  # The private call as of TF 2.15; any other shape falls back.
  if params != ['tensor_inputs', 'captured_inputs']:
    return None
  return list(order)


class ServableVersion:
  """One loaded version of a model."""

  def __init__(self, name, version, path):
    self.name = name
    self.version = version
    self.path = path
    self.meta_graph = _read_meta_graph(path)
    # {raw feature: kind} for building tf.Examples; None: not an estpipe
    # export (or an older one), so Examples are typed from the values alone.
    self.raw_features = _raw_feature_kinds(path)
    self._loaded = tf.saved_model.load(path, tags=[signatures.SERVE_TAG])
    self.signatures = {}
    for key, function in self._loaded.signatures.items():
      signature_def = self.meta_graph.signature_def[key]
      self.signatures[key] = Signature(key, signature_def, function)
    if self.raw_features is not None:
      for signature in self.signatures.values():
        _declare_raw_features(signature, self.raw_features)

  @property
  def signature_defs(self):
    return self.meta_graph.signature_def

  def signature(self, key):
    key = key or signatures.DEFAULT_SIGNATURE
    signature = self.signatures.get(key)
    if signature is None:
      # TF Serving's wording and code (FAILED_PRECONDITION, HTTP 400).
      raise ServingError(
          grpc.StatusCode.FAILED_PRECONDITION,
          f'Serving signature key "{key}" not found. Available: '
          f'{", ".join(sorted(self.signatures))}')
    return signature


def _declare_raw_features(signature, kinds):
  """What an estpipe export's signature accepts beyond its dtypes."""
  if signatures.is_raw(signature.key):
    # The raw-feature receiver reads NaN and '' as missing
    # (serving/export.py), so those fill what a request leaves out.
    signature.fill_values = {
        name: (b'' if dtype == tf.string else float('nan'))
        for name, (dtype, _) in signature.inputs.items()}
  elif (len(signature.inputs) == 1 and
        next(iter(signature.inputs.values()))[0] == tf.string):
    signature.example_kinds = kinds


def _raw_feature_kinds(path):
  """The raw feature kinds an estpipe export declares, or None."""
  meta_path = os.path.join(path, export.METADATA_FILE)
  try:
    meta = export.read_metadata(path)
  except ValueError as e:
    raise ValueError(f'{meta_path} is not valid JSON: {e}') from None
  if not isinstance(meta, dict) or meta.get('raw_features') is None:
    return None
  return codec.example_kinds(meta['raw_features'], meta_path)


def _read_meta_graph(path):
  """The 'serve' MetaGraphDef, for SignatureDefs as TF Serving reports them."""
  saved_model = saved_model_pb2.SavedModel()
  pb = os.path.join(path, 'saved_model.pb')
  if os.path.isfile(pb):
    with open(pb, 'rb') as f:
      saved_model.ParseFromString(f.read())
  else:
    with open(os.path.join(path, 'saved_model.pbtxt')) as f:
      text_format.Parse(f.read(), saved_model)
  for meta_graph in saved_model.meta_graphs:
    if signatures.SERVE_TAG in meta_graph.meta_info_def.tags:
      return meta_graph
  raise ValueError(
      f'{path} has no MetaGraph tagged {signatures.SERVE_TAG!r}')
