"""Seeded random and mutated gRPC requests against the model server.

A few thousand Predict, Classify, Regress, MultiInference,
GetModelMetadata and GetModelStatus requests, built from random parts (every
dtype number, DT_RESOURCE and DT_VARIANT included, absurd and negative
shapes, rank 40, wrong value counts, tensor_content of the wrong length,
unknown inputs, signatures, methods, models, versions and labels, huge
strings) or mutated from a valid request's bytes, must each get an answer: OK or a client error, never
INTERNAL or UNKNOWN (a server bug). The server must still answer a valid
request afterwards. The tiny models of serving/tiny_models.py keep it quick.
"""

import collections
import random
import time

import grpc
import pytest

tf = pytest.importorskip('tensorflow')

# pylint: disable=g-import-not-at-top,redefined-outer-name
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import inference_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import regression_pb2

from serving import grpc_service
from serving.server import ModelServer, ServerOptions
from serving.versions import ModelConfig

SEED = 20261203
REQUESTS = 3000
TIME_LIMIT = 60  # seconds for all of them
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)

MODELS = ('cls', 'reg', 'cls', 'reg', 'cls', 'nope', '', 'cls\x00', 'r' * 300)
SIGNATURES = ('', 'serving_default', 'raw:predict', 'predict',
              'classification', 'regression', 'nope', '\xff' * 3)
INPUT_NAMES = ('x', 'c', 'inputs', 'examples', 'zzz', '')
DTYPES = list(types_pb2.DataType.values()) + [999, -1, 2**31 - 1]
SMALL_DIMS = (0, 1, 1, 2, 3, 5)
ABSURD_DIMS = (-1, -2**63, 2**31, 2**40, 2**62, 2**63 - 1)
VALUE_FIELDS = ('float_val', 'double_val', 'int_val', 'int64_val',
                'string_val', 'bool_val', 'half_val', 'uint32_val',
                'uint64_val', 'scomplex_val', 'dcomplex_val')
METHODS = {
    'Predict': ('/tensorflow.serving.PredictionService/Predict',
                predict_pb2.PredictResponse),
    'Classify': ('/tensorflow.serving.PredictionService/Classify',
                 classification_pb2.ClassificationResponse),
    'Regress': ('/tensorflow.serving.PredictionService/Regress',
                regression_pb2.RegressionResponse),
    'GetModelMetadata': (
        '/tensorflow.serving.PredictionService/GetModelMetadata',
        get_model_metadata_pb2.GetModelMetadataResponse),
    'GetModelStatus': ('/tensorflow.serving.ModelService/GetModelStatus',
                       get_model_status_pb2.GetModelStatusResponse),
    'MultiInference': (
        '/tensorflow.serving.PredictionService/MultiInference',
        inference_pb2.MultiInferenceResponse),
}
TASK_METHODS = ('tensorflow/serving/classify', 'tensorflow/serving/regress',
                'tensorflow/serving/predict', '')


@pytest.fixture(scope='module')
def server(model_root):
  configs = [ModelConfig('cls', str(model_root / 'cls')),
             ModelConfig('reg', str(model_root / 'reg'), policy='all',
                         labels={'stable': 1, 'canary': 2})]
  options = ServerOptions(models=configs, grpc_port=0, rest_port=None,
                          poll_wait_seconds=0, max_body_bytes=2 << 20)
  srv = ModelServer(options, (grpc_service.start,)).start()
  yield srv
  srv.stop(grace=5)


def _spec(rng, spec):
  spec.name = rng.choice(MODELS)
  roll = rng.random()
  if roll < 0.2:
    spec.version.value = rng.choice((0, 1, 2, 99, -1, 2**63 - 1))
  elif roll < 0.3:
    spec.version_label = rng.choice(('stable', 'canary', 'nope', ''))
  elif roll < 0.35:  # both: not allowed
    spec.version.value = 1
    spec.version_label = 'stable'
  spec.signature_name = rng.choice(SIGNATURES)


