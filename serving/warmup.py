"""TF Serving's SavedModel warmup: requests replayed before a version serves.

An export may carry `assets.extra/tf_serving_warmup_requests`, a TFRecord
file of `tensorflow.serving.PredictionLog` protos (the file and format
tensorflow_model_server reads). estpipe's exports write one from a few eval
rows, one request per signature (`requests_for_signatures`); the model
server replays the file while loading a version, before the version is made
available, so the first client request finds every signature's function
already instantiated and its tables initialized.

As in TF Serving (saved_model_warmup_util.cc): no file means no warmup; a
record that cannot be read or parsed, more than MAX_RECORDS records, or a
request that fails makes the load fail, with an error naming the file.
Predict, Classify, Regress and MultiInference logs are replayed;
SessionRun logs (TF1 sessions, which this server has none of) are skipped.
"""

import logging
import os
import time

import numpy as np

from pipeline import signatures
from serving import codec
from serving.errors import ServingError

log = logging.getLogger('estpipe')

WARMUP_FILE = os.path.join('assets.extra', 'tf_serving_warmup_requests')
MAX_RECORDS = 1000  # TF Serving's limit


class WarmupError(ValueError):
  """A warmup file that cannot be replayed: the version does not load."""


def write(path, logs):
  """Writes PredictionLog protos as a warmup file at `path`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.TFRecordWriter(path) as writer:
    for prediction_log in logs:
      writer.write(prediction_log.SerializeToString())


def read(path):
  """The PredictionLogs of a warmup file; WarmupError if it is unreadable."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-import-not-at-top
  logs = []
  try:
    for i, record in enumerate(tf.compat.v1.io.tf_record_iterator(path)):
      if i >= MAX_RECORDS:
        raise WarmupError(f'{path}: more than {MAX_RECORDS} warmup records '
                          '(TF Serving\'s limit)')
      prediction_log = prediction_log_pb2.PredictionLog()
      try:
        prediction_log.ParseFromString(record)
      except Exception:  # pylint: disable=broad-except
        raise WarmupError(f'{path}: record {i} is not a PredictionLog'
                          ) from None
      logs.append(prediction_log)
  except tf.errors.OpError as e:
    raise WarmupError(f'{path}: cannot read the warmup records: '
                      f'{e.message.splitlines()[0]}') from None
  return logs


def replay(servable):
  """Replays a version's warmup file, if it has one, on its signatures.

  Returns the number of requests replayed (0 without a file); raises
  WarmupError, naming the file, if it cannot be read or a request fails.
  """
  path = os.path.join(servable.path, WARMUP_FILE)
  if not os.path.isfile(path):
    return 0
  started = time.monotonic()
  count = skipped = 0
  for i, prediction_log in enumerate(read(path)):
    kind = prediction_log.WhichOneof('log_type')
    try:
      if kind == 'session_run_log':
        skipped += 1
        continue
      if kind is None:
        raise WarmupError('the record holds no request')
      _REPLAY[kind](servable, getattr(prediction_log, kind).request)
    except (ServingError, WarmupError) as e:
      raise WarmupError(f'{path}: warmup request {i} ({kind}) failed: {e}'
                        ) from None
    count += 1
  log.info('warmup of %s version %d: %d requests replayed in %.2fs%s',
           servable.name, servable.version, count,
           time.monotonic() - started,
           f' ({skipped} SessionRun logs skipped)' if skipped else '')
  return count


def _predict(servable, request):
  signature = servable.signature(request.model_spec.signature_name)
  inputs = {name: codec.proto_to_array(proto, name)
            for name, proto in request.inputs.items()}
  codec.check_input_names(signature, inputs)
  outputs = signature.call(inputs)
  unknown = set(request.output_filter) - set(outputs)
  if unknown:
    raise WarmupError(f'output_filter names unknown outputs {sorted(unknown)}')


def _examples(servable, key, input_proto):
  signature = servable.signature(key)
  if len(signature.inputs) != 1:
    raise WarmupError(f'signature {signature.key!r} does not take one '
                      'tensor of serialized tf.Examples')
  kind = input_proto.WhichOneof('kind')
  if kind == 'example_list':
    serialized = [e.SerializeToString()
                  for e in input_proto.example_list.examples]
  elif kind == 'example_list_with_context':
    data = input_proto.example_list_with_context
    context = data.context.SerializeToString()
    serialized = [context + e.SerializeToString() for e in data.examples]
  else:
    raise WarmupError('the request\'s Input is empty')
  batch = np.empty(len(serialized), dtype=object)
  batch[:] = serialized
  (name,) = signature.inputs
  signature.call({name: batch})


def _classify_or_regress(servable, request):
  _examples(servable, request.model_spec.signature_name, request.input)


def _multi_inference(servable, request):
  for task in request.tasks:
    _examples(servable, task.model_spec.signature_name, request.input)


_REPLAY = {'predict_log': _predict,
           'classify_log': _classify_or_regress,
           'regress_log': _classify_or_regress,
           'multi_inference_log': _multi_inference}


def requests_for_signatures(signature_defs, examples, raw_instances):
  """PredictionLogs that call each signature once, on a few rows.

  `signature_defs`: {key: SignatureDef} of an export; `examples`: the rows
  as tf.Example protos; `raw_instances`: the same rows as {feature: value}
  for per-feature signatures (strings as bytes, numbers as floats, missing
  as b'' and NaN). Signatures that take one string tensor get the
  serialized Examples (a ClassifyLog or RegressLog for those methods, a
  PredictLog otherwise); signatures whose inputs are all raw features get
  the raw values. Others are left out.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-import-not-at-top
  logs = []
  for key in sorted(signature_defs):
    if key.startswith('__'):
      continue  # __saved_model_init_op of TF2 SavedModels: no signature
    signature_def = signature_defs[key]
    inputs = signature_def.inputs
    entry = prediction_log_pb2.PredictionLog()
    one_string = (len(inputs) == 1 and next(iter(inputs.values())).dtype ==
                  tf.string.as_datatype_enum)
    if one_string and signature_def.method_name in (
        signatures.CLASSIFY_METHOD, signatures.REGRESS_METHOD):
      request = (entry.classify_log.request if signature_def.method_name ==
                 signatures.CLASSIFY_METHOD else entry.regress_log.request)
      request.model_spec.signature_name = key
      request.input.example_list.examples.extend(examples)
    elif one_string:
      request = entry.predict_log.request
      request.model_spec.signature_name = key
      (name,) = inputs
      request.inputs[name].CopyFrom(tf.make_tensor_proto(
          [e.SerializeToString() for e in examples], dtype=tf.string))
    elif raw_instances and all(name in raw_instances[0] for name in inputs):
      request = entry.predict_log.request
      request.model_spec.signature_name = key
      for name, info in inputs.items():
        dtype = tf.dtypes.as_dtype(info.dtype)
        request.inputs[name].CopyFrom(tf.make_tensor_proto(
            [row[name] for row in raw_instances], dtype=dtype))
    else:
      continue
    logs.append(entry)
  return logs
