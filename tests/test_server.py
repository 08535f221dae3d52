"""The model server against TF Serving's real clients, on tiny canned models.

Session fixtures (tests/conftest.py) train a LinearClassifier and a
LinearRegressor for a few steps and export them with a parsing receiver plus
a per-feature ('raw') alternative (serving/tiny_models.py, shared with
benchmarks/bench_serving.py); every answer is compared with calling the
SavedModel in process. tests/test_rest_api.py checks the REST API's answers
without sockets; this file, the servers as clients see them.
"""

import base64
import concurrent.futures
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import requests
from google.protobuf import text_format

tf = pytest.importorskip('tensorflow')

# pylint: disable=g-import-not-at-top,redefined-outer-name
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import inference_pb2
from tensorflow_serving.apis import model_management_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.apis import regression_pb2

from serving import grpc_service, rest
from serving.batching import BatchingOptions, parse_batching_parameters
from serving.server import ModelServer, ServerOptions
from serving.versions import ModelConfig, ModelManager
from serving.versions import parse_model_config_text
from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [(0.2, 'a'), (0.9, 'b'), (0.5, 'zzz')]  # 'zzz' is out of vocabulary

# What `estpipe serve` opens: the REST and gRPC front ends.
FRONT_ENDS = (grpc_service.start, rest.start)


@pytest.fixture(scope='module')
def server(model_root):
  configs = [ModelConfig('cls', str(model_root / 'cls')),
             ModelConfig('reg', str(model_root / 'reg'), policy='all',
                         labels={'stable': 1, 'canary': 2})]
  options = ServerOptions(models=configs, grpc_port=0, rest_port=0,
                          poll_wait_seconds=0, max_body_bytes=100_000)
  srv = ModelServer(options, FRONT_ENDS).start()
  yield srv
  srv.stop(grace=5)


def _example(x, c):
  example = tf.train.Example()
  example.features.feature['x'].float_list.value.append(x)
  example.features.feature['c'].bytes_list.value.append(c.encode())
  return example


def _serialized():
  return [_example(x, c).SerializeToString() for x, c in ROWS]


def _local_raw(local, kind):
  fn = local[kind].signatures['raw:predict']
  out = fn(x=tf.constant([x for x, _ in ROWS]),
           c=tf.constant([c for _, c in ROWS]))
  return {k: v.numpy() for k, v in out.items()}


def _local_examples(local, kind, signature):
  fn = local[kind].signatures[signature]
  outputs = fn(inputs=tf.constant(_serialized()))
  return {k: v.numpy() for k, v in outputs.items()}


def _url(server, path):
  return f'http://127.0.0.1:{server.rest_port}/v1/models/{path}'


def _post(server, path, body, **kwargs):
  data = body if isinstance(body, (bytes, str)) else json.dumps(body)
  return requests.post(_url(server, path), data=data, timeout=30, **kwargs)


# REST

def test_rest_status_of_model_version_and_label(server):
  body = requests.get(_url(server, 'cls'), timeout=10).json()
  assert body == {'model_version_status': [{
      'version': '1', 'state': 'AVAILABLE',
      'status': {'error_code': 'OK', 'error_message': ''}}]}
  both = requests.get(_url(server, 'reg'), timeout=10).json()
  assert [s['version'] for s in both['model_version_status']] == ['2', '1']
  one = requests.get(_url(server, 'reg/versions/1'), timeout=10).json()
  assert [s['version'] for s in one['model_version_status']] == ['1']
  canary = requests.get(_url(server, 'reg/labels/canary'), timeout=10).json()
  assert [s['version'] for s in canary['model_version_status']] == ['2']


def test_rest_metadata_lists_signatures(server):
  body = requests.get(_url(server, 'cls/metadata'), timeout=10).json()
  assert body['model_spec'] == {'name': 'cls', 'version': '1',
                                'signature_name': ''}
  signatures = body['metadata']['signature_def']['signature_def']
  assert {'serving_default', 'classification', 'predict',
          'raw:predict'} <= set(signatures)
  raw = signatures['raw:predict']
  assert raw['method_name'] == 'tensorflow/serving/predict'
  assert raw['inputs']['x']['dtype'] == 'DT_FLOAT'
  assert raw['inputs']['c']['dtype'] == 'DT_STRING'
  labelled = requests.get(_url(server, 'reg/labels/stable/metadata'),
                          timeout=10).json()
  assert labelled['model_spec']['version'] == '1'


@pytest.mark.parametrize('kind,model', [('classifier', 'cls'),
                                        ('regressor', 'reg')])
def test_rest_predict_row_format_per_feature(server, local, kind, model):
  expected = _local_raw(local, kind)
  instances = [{'x': x, 'c': c} for x, c in ROWS]
  response = _post(server, f'{model}:predict',
                   {'signature_name': 'raw:predict', 'instances': instances})
  assert response.status_code == 200, response.text
  predictions = response.json()['predictions']
  assert len(predictions) == len(ROWS)
  for name, value in expected.items():
    # With one output, each prediction is its value, else {output: value}.
    got = [row[name] if len(expected) > 1 else row for row in predictions]
    if value.dtype == object:
      assert got == [[s.decode() for s in r] for r in value]
    else:
      np.testing.assert_allclose(got, value, rtol=1e-6)


def test_rest_predict_columnar_format_per_feature(server, local):
  expected = _local_raw(local, 'regressor')
  response = _post(server, 'reg/versions/2:predict', {
      'signature_name': 'raw:predict',
      'inputs': {'x': [x for x, _ in ROWS], 'c': [c for _, c in ROWS]}})
  assert response.status_code == 200, response.text
  # One output: columnar answers its value directly.
  np.testing.assert_allclose(response.json()['outputs'],
                             expected['predictions'], rtol=1e-6)


