"""A loaded SavedModel version and its callable signatures.

Signatures are handled generically from their input/output specs, so any
export works: canned Estimator exports (one serialized tf.Example input) and
per-feature signatures (one tensor per raw feature) alike.
"""

import os

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
# pylint: disable-next=g-direct-tensorflow-import
from tensorflow.python.saved_model import loader_impl

from pipeline import signatures
from serving import codec
from serving import export
from serving.errors import ServingError, from_tf_error, invalid


def is_complete_export(path):
  """Whether `path` holds a finished SavedModel (exporters write it last)."""
  return (os.path.isfile(os.path.join(path, 'saved_model.pb')) or
          os.path.isfile(os.path.join(path, 'saved_model.pbtxt')))


class Signature:
  """One signature of a loaded version: specs, method and how to call it.

  Calls run the version's TF1 Session (as TensorFlow Serving runs
  SavedModels), numpy in and numpy out. Not eager functions: with
  TensorFlow 2.15 on Python 3.11 every EagerTensor leaks a small block when
  it is freed (tensorflow/tensorflow#62551), so a call's input and output
  tensors cost about 0.4 KB that is never returned, and the server's memory
  grew in a straight line with its request count.
  """

  def __init__(self, key, signature_def, session):
    self.key = key
    self.method_name = signature_def.method_name
    # name -> (tf.DType, shape list with None for unknown dims)
    self.inputs = {name: _spec(info)
                   for name, info in signature_def.inputs.items()}
    self.outputs = {name: _spec(info)
                    for name, info in signature_def.outputs.items()}
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
    self._feeds = sorted(self.inputs)
    self._fetches = sorted(self.outputs)
    # A callable session run: no graph lookups or feed checks per call.
    self._run = session.make_callable(
        [_tensor_name(signature_def.outputs[n], key, n)
         for n in self._fetches],
        [_tensor_name(signature_def.inputs[n], key, n)
         for n in self._feeds])

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
    if len(inputs) != len(self._feeds) or not all(
        name in inputs for name in self._feeds):
      raise invalid(f'signature {self.key!r} takes inputs {self._feeds}, got '
                    f'{sorted(inputs)}')
    try:
      values = self._run(*[inputs[name] for name in self._feeds])
    except tf.errors.OpError as e:
      raise from_tf_error(e) from None
    except (TypeError, ValueError) as e:
      raise invalid(f'signature {self.key!r} rejected the inputs: '
                    f'{str(e).splitlines()[0]}') from None
    # A session answers numpy scalars for 0-d outputs; arrays throughout.
    return {name: np.asarray(value)
            for name, value in zip(self._fetches, values)}


def _spec(info):
  """(tf.DType, shape list or None) of a SignatureDef's TensorInfo."""
  shape = info.tensor_shape
  return (tf.as_dtype(info.dtype), None if shape.unknown_rank else
          [d.size if d.size >= 0 else None for d in shape.dim])


def _tensor_name(info, key, name):
  if not info.name:  # a sparse or composite tensor
    raise ValueError(f'signature {key!r}: {name!r} is not a dense tensor, '
                     'which the server does not support')
  return info.name


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
    self._session = _load_session(path)
    self.signatures = {
        key: Signature(key, signature_def, self._session)
        for key, signature_def in self.meta_graph.signature_def.items()
        if not key.startswith('__')}  # e.g. __saved_model_init_op
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


def _load_session(path):
  """A Session holding the 'serve' MetaGraph of `path`, variables restored
  and tables initialized: what TensorFlow Serving runs."""
  threading = tf.config.threading
  config = tf.compat.v1.ConfigProto(
      allow_soft_placement=True,
      intra_op_parallelism_threads=(
          threading.get_intra_op_parallelism_threads()),
      inter_op_parallelism_threads=(
          threading.get_inter_op_parallelism_threads()))
  graph = tf.Graph()
  session = tf.compat.v1.Session(graph=graph, config=config)
  with graph.as_default():
    # tf.compat.v1.saved_model.load without its deprecation warning.
    loader_impl.SavedModelLoader(path).load(session, [signatures.SERVE_TAG])
  graph.finalize()  # nothing is added per call
  return session


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