def _shape(rng):
  roll = rng.random()
  if roll < 0.05:
    return [1] * 40
  if roll < 0.25:
    shape = [rng.choice(SMALL_DIMS) for _ in range(rng.randint(0, 3))]
    shape.insert(rng.randint(0, len(shape)), rng.choice(ABSURD_DIMS))
    return shape
  return [rng.choice(SMALL_DIMS) for _ in range(rng.randint(0, 3))]


def _string(rng):
  roll = rng.random()
  if roll < 0.02:
    return b'\xff' * rng.choice((1 << 16, 1 << 20))  # huge
  if roll < 0.3:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 8)))
  return rng.choice((b'a', b'b', b'zzz', b'', b'0.5'))


def _tensor(rng):
  proto = tensor_pb2.TensorProto()
  proto.dtype = rng.choice(
      DTYPES if rng.random() < 0.4 else
      (types_pb2.DT_FLOAT, types_pb2.DT_STRING, types_pb2.DT_DOUBLE,
       types_pb2.DT_INT64, types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT))
  shape = _shape(rng)
  if rng.random() < 0.03:
    proto.tensor_shape.unknown_rank = True
  for size in shape:
    proto.tensor_shape.dim.add(size=size)
  size = 1
  for dim in shape:
    size *= max(dim, 0)
  count = rng.choice((min(size, 50), 1, 0, rng.randint(0, 7)))
  if rng.random() < 0.1:
    proto.tensor_content = bytes(rng.getrandbits(8)
                                 for _ in range(rng.randint(0, 64)))
    return proto
  field = (rng.choice(VALUE_FIELDS) if rng.random() < 0.3 else
           {types_pb2.DT_STRING: 'string_val', types_pb2.DT_DOUBLE:
            'double_val', types_pb2.DT_INT64: 'int64_val'}.get(
                proto.dtype, 'float_val'))
  values = getattr(proto, field)
  for _ in range(count):
    if field == 'string_val':
      values.append(_string(rng))
    elif field == 'bool_val':
      values.append(rng.random() < 0.5)
    elif field in ('float_val', 'double_val', 'scomplex_val',
                   'dcomplex_val'):
      values.append(rng.choice((0.5, -1.0, float('nan'), float('inf'),
                                1e38)))
    elif field in ('uint32_val', 'half_val'):
      values.append(rng.randint(0, 2**32 - 1) if field == 'uint32_val'
                    else rng.randint(0, 2**16 - 1))
    elif field == 'uint64_val':
      values.append(rng.randint(0, 2**64 - 1))
    else:
      values.append(rng.randint(-2**31, 2**31 - 1))
  return proto


def _example(rng, example):
  features = example.features.feature
  if rng.random() < 0.5:  # one the models take, perhaps with extras
    features['x'].float_list.value.append(rng.random())
    features['c'].bytes_list.value.append(rng.choice((b'a', b'b', b'q')))
  for _ in range(rng.randint(0, 3)):
    name = rng.choice(('x', 'c', 'x', 'c', 'other', ''))
    kind = rng.choice(('float_list', 'int64_list', 'bytes_list', None))
    if kind is None:
      features[name].SetInParent()
      continue
    values = getattr(features[name], kind).value
    for _ in range(rng.choice((0, 1, 1, 2, 5))):
      if kind == 'float_list':
        values.append(rng.choice((0.2, float('nan'), -1e30, 3.0)))
      elif kind == 'int64_list':
        values.append(rng.choice((0, 1, -2**63, 2**63 - 1)))
      else:
        values.append(_string(rng))


def _input(rng, input_proto):
  roll = rng.random()
  if roll < 0.1:
    return  # empty
  if roll < 0.3:
    data = input_proto.example_list_with_context
    _example(rng, data.context)
    examples = data.examples
  else:
    examples = input_proto.example_list.examples
  for _ in range(rng.choice((0, 1, 1, 2, 3, 40))):
    _example(rng, examples.add())


def _predict(rng):
  request = predict_pb2.PredictRequest()
  _spec(rng, request.model_spec)
  for _ in range(rng.randint(0, 3)):
    request.inputs[rng.choice(INPUT_NAMES)].CopyFrom(_tensor(rng))
  if rng.random() < 0.1:
    request.output_filter.append(rng.choice(('scores', 'nope', '')))
  return request