def test_rest_predict_b64_serialized_examples(server, local):
  expected = _local_examples(local, 'classifier', 'serving_default')
  instances = [{'b64': base64.b64encode(s).decode()} for s in _serialized()]
  response = _post(server, 'cls:predict', {'instances': instances})
  assert response.status_code == 200, response.text
  predictions = response.json()['predictions']
  np.testing.assert_allclose([p['scores'] for p in predictions],
                             expected['scores'], rtol=1e-6)
  assert predictions[0]['classes'] == ['no', 'yes']
  # The same, columnar, with the input named and the signature by label.
  response = _post(server, 'cls:predict', {
      'signature_name': 'predict',
      'inputs': {'examples': instances}})
  assert response.status_code == 200, response.text
  np.testing.assert_allclose(response.json()['outputs']['probabilities'],
                             expected['scores'], rtol=1e-6)


def test_rest_classify_and_regress(server, local):
  scores = _local_examples(local, 'classifier', 'classification')['scores']
  examples = [{'x': x, 'c': c} for x, c in ROWS]
  response = _post(server, 'cls:classify', {'examples': examples})
  assert response.status_code == 200, response.text
  results = response.json()['results']
  assert [[label for label, _ in r] for r in results] == [['no', 'yes']] * 3
  np.testing.assert_allclose([[s for _, s in r] for r in results], scores,
                             rtol=1e-6)

  values = _local_examples(local, 'regressor', 'regression')['outputs']
  response = _post(server, 'reg/labels/stable:regress',
                   {'signature_name': 'regression', 'examples': examples})
  assert response.status_code == 200, response.text
  np.testing.assert_allclose(response.json()['results'], values.ravel(),
                             rtol=1e-6)


def test_rest_classify_context_fills_shared_features(server):
  with_context = _post(server, 'cls:classify', {
      'context': {'c': 'b'}, 'examples': [{'x': 0.9}, {'x': 0.2, 'c': 'a'}]})
  direct = _post(server, 'cls:classify', {
      'examples': [{'x': 0.9, 'c': 'b'}, {'x': 0.2, 'c': 'a'}]})
  assert with_context.status_code == direct.status_code == 200
  assert with_context.json() == direct.json()


def _assert_error(response, status, *fragments):
  assert response.status_code == status, response.text
  message = response.json()['error']
  for fragment in fragments:
    assert fragment in message, message


RAW = {'signature_name': 'raw:predict'}


@pytest.mark.parametrize('path,body,status,fragments', [
    ('cls:predict', b'{"instances": [', 400, ['not valid JSON']),
    ('cls:predict', {**RAW, 'instances': [{'x': 'high', 'c': 'a'}]}, 400,
     ["input 'x' expects DT_FLOAT", 'got a string']),
    ('cls:predict', {**RAW, 'instances': [{'x': 1.0, 'c': 7}]}, 400,
     ["input 'c' expects DT_STRING"]),
    ('cls:predict', {**RAW, 'inputs': {'x': [[1.0]], 'c': ['a']}}, 400,
     ["input 'x' has shape [1,1]", 'expects [?]']),
    ('cls:predict', {**RAW, 'inputs': {'x': [1.0, [2.0]], 'c': ['a', 'b']}},
     400, ['ragged']),
    ('cls:predict', {**RAW, 'instances': [{'x': 1.0}]}, 400,
     ["missing ['c']"]),
    ('cls:predict', {'signature_name': 'nope', 'instances': [1]}, 400,
     ['"nope" not found', 'raw:predict']),
    ('cls:predict', {**RAW, 'instances': [{'x': 1.0, 'c': 'a'}],
                     'inputs': {'x': [1.0], 'c': ['a']}}, 400,
     ["Only one of 'instances'"]),
    ('cls:predict', {**RAW}, 400, ["Missing 'instances'"]),
    ('nope:predict', {'instances': [1]}, 404,
     ['Servable not found', 'nope']),
    ('cls/versions/7:predict', {'instances': [1]}, 404,
     ['Specific(cls, 7)']),
    ('cls/versions/x:predict', {'instances': [1]}, 400,
     ['version must be a positive integer']),
    ('reg/labels/beta:predict', {'instances': [1]}, 400,
     ['Unrecognized servable version label: beta']),
    ('reg:classify', {'examples': [{'x': 1.0}]}, 400,
     ['Expected classification signature method_name']),
    ('cls:classify', {'examples': []}, 400, ["'examples' must be"]),
    ('cls:classify', {'examples': [{'x': [1.0, 'a']}]}, 400,
     ['examples[0].x']),
    ('cls:explain', {}, 400, ['unknown method :explain']),
])
def test_rest_bad_requests_get_specific_errors(server, path, body, status,
                                                fragments):
  _assert_error(_post(server, path, body), status, *fragments)


def test_rest_oversized_body_and_unknown_paths(server):
  big = {'instances': ['a' * 200_000]}
  _assert_error(_post(server, 'cls:predict', big), 413, 'limit is 100000')
  _assert_error(requests.get(f'http://127.0.0.1:{server.rest_port}/v2/x',
                             timeout=10), 404, 'Malformed request')
  _assert_error(requests.get(_url(server, 'nope'), timeout=10), 404, 'nope')
  _assert_error(requests.get(_url(server, 'cls/versions/9'), timeout=10),
                404, 'version 9')
  # The server keeps answering after every failure above.
  ok = _post(server, 'cls:classify', {'examples': [{'x': 0.2, 'c': 'a'}]})
  assert ok.status_code == 200


def test_rest_keeps_connection_alive_after_errors(server):
  body = json.dumps({'examples': [{'x': 1.0}]})
  with requests.Session() as session:
    for path, status in (('reg:regress', 200),
                         ('reg/versions/x:regress', 400), ('reg:regress', 200),
                         ('nope:regress', 404), ('reg:regress', 200),
                         ('reg/labels/:regress', 400), ('reg:regress', 200)):
      response = session.post(_url(server, path), timeout=10, data=body)
      # Failed requests' bodies were skipped, not read as the next request.
      assert response.status_code == status, (path, response.text)
      assert response.headers.get('Connection') != 'close'
    assert response.json()['results']


def _raw_http(server, data):
  with socket.create_connection(('127.0.0.1', server.rest_port), 10) as sock:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    chunks = []
    while True:
      chunk = sock.recv(65536)
      if not chunk:
        return b''.join(chunks).decode()
      chunks.append(chunk)


def test_rest_protocol_edge_cases(server):
  body = json.dumps({'examples': [{'x': 0.2}]}).encode()
  # curl sends Expect: 100-continue for larger bodies; HTTP/1.0 closes.
  answer = _raw_http(server, (
      b'POST /v1/models/reg:regress HTTP/1.0\r\nExpect: 100-continue\r\n'
      b'Content-Length: %d\r\n\r\n' % len(body)) + body)
  assert answer.startswith('HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK')
  assert '"results"' in answer
  assert _raw_http(server, b'garbage\r\n\r\n').startswith(
      'HTTP/1.1 400 Bad Request')
  answer = _raw_http(server, b'DELETE /v1/models/reg HTTP/1.1\r\n\r\n')
  assert answer.startswith('HTTP/1.1 405') and 'not supported' in answer
  answer = _raw_http(server, b'POST /v1/models/reg:regress HTTP/1.1\r\n\r\n')
  assert answer.startswith('HTTP/1.1 411') and 'Content-Length' in answer


def _read_responses(sock, count):
  """`count` (status line, JSON body) answers read from a socket."""
  data, answers = b'', []
  while len(answers) < count:
    head_end = data.find(b'\r\n\r\n')
    if head_end >= 0:
      head = data[:head_end].decode()
      length = int(head.lower().split('content-length:')[1].split()[0])
      end = head_end + 4 + length
      if len(data) >= end:
        answers.append((head.split('\r\n')[0],
                        json.loads(data[head_end + 4:end])))
        data = data[end:]
        continue
    chunk = sock.recv(65536)
    assert chunk, f'connection closed after {len(answers)} answers'
    data += chunk
  return answers


def test_rest_pipelined_and_large_requests(server, local):
  def post(path, body):
    data = json.dumps(body).encode()
    return (f'POST /v1/models/{path} HTTP/1.1\r\nContent-Length: '
            f'{len(data)}\r\n\r\n').encode() + data

  regress = {'signature_name': 'regression',
             'examples': [{'x': x, 'c': c} for x, c in ROWS]}
  # Requests sent back to back on one connection are answered in order,
  # errors included.
  with socket.create_connection(('127.0.0.1', server.rest_port), 10) as sock:
    sock.sendall(post('reg/versions/1:regress', regress) +
                 b'GET /v1/models/cls HTTP/1.1\r\n\r\n' +
                 post('nope:regress', regress) +
                 post('cls:classify', {'examples': [{'x': 0.9}]}))
    answers = _read_responses(sock, 4)
  assert [status for status, _ in answers] == [
      'HTTP/1.1 200 OK', 'HTTP/1.1 200 OK', 'HTTP/1.1 404 Not Found',
      'HTTP/1.1 200 OK']
  values = _local_examples(local, 'regressor', 'regression')['outputs']
  np.testing.assert_allclose(answers[0][1]['results'], values.ravel(),
                             rtol=1e-6)
  assert answers[1][1]['model_version_status'][0]['state'] == 'AVAILABLE'
  assert 'nope' in answers[2][1]['error']
  assert len(answers[3][1]['results']) == 1

  # A body over 64 KiB is parsed and answered off the event loop.
  xs = np.linspace(0, 1, 2800).astype(np.float32)
  body = {'signature_name': 'raw:predict',
          'inputs': {'x': xs.tolist(), 'c': ['b'] * len(xs)}}
  assert len(json.dumps(body)) > 64 << 10
  response = _post(server, 'cls:predict', body)
  assert response.status_code == 200, response.text
  expected = local['classifier'].signatures['raw:predict'](
      x=tf.constant(xs), c=tf.constant(['b'] * len(xs)))
  np.testing.assert_allclose(response.json()['outputs']['probabilities'],
                             expected['probabilities'].numpy(), rtol=1e-6)


# gRPC

@pytest.fixture(scope='module')
def stubs(server):
  channel = grpc.insecure_channel(f'127.0.0.1:{server.grpc_port}')
  yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
         model_service_pb2_grpc.ModelServiceStub(channel))
  channel.close()


def test_grpc_predict_per_feature_and_output_filter(stubs, local):
  prediction, _ = stubs
  expected = _local_raw(local, 'classifier')
  request = predict_pb2.PredictRequest()
  request.model_spec.name = 'cls'
  request.model_spec.signature_name = 'raw:predict'
  request.inputs['x'].CopyFrom(tf.make_tensor_proto([x for x, _ in ROWS]))
  request.inputs['c'].CopyFrom(tf.make_tensor_proto([c for _, c in ROWS]))
  response = prediction.Predict(request, timeout=30)
  assert response.model_spec.version.value == 1
  assert response.model_spec.signature_name == 'raw:predict'
  assert set(response.outputs) == set(expected)
  for name, value in expected.items():
    got = tf.make_ndarray(response.outputs[name])
    if value.dtype == object:
      assert got.tolist() == value.tolist()
    else:
      np.testing.assert_allclose(got, value, rtol=1e-6)
  request.output_filter.append('probabilities')
  response = prediction.Predict(request, timeout=30)
  assert list(response.outputs) == ['probabilities']


def test_grpc_classify_regress_with_context(stubs, local):
  prediction, _ = stubs
  request = classification_pb2.ClassificationRequest()
  request.model_spec.name = 'cls'
  for x, c in ROWS:
    request.input.example_list.examples.add().CopyFrom(_example(x, c))
  response = prediction.Classify(request, timeout=30)
  scores = _local_examples(local, 'classifier', 'classification')['scores']
  got = [[c.score for c in r.classes]
         for r in response.result.classifications]
  np.testing.assert_allclose(got, scores, rtol=1e-6)
  assert [c.label for c in response.result.classifications[0].classes] == [
      'no', 'yes']

  request = regression_pb2.RegressionRequest()
  request.model_spec.name = 'reg'
  request.model_spec.version_label = 'canary'
  data = request.input.example_list_with_context
  data.context.features.feature['c'].bytes_list.value.append(b'zzz')
  for x, c in ROWS:
    data.examples.add().CopyFrom(_example(x, c))
  response = prediction.Regress(request, timeout=30)
  assert response.model_spec.version.value == 2
  values = _local_examples(local, 'regressor', 'regression')['outputs']
  np.testing.assert_allclose([r.value for r in response.result.regressions],
                             values.ravel(), rtol=1e-6)