def _classify(rng, cls=classification_pb2.ClassificationRequest):
  request = cls()
  _spec(rng, request.model_spec)
  _input(rng, request.input)
  return request


def _metadata(rng):
  request = get_model_metadata_pb2.GetModelMetadataRequest()
  _spec(rng, request.model_spec)
  for _ in range(rng.choice((0, 1, 1, 2))):
    request.metadata_field.append(rng.choice(('signature_def', 'nope', '')))
  return request


def _multi_inference(rng):
  request = inference_pb2.MultiInferenceRequest()
  for _ in range(rng.choice((0, 1, 2, 2, 3))):
    task = request.tasks.add()
    _spec(rng, task.model_spec)
    task.method_name = rng.choice(TASK_METHODS)
  _input(rng, request.input)
  return request


def _status(rng):
  request = get_model_status_pb2.GetModelStatusRequest()
  _spec(rng, request.model_spec)
  return request


def _valid_predict():
  request = predict_pb2.PredictRequest()
  request.model_spec.name = 'cls'
  request.model_spec.signature_name = 'raw:predict'
  request.inputs['x'].CopyFrom(tf.make_tensor_proto([0.2, 0.9]))
  request.inputs['c'].CopyFrom(tf.make_tensor_proto(['a', 'b']))
  return request


def _mutated(rng, method, request):
  """The request's bytes with a few bytes changed, if they still parse as
  one (bytes that don't are grpcio's business, not the server's)."""
  data = bytearray(request.SerializeToString())
  for _ in range(rng.randint(1, 4)):
    if data:
      data[rng.randrange(len(data))] = rng.getrandbits(8)
  parsed = type(request)()
  try:
    parsed.ParseFromString(bytes(data))
  except Exception:  # pylint: disable=broad-except
    return method, request
  return method, parsed


def _requests(rng):
  builders = [('Predict', _predict), ('Predict', _predict),
              ('Classify', _classify),
              ('Regress', lambda r: _classify(
                  r, regression_pb2.RegressionRequest)),
              ('GetModelMetadata', _metadata), ('GetModelStatus', _status),
              ('MultiInference', _multi_inference)]
  for _ in range(REQUESTS):
    method, build = rng.choice(builders)
    request = build(rng)
    if rng.random() < 0.2:
      method, request = _mutated(rng, method, request)
    if rng.random() < 0.1:
      method, request = _mutated(rng, 'Predict', _valid_predict())
    yield method, request


def test_grpc_fuzz_never_internal(server):
  rng = random.Random(SEED)
  channel = grpc.insecure_channel(
      f'127.0.0.1:{server.grpc_port}',
      options=[('grpc.max_send_message_length', -1)])
  calls = {name: channel.unary_unary(
      path, request_serializer=lambda message: message.SerializeToString(),
      response_deserializer=response.FromString)
           for name, (path, response) in METHODS.items()}
  codes = collections.Counter()
  bad = []
  started = time.monotonic()
  try:
    for method, request in _requests(rng):
      try:
        calls[method](request, timeout=30)
        code = grpc.StatusCode.OK
      except grpc.RpcError as e:
        code = e.code()
        if code in BAD_CODES or code == grpc.StatusCode.DEADLINE_EXCEEDED:
          bad.append((method, code, e.details(), str(request)[:300]))
      codes[method, code.name] += 1
    elapsed = time.monotonic() - started
    # Still alive and answering.
    response = calls['Predict'](_valid_predict(), timeout=30)
  finally:
    channel.close()
  assert not bad, bad[:5]
  assert elapsed < TIME_LIMIT, f'{REQUESTS} requests took {elapsed:.0f}s'
  assert response.outputs['probabilities'].tensor_shape.dim[0].size == 2, (
      list(response.outputs))
  # The requests reached the models, not just the front checks.
  print(f'{REQUESTS} requests in {elapsed:.1f}s:', dict(codes))
  assert codes['Predict', 'OK'] and codes['Classify', 'OK'], codes