def _multi_inference(model, *tasks, version_label=''):
  request = inference_pb2.MultiInferenceRequest()
  for signature, method in tasks:
    task = request.tasks.add(method_name=f'tensorflow/serving/{method}')
    task.model_spec.name = model
    task.model_spec.signature_name = signature
    task.model_spec.version_label = version_label
  for x, c in ROWS:
    request.input.example_list.examples.add().CopyFrom(_example(x, c))
  return request


def test_grpc_multi_inference_answers_like_classify_and_regress(stubs,
                                                                local):
  prediction, _ = stubs
  # A binary classifier exports a regression signature (the logistic) too.
  response = prediction.MultiInference(_multi_inference(
      'cls', ('classification', 'classify'), ('regression', 'regress')),
                                       timeout=30)
  classified, regressed = response.results
  assert (classified.model_spec.name, classified.model_spec.signature_name,
          classified.model_spec.version.value) == ('cls', 'classification', 1)
  assert regressed.model_spec.signature_name == 'regression'
  assert classified.WhichOneof('result') == 'classification_result'
  assert regressed.WhichOneof('result') == 'regression_result'

  # The same answers as Classify and Regress, and as the model in process.
  classify = classification_pb2.ClassificationRequest()
  classify.model_spec.name = 'cls'
  classify.input.CopyFrom(_multi_inference('cls').input)
  alone = prediction.Classify(classify, timeout=30).result
  assert classified.classification_result == alone
  scores = _local_examples(local, 'classifier', 'classification')['scores']
  np.testing.assert_allclose(
      [[c.score for c in r.classes]
       for r in classified.classification_result.classifications],
      scores, rtol=1e-6)
  assert [c.label for c in classified.classification_result
          .classifications[0].classes] == ['no', 'yes']
  regress = regression_pb2.RegressionRequest()
  regress.model_spec.name = 'cls'
  regress.model_spec.signature_name = 'regression'
  regress.input.CopyFrom(classify.input)
  assert regressed.regression_result == prediction.Regress(
      regress, timeout=30).result
  logistic = _local_examples(local, 'classifier', 'regression')['outputs']
  np.testing.assert_allclose(
      [r.value for r in regressed.regression_result.regressions],
      logistic.ravel(), rtol=1e-6)
  np.testing.assert_allclose(logistic.ravel(), scores[:, 1], rtol=1e-6)

  # A version label on the first task picks the version, as TF Serving's.
  response = prediction.MultiInference(_multi_inference(
      'reg', ('regression', 'regress'), version_label='stable'), timeout=30)
  assert response.results[0].model_spec.version.value == 1
  values = _local_examples(local, 'regressor', 'regression')['outputs']
  np.testing.assert_allclose(
      [r.value for r in response.results[0].regression_result.regressions],
      values.ravel(), rtol=1e-6)


@pytest.mark.parametrize('tasks,code,message', [
    ((('classification', 'classify'), ('classification', 'classify')),
     grpc.StatusCode.INVALID_ARGUMENT,
     'Duplicate evaluation of signature: classification'),
    ((('nope', 'classify'),), grpc.StatusCode.INVALID_ARGUMENT,
     'Requested signature not found in model graph: nope'),
    ((('predict', 'predict'),), grpc.StatusCode.UNIMPLEMENTED,
     'Unsupported signature method_name: tensorflow/serving/predict'),
    ((('regression', 'classify'),), grpc.StatusCode.INVALID_ARGUMENT,
     'Expected classification signature method_name'),
    ((), grpc.StatusCode.INVALID_ARGUMENT, 'no tasks'),
])
def test_grpc_multi_inference_rejects_bad_tasks(stubs, tasks, code, message):
  prediction, _ = stubs
  with pytest.raises(grpc.RpcError) as error:
    prediction.MultiInference(_multi_inference('cls', *tasks), timeout=30)
  assert error.value.code() == code
  assert message in error.value.details()


def test_grpc_multi_inference_takes_one_model(stubs):
  prediction, _ = stubs
  request = _multi_inference('cls', ('classification', 'classify'))
  other = request.tasks.add(method_name='tensorflow/serving/regress')
  other.model_spec.name = 'reg'
  other.model_spec.signature_name = 'regression'
  with pytest.raises(grpc.RpcError) as error:
    prediction.MultiInference(request, timeout=30)
  assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert 'must access the same model name' in error.value.details()


def test_grpc_metadata_and_status(stubs):
  prediction, model = stubs
  request = get_model_metadata_pb2.GetModelMetadataRequest()
  request.model_spec.name = 'reg'
  request.metadata_field.append('signature_def')
  response = prediction.GetModelMetadata(request, timeout=30)
  signatures = get_model_metadata_pb2.SignatureDefMap()
  response.metadata['signature_def'].Unpack(signatures)
  assert response.model_spec.version.value == 2
  assert signatures.signature_def['regression'].method_name == (
      'tensorflow/serving/regress')

  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = 'reg'
  response = model.GetModelStatus(request, timeout=30)
  states = {s.version: s.state for s in response.model_version_status}
  available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
  assert states == {1: available, 2: available}


def test_grpc_errors_carry_status_codes(stubs):
  prediction, model = stubs
  request = predict_pb2.PredictRequest()
  request.model_spec.name = 'nope'
  with pytest.raises(grpc.RpcError) as error:
    prediction.Predict(request, timeout=30)
  assert error.value.code() == grpc.StatusCode.NOT_FOUND
  request.model_spec.name = 'cls'
  request.model_spec.signature_name = 'raw:predict'
  request.inputs['x'].CopyFrom(tf.make_tensor_proto(['a']))
  request.inputs['c'].CopyFrom(tf.make_tensor_proto(['a']))
  with pytest.raises(grpc.RpcError) as error:
    prediction.Predict(request, timeout=30)
  assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert "input 'x' is DT_STRING" in error.value.details()
  status = get_model_status_pb2.GetModelStatusRequest()
  status.model_spec.name = 'cls'
  status.model_spec.version.value = 5
  with pytest.raises(grpc.RpcError) as error:
    model.GetModelStatus(status, timeout=30)
  assert error.value.code() == grpc.StatusCode.NOT_FOUND



def _tensor(dtype, shape, **values):
  """A TensorProto as a client may send it, without TF's checks."""
  proto = tensor_pb2.TensorProto(dtype=dtype)
  for size in shape:
    proto.tensor_shape.dim.add(size=size)
  for field, value in values.items():
    if field == 'tensor_content':
      proto.tensor_content = value
    else:
      getattr(proto, field).extend(value)
  return proto


@pytest.mark.parametrize('tensor,message', [
    (_tensor(types_pb2.DT_FLOAT, [2**40], float_val=[1.0]), 'above the limit'),
    (_tensor(types_pb2.DT_FLOAT, [1] * 40, float_val=[1.0]), 'rank 40'),
    (_tensor(types_pb2.DT_FLOAT, [2**62, 2**62], float_val=[1.0]),
     'above the limit'),
    (_tensor(types_pb2.DT_FLOAT, [3, -1], float_val=[1.0]),
     'negative dimension'),
    (_tensor(types_pb2.DT_RESOURCE, [1]), 'dtype DT_RESOURCE'),
    (_tensor(types_pb2.DT_VARIANT, [1]), 'dtype DT_VARIANT'),
    (_tensor(types_pb2.DT_FLOAT_REF, [1], float_val=[1.0]),
     'dtype DT_FLOAT_REF'),
    (_tensor(999, [1]), 'unknown dtype (999)'),
    (_tensor(types_pb2.DT_FLOAT, [3], float_val=[1.0, 2.0]), '2 values'),
    (_tensor(types_pb2.DT_FLOAT, [2], tensor_content=b'abc'),
     'tensor_content holds 3 bytes'),
    (_tensor(types_pb2.DT_HALF, [2**40], half_val=[0]), 'above the limit'),
])
def test_grpc_rejects_absurd_tensors_before_allocating(stubs, tensor,
                                                        message):
  """Shapes, ranks and dtypes a client declares are checked against the
  limits and the values sent before anything is allocated."""
  prediction, _ = stubs
  request = predict_pb2.PredictRequest()
  request.model_spec.name = 'cls'
  request.model_spec.signature_name = 'raw:predict'
  request.inputs['x'].CopyFrom(tensor)
  request.inputs['c'].CopyFrom(tf.make_tensor_proto(['a']))
  with pytest.raises(grpc.RpcError) as error:
    prediction.Predict(request, timeout=30)
  assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (
      error.value.details())
  assert message in error.value.details()
  assert "input 'x'" in error.value.details()



def _nested(value, depth):
  for _ in range(depth):
    value = [value]
  return value


@pytest.mark.parametrize('inputs', [
    {'x': [0.5], 'c': _nested('a', 40)},
    {'x': _nested(0.5, 40), 'c': ['a']},
])
def test_rest_rejects_absurd_ranks(server, inputs):
  """REST's equivalent of a rank-40 tensor is a 400, not a 500."""
  response = _post(server, 'cls:predict',
                   {'signature_name': 'raw:predict', 'inputs': inputs})
  assert response.status_code == 400, response.text


# Batching

def test_batching_merges_concurrent_requests(model_root, local):
  options = ServerOptions(
      models=[ModelConfig('cls', str(model_root / 'cls'))], grpc_port=None,
      rest_port=0, poll_wait_seconds=0,
      batching=BatchingOptions(max_batch_size=16, batch_timeout_micros=20000,
                               num_batch_threads=1))
  srv = ModelServer(options, FRONT_ENDS).start()
  try:
    fn = local['classifier'].signatures['raw:predict']
    xs = np.linspace(0, 1, 24).astype(np.float32)
    expected = fn(x=tf.constant(xs), c=tf.constant(['b'] * 24))

    def one(i):
      response = _post(srv, 'cls:predict', {
          'signature_name': 'raw:predict',
          'instances': [{'x': float(xs[i]), 'c': 'b'}]})
      assert response.status_code == 200, response.text
      return response.json()['predictions'][0]['probabilities']

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
      got = list(pool.map(one, range(24)))
    np.testing.assert_allclose(got, expected['probabilities'].numpy(),
                               rtol=1e-6)
    stats = srv.batcher.stats
    assert stats['rows'] == 24
    assert stats['batches'] < 24  # requests were merged
  finally:
    srv.stop(grace=5)


def test_batching_parameters_text_format():
  options = parse_batching_parameters(
      'max_batch_size { value: 32 } batch_timeout_micros { value: 1000 }\n'
      'num_batch_threads { value: 2 } max_enqueued_batches { value: 50 }')
  assert (options.max_batch_size, options.batch_timeout_micros,
          options.num_batch_threads, options.max_enqueued_batches) == (
              32, 1000, 2, 50)
  with pytest.raises(Exception, match='max_batch_sizes'):
    parse_batching_parameters('max_batch_sizes { value: 3 }')


def test_model_config_file_policies_and_labels(tmp_path):
  text = f'''
  model_config_list {{
    config {{ name: "a" base_path: "{tmp_path}/a" model_platform: "tensorflow"
             model_version_policy {{ latest {{ num_versions: 2 }} }} }}
    config {{ name: "b" base_path: "{tmp_path}/b"
             model_version_policy {{ specific {{ versions: 3 versions: 5 }} }}
             version_labels {{ key: "stable" value: 3 }} }}
    config {{ name: "c" base_path: "{tmp_path}/c"
             model_version_policy {{ all {{}} }} }}
  }}'''
  a, b, c = parse_model_config_text(text)
  assert a.aspired([1, 2, 3]) == {2, 3}
  assert b.aspired([1, 3, 4, 5]) == {3, 5} and b.labels == {'stable': 3}
  assert c.aspired([1, 2]) == {1, 2}
  with pytest.raises(ValueError, match='unique'):
    parse_model_config_text('model_config_list { config { name: "a" '
                            'base_path: "/x" } config { name: "a" '
                            'base_path: "/y" } }')
  with pytest.raises(ValueError, match='model_platform'):
    parse_model_config_text('model_config_list { config { name: "a" '
                            'base_path: "/x" model_platform: "onnx" } }')


# Model config reload

def _model_config(*models):
  """ModelServerConfig text of (name, base path, extra fields) entries."""
  return 'model_config_list {\n' + ''.join(
      f'  config {{ name: "{name}" base_path: "{base}" {extra} }}\n'
      for name, base, extra in models) + '}\n'


def _rest_regress(srv, path):
  return _post(srv, f'{path}:regress', {'signature_name': 'regression',
                                        'examples': [{'x': 0.2, 'c': 'a'}]})


def test_model_config_file_is_polled_and_applied(model_root, tmp_path,
                                                 caplog):
  config = tmp_path / 'models.config'
  config.write_text(_model_config(('cls', model_root / 'cls', '')))
  srv = ModelServer(ServerOptions(
      models=parse_model_config_text(config.read_text()), grpc_port=None,
      rest_port=0, poll_wait_seconds=0, model_config_file=str(config),
      model_config_poll_seconds=0.05), FRONT_ENDS).start()
  try:
    assert _rest_regress(srv, 'cls').status_code == 200
    # Add reg (version 1 only, a label), remove cls: the poller applies it.
    config.write_text(_model_config(
        ('reg', model_root / 'reg', 'model_version_policy { specific { '
         'versions: 1 } } version_labels { key: "stable" value: 1 }')))
    _wait_for(lambda: srv.manager.model_names == ['reg'], 30)
    assert _rest_regress(srv, 'reg/labels/stable').status_code == 200
    assert srv.resolve('reg').version == 1
    _assert_error(_rest_regress(srv, 'cls'), 404, 'Servable not found')
    # The removed model's version is reported as unloaded, as TF Serving.
    status = requests.get(_url(srv, 'cls'), timeout=10).json()
    assert [s['state'] for s in status['model_version_status']] == ['END']

    # A new policy and label: version 2 is loaded, 1 unloaded.
    config.write_text(_model_config(
        ('reg', model_root / 'reg', 'model_version_policy { specific { '
         'versions: 2 } } version_labels { key: "canary" value: 2 }')))
    _wait_for(lambda: srv.resolve('reg').version == 2, 30)
    assert dict(srv.statuses('reg'))[1].state == 'END'
    assert _rest_regress(srv, 'reg/labels/canary').status_code == 200
    _assert_error(_rest_regress(srv, 'reg/labels/stable'), 400,
                  'Unrecognized servable version label: stable')

    # A bad file is logged with its reason; the config in force stays.
    with caplog.at_level(logging.ERROR, logger='estpipe'):
      config.write_text(_model_config(
          ('reg', model_root / 'reg', ''), ('reg', model_root / 'cls', '')))
      _wait_for(lambda: 'not applied' in caplog.text, 30)
    assert 'model names must be unique, repeated: reg' in caplog.text
    assert 'keeping the current config' in caplog.text
    assert srv.manager.model_names == ['reg']
    assert srv.resolve('reg', label='canary').version == 2
    assert _rest_regress(srv, 'reg').status_code == 200
  finally:
    srv.stop(grace=5)


def test_model_config_reload_keeps_serving_a_moved_model(model_root,
                                                         tmp_path):
  moved = tmp_path / 'moved'
  shutil.copytree(model_root / 'reg' / '1', moved / '7')
  srv = ModelServer(ServerOptions(
      models=[ModelConfig('reg', str(model_root / 'reg'))], grpc_port=None,
      rest_port=None, poll_wait_seconds=0)).start()
  try:
    before = srv.resolve('reg')
    assert before.version == 2
    srv.reload_config([ModelConfig('reg', str(moved))])
    # Loaded before the swap: the call returns with the new base path served.
    assert srv.resolve('reg').version == 7
    assert srv.resolve('reg').path == str(moved / '7')
    assert dict(srv.statuses('reg'))[2].state == 'END'
    # The same config again changes nothing.
    served = srv.resolve('reg')
    srv.reload_config([ModelConfig('reg', str(moved))])
    assert srv.resolve('reg') is served
  finally:
    srv.stop(grace=5)


def test_grpc_handle_reload_config_request(model_root):
  srv = ModelServer(ServerOptions(
      models=[ModelConfig('cls', str(model_root / 'cls'))], grpc_port=0,
      rest_port=None, poll_wait_seconds=0), FRONT_ENDS).start()
  channel = grpc.insecure_channel(f'127.0.0.1:{srv.grpc_port}')
  try:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(_model_config(
        ('cls', model_root / 'cls', ''),
        ('reg', model_root / 'reg', 'model_version_policy { all {} } '
         'version_labels { key: "canary" value: 2 }')), request.config)
    response = stub.HandleReloadConfigRequest(request, timeout=60)
    assert response.status.error_code == 0
    # The added model answers at once: loading finished before the reply.
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = 'reg'
    states = {s.version: s.state for s in
              stub.GetModelStatus(status, timeout=30).model_version_status}
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert states == {1: available, 2: available}
    assert srv.resolve('reg', label='canary').version == 2

    bad = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(_model_config(('x', '', '')), bad.config)
    with pytest.raises(grpc.RpcError) as error:
      stub.HandleReloadConfigRequest(bad, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'base_path is required' in error.value.details()
    bad = model_management_pb2.ReloadConfigRequest()
    bad.config.custom_model_config.Pack(
        model_management_pb2.ReloadConfigRequest())
    with pytest.raises(grpc.RpcError) as error:
      stub.HandleReloadConfigRequest(bad, timeout=30)
    assert 'Only ModelConfigList is currently supported' in (
        error.value.details())
    assert srv.manager.model_names == ['cls', 'reg']  # unchanged
  finally:
    channel.close()
    srv.stop(grace=5)


# Versions

def _publish(source, base, version):
  """Copies an export in like a real exporter: temp dir, then rename."""
  tmp = os.path.join(base, f'temp-{version}-{time.time_ns()}')
  shutil.copytree(source, tmp)
  os.rename(tmp, os.path.join(base, str(version)))


def test_new_version_swaps_in_without_failed_requests(exports, tmp_path):
  base = tmp_path / 'cls'
  base.mkdir()
  _publish(exports['classifier'], str(base), 1)
  options = ServerOptions(models=[ModelConfig('cls', str(base))],
                          grpc_port=0, rest_port=0, poll_wait_seconds=0.2)
  srv = ModelServer(options, FRONT_ENDS).start()
  channel = grpc.insecure_channel(f'127.0.0.1:{srv.grpc_port}')
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  stop = threading.Event()
  seen, failures = [], []

  def client():
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = 'cls'
    request.input.example_list.examples.add().CopyFrom(_example(0.2, 'a'))
    with requests.Session() as session:
      while not stop.is_set():
        try:
          rest = session.post(_url(srv, 'cls:classify'), timeout=30,
                              data=json.dumps({'examples': [{'x': 0.2}]}))
          if rest.status_code != 200:
            failures.append(rest.text)
          seen.append(stub.Classify(request, timeout=30)
                      .model_spec.version.value)
        except Exception as e:  # pylint: disable=broad-except
          failures.append(repr(e))

  threads = [threading.Thread(target=client) for _ in range(2)]
  for thread in threads:
    thread.start()
  try:
    # Half-written or foreign folders are never loaded.
    os.makedirs(base / '5' / 'variables')  # no saved_model.pb yet
    shutil.copytree(exports['classifier'], base / 'temp-9')
    shutil.copytree(exports['classifier'], base / 'v3')
    _publish(exports['classifier'], str(base), 2)
    _wait_for(lambda: seen and seen[-1] == 2)
    shutil.rmtree(base / '2')  # back to version 1
    _wait_for(lambda: seen[-1] == 1)
  finally:
    stop.set()
    for thread in threads:
      thread.join()
    channel.close()
    statuses = dict(srv.statuses('cls'))
    srv.stop(grace=5)
  assert not failures, failures[:3]
  assert set(seen) == {1, 2}
  assert set(statuses) == {1, 2}  # never 5 or 9
  assert statuses[2].state == 'END' and statuses[1].state == 'AVAILABLE'


def test_broken_version_is_skipped_and_reported(exports, tmp_path):
  base = tmp_path / 'cls'
  base.mkdir()
  _publish(exports['classifier'], str(base), 1)
  broken = base / '2'
  shutil.copytree(exports['classifier'], broken)
  (broken / 'saved_model.pb').write_bytes(b'not a SavedModel')
  options = ServerOptions(models=[ModelConfig('cls', str(base))],
                          grpc_port=None, rest_port=0, poll_wait_seconds=0)
  srv = ModelServer(options, FRONT_ENDS).start()
  try:
    # The newest version failed to load, so the one before it serves.
    assert srv.resolve('cls').version == 1
    status = requests.get(_url(srv, 'cls'), timeout=10).json()
    by_version = {s['version']: s for s in status['model_version_status']}
    assert by_version['1']['state'] == 'AVAILABLE'
    assert by_version['2']['state'] == 'END'
    assert by_version['2']['status']['error_code'] == 'UNKNOWN'
    assert by_version['2']['status']['error_message']
    _assert_error(_post(srv, 'cls/versions/2:classify',
                        {'examples': [{'x': 1.0}]}), 404, 'Specific(cls, 2)')
  finally:
    srv.stop(grace=5)



def test_slowly_copied_version_is_retried_and_old_one_kept(exports, tmp_path,
                                                            caplog):
  """Version 2 copied in slowly: saved_model.pb first, its variables later.
  Its failed load is retried (nothing touched once the copy is complete),
  and version 1 serves until version 2 loads, even once its folder is
  deleted (availability first, as TF Serving's AvailabilityPreservingPolicy).
  With no version left on disk the model is unloaded."""
  caplog.set_level(logging.INFO, logger='estpipe')
  base = tmp_path / 'cls'
  base.mkdir()
  _publish(exports['classifier'], str(base), 1)
  options = ServerOptions(models=[ModelConfig('cls', str(base))],
                          grpc_port=0, rest_port=None, poll_wait_seconds=0.1,
                          load_retry_seconds=0.2, load_retry_max_seconds=1)
  srv = ModelServer(options, (grpc_service.start,)).start()
  channel = grpc.insecure_channel(f'127.0.0.1:{srv.grpc_port}')
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  request = classification_pb2.ClassificationRequest()
  request.model_spec.name = 'cls'
  request.input.example_list.examples.add().CopyFrom(_example(0.2, 'a'))

  def served():
    return stub.Classify(request, timeout=30).model_spec.version.value

  try:
    slow = base / '2'
    (slow / 'variables').mkdir(parents=True)
    shutil.copy2(os.path.join(exports['classifier'], 'saved_model.pb'), slow)
    _wait_for(lambda: dict(srv.statuses('cls')).get(2) and
              dict(srv.statuses('cls'))[2].error)
    assert served() == 1
    shutil.rmtree(base / '1')  # the old version goes while 2 is broken
    time.sleep(1)  # polls and retries
    assert srv.statuses('cls', 2)[0][1].state != 'AVAILABLE'
    assert served() == 1
    # The copy completes, with the source's times (as cp -p, rsync -t).
    source = os.path.join(exports['classifier'], 'variables')
    for name in os.listdir(source):
      shutil.copy2(os.path.join(source, name), slow / 'variables')
    _wait_for(lambda: served() == 2, timeout=30)
    assert srv.statuses('cls', 1)[0][1].state == 'END'
    shutil.rmtree(slow)  # nothing left on disk: nothing served
    _wait_for(lambda: not srv.manager.config('cls') or
              not srv.manager._model('cls').servables, timeout=30)  # pylint: disable=protected-access
    with pytest.raises(grpc.RpcError) as error:
      served()
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
  finally:
    channel.close()
    srv.stop(grace=5)
  failures = [r.getMessage() for r in caplog.records
              if 'version 2 failed to load (attempt' in r.getMessage()]
  assert failures and 'retrying in' in failures[0], failures


def test_failed_load_is_retried_with_backoff(model_root, caplog):
  """A load that fails with nothing changing on disk is retried after a
  backoff that doubles, each failure logged with its error."""
  caplog.set_level(logging.INFO, logger='estpipe')
  attempts = []

  def flaky(servable):
    attempts.append(time.monotonic())
    if len(attempts) < 3:
      raise OSError(f'flaky storage #{len(attempts)}')

  manager = ModelManager([ModelConfig('cls', str(model_root / 'cls'))],
                         poll_wait_seconds=0, on_load=flaky,
                         load_retry_seconds=0.3, load_retry_max_seconds=10)
  manager.start()
  assert len(attempts) == 1 and not manager._model('cls').servables  # pylint: disable=protected-access
  manager.poll()
  assert len(attempts) == 1  # backing off
  _wait_for(lambda: manager.poll() or len(attempts) == 2)
  _wait_for(lambda: manager.poll() or len(attempts) == 3)
  assert manager.resolve('cls').version == 1
  assert attempts[1] - attempts[0] >= 0.3
  assert attempts[2] - attempts[1] >= 0.6  # doubled
  errors = [r.getMessage() for r in caplog.records
            if r.levelno == logging.ERROR]
  assert len(errors) == 2
  assert 'attempt 1' in errors[0] and 'flaky storage #1' in errors[0]
  assert 'attempt 2' in errors[1] and 'retrying in 0.6s' in errors[1]


def _wait_for(condition, timeout=60):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.05)


# The command line

def test_serve_command_finishes_in_flight_request_on_sigterm(model_root,
                                                            tmp_path):
  params = tmp_path / 'batching.txt'
  # A long batch timeout keeps the request in flight when SIGTERM arrives.
  params.write_text('max_batch_size { value: 8 }\n'
                    'batch_timeout_micros { value: 2000000 }\n')
  rest_port = free_port()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT)
  process = subprocess.Popen(
      [sys.executable, '-m', 'pipeline.cli', 'serve', '--model_name=cls',
       f'--model_base_path={model_root / "cls"}', '--port=0',
       f'--rest_api_port={rest_port}', '--enable_batching',
       f'--batching_parameters_file={params}'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    _wait_for(lambda: _answers(rest_port) or process.poll() is not None, 120)
    assert process.poll() is None, process.stdout.read().decode()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      started = time.monotonic()
      pending = pool.submit(
          requests.post, f'http://127.0.0.1:{rest_port}/v1/models/cls:predict',
          data=json.dumps({'signature_name': 'raw:predict',
                           'instances': [{'x': 0.5, 'c': 'a'}]}), timeout=60)
      time.sleep(0.5)
      process.send_signal(signal.SIGTERM)
      response = pending.result()
    assert response.status_code == 200, response.text
    assert time.monotonic() - started >= 1.5  # it really waited for it
    assert process.wait(timeout=60) == 0
  finally:
    if process.poll() is None:
      process.kill()
  log = process.stdout.read().decode()
  assert 'shutting down' in log and 'stopped' in log, log


def _answers(port):
  try:
    return requests.get(f'http://127.0.0.1:{port}/v1/models/cls',
                        timeout=2).status_code == 200
  except requests.RequestException:
    return False


def _serve_args(*flags):
  from pipeline import cli
  return cli.build_parser().parse_args(['serve', *flags])


def test_serve_flags_become_server_options(tmp_path):
  from pipeline.errors import UserError
  from serving.commands import serve_options
  (tmp_path / 'a').mkdir()
  config = tmp_path / 'models.config'
  config.write_text(f'''model_config_list {{
    config {{ name: "a" base_path: "{tmp_path / 'a'}"
             model_version_policy {{ all {{}} }}
             version_labels {{ key: "stable" value: 1 }} }} }}''')
  options = serve_options(_serve_args(
      f'--model_config_file={config}', '--port=9000', '--rest_api_port=0',
      '--enable_batching=true', '--host=0.0.0.0',
      '--model_config_file_poll_wait_seconds=30',
      '--enable_model_warmup=false', '--load_retry_interval_micros=250000'))
  (model,) = options.models
  assert (model.name, model.policy, model.labels) == ('a', 'all',
                                                      {'stable': 1})
  assert not options.model_warmup and options.load_retry_seconds == 0.25
  assert options.grpc_port == 9000 and options.rest_port is None
  assert options.host == '0.0.0.0' and options.batching is not None
  assert (options.model_config_file, options.model_config_poll_seconds) == (
      str(config), 30)
  options = serve_options(_serve_args('--model_name=m',
                                      f'--model_base_path={tmp_path / "a"}'))
  assert options.models[0].name == 'm' and options.batching is None
  assert (options.grpc_port, options.rest_port, options.host) == (
      8500, 8501, '127.0.0.1')
  assert options.model_warmup and options.load_retry_seconds == 1
  for flags, message in (
      ([], 'give --model_base_path'),
      ([f'--model_config_file={config}', f'--model_base_path={tmp_path}'],
       'not both'),
      ([f'--model_base_path={tmp_path / "none"}'], 'does not exist'),
      ([f'--model_base_path={tmp_path}',
        f'--batching_parameters_file={config}'], 'needs --enable_batching'),
      ([f'--model_config_file={tmp_path / "none"}'], 'cannot read'),
      ([f'--model_base_path={tmp_path}',
        '--file_system_poll_wait_seconds=-1'], 'must be >= 0'),
      ([f'--model_config_file={config}',
        '--model_config_file_poll_wait_seconds=-1'], 'must be >= 0'),
      ([f'--model_base_path={tmp_path}',
        '--model_config_file_poll_wait_seconds=5'],
       'needs --model_config_file')):
    with pytest.raises(UserError, match=message):
      serve_options(_serve_args(*flags))


def test_serve_command_rejects_bad_flags(tmp_path):
  from pipeline import cli
  assert cli.main(['serve', '--model_base_path', str(tmp_path / 'none')]) == 1
  params = tmp_path / 'bad.txt'
  params.write_text('max_batch_size: 3')
  assert cli.main(['serve', '--model_base_path', str(tmp_path),
                   '--enable_batching',
                   f'--batching_parameters_file={params}']) == 1
