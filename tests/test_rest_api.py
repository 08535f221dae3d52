"""TF Serving's REST API without sockets, on the tiny canned models.

`rest.answer` hands a request to the REST API as the HTTP server would
(head, body checks, model call, answer on an event loop), so these tests
check the API's answers, batching and the large-body path included, without
ports; tests/test_server.py checks the same servers over real connections.
"""

import concurrent.futures
import json

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

# pylint: disable=g-import-not-at-top,redefined-outer-name
from serving import rest
from serving.batching import BatchingOptions
from serving.server import ModelServer, ServerOptions
from serving.versions import ModelConfig

XS = [0.2, 0.9, 0.5]
CS = ['a', 'b', 'zzz']  # 'zzz' is out of vocabulary
RAW = 'raw:predict'


@pytest.fixture(scope='module')
def core(model_root):
  """A ModelServer with no front ends: requests reach it only here."""
  srv = ModelServer(ServerOptions(
      models=[ModelConfig('cls', str(model_root / 'cls')),
              ModelConfig('reg', str(model_root / 'reg'), policy='all',
                          labels={'stable': 1, 'canary': 2})],
      grpc_port=None, rest_port=None, poll_wait_seconds=0,
      max_body_bytes=100_000)).start()
  yield srv
  srv.stop(grace=5)


def _post(core, path, body):
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  return rest.answer(core, 'POST', f'/v1/models/{path}', data)


def _get(core, path):
  return rest.answer(core, 'GET', f'/v1/models/{path}')


def _raw(local, kind, xs=XS, cs=CS):
  outputs = local[kind].signatures[RAW](x=tf.constant(xs), c=tf.constant(cs))
  return {name: value.numpy() for name, value in outputs.items()}


def test_status_json_of_model_version_and_label(core):
  assert _get(core, 'cls') == (200, {'model_version_status': [{
      'version': '1', 'state': 'AVAILABLE',
      'status': {'error_code': 'OK', 'error_message': ''}}]})
  for path, versions in (('reg', ['2', '1']), ('reg/versions/1', ['1']),
                         ('reg/labels/canary', ['2'])):
    status, body = _get(core, path)
    assert status == 200, body
    assert [s['version'] for s in body['model_version_status']] == versions


def test_metadata_json(core):
  status, body = _get(core, 'reg/labels/stable/metadata')
  assert status == 200, body
  assert body['model_spec'] == {'name': 'reg', 'version': '1',
                                'signature_name': ''}
  signatures = body['metadata']['signature_def']['signature_def']
  assert {'serving_default', 'regression', 'predict', RAW} <= set(signatures)
  assert signatures[RAW]['inputs']['c']['dtype'] == 'DT_STRING'


def test_predict_row_format(core, local):
  expected = _raw(local, 'classifier')
  status, body = _post(core, 'cls:predict', {
      'signature_name': RAW,
      'instances': [{'x': x, 'c': c} for x, c in zip(XS, CS)]})
  assert status == 200, body
  rows = body['predictions']
  assert len(rows) == len(XS)
  np.testing.assert_allclose([r['probabilities'] for r in rows],
                             expected['probabilities'], rtol=1e-6)
  assert [r['classes'] for r in rows] == [
      [s.decode() for s in row] for row in expected['classes']]


def test_predict_columnar_format(core, local):
  status, body = _post(core, 'reg/versions/2:predict', {
      'signature_name': RAW, 'inputs': {'x': XS, 'c': CS}})
  assert status == 200, body
  # One output: columnar answers its value, not {name: value}.
  np.testing.assert_allclose(body['outputs'],
                             _raw(local, 'regressor')['predictions'],
                             rtol=1e-6)


def test_classify_and_regress_results(core, local):
  examples = [{'x': x, 'c': c} for x, c in zip(XS, CS)]
  status, body = _post(core, 'cls:classify', {'examples': examples})
  assert status == 200, body
  assert [[label for label, _ in r] for r in body['results']] == [
      ['no', 'yes']] * len(XS)
  np.testing.assert_allclose(
      [[score for _, score in r] for r in body['results']],
      _raw(local, 'classifier')['probabilities'], rtol=1e-6)

  status, body = _post(core, 'reg/labels/stable:regress', {
      'signature_name': 'regression', 'examples': examples})
  assert status == 200, body
  np.testing.assert_allclose(body['results'],
                             _raw(local, 'regressor')['predictions'].ravel(),
                             rtol=1e-6)


@pytest.mark.parametrize('method,path,body,status,fragment', [
    ('POST', 'nope:predict', {'instances': [1]}, 404,
     'Servable not found for request: Latest(nope)'),
    ('POST', 'cls/versions/7:predict', {'instances': [1]}, 404,
     'Specific(cls, 7)'),
    ('GET', 'reg/versions/9', None, 404, 'Could not find version 9'),
    ('POST', 'cls:predict', b'{"instances": [', 400, 'not valid JSON'),
    ('POST', 'cls:predict', b'[1]', 400, 'must be a JSON object'),
    ('POST', 'cls:predict', {'signature_name': RAW,
                             'instances': [{'x': 1.0}]}, 400, "missing ['c']"),
    ('POST', 'cls:predict', {'signature_name': RAW,
                             'inputs': {'x': ['high'], 'c': ['a']}}, 400,
     "input 'x' expects DT_FLOAT"),
    ('POST', 'cls:predict', {'signature_name': RAW,
                             'instances': [{'x': 1.0, 'c': 'a', 'y': 2}]},
     400, "unexpected ['y']"),
    ('POST', 'reg:classify', {'examples': [{'x': 1.0}]}, 400,
     'Expected classification signature method_name'),
    ('POST', 'reg/labels/beta:regress', {'examples': [{'x': 1.0}]}, 400,
     'Unrecognized servable version label: beta'),
    ('POST', 'cls:explain', {}, 400, 'unknown method :explain'),
    ('GET', 'cls:predict', None, 400, ':predict takes POST'),
    ('POST', 'cls:predict', None, 411, 'Content-Length'),
    ('POST', 'cls:predict', {'instances': ['a' * 200_000]}, 413,
     'the limit is 100000 bytes (--max_request_bytes)'),
])
def test_bad_requests_get_their_status(core, method, path, body, status,
                                       fragment):
  if isinstance(body, dict):
    body = json.dumps(body).encode()
  got, answer = rest.answer(core, method, f'/v1/models/{path}', body)
  assert got == status, answer
  assert fragment in answer['error']


def test_unknown_path_and_draining(core):
  status, body = rest.answer(core, 'GET', '/v2/models/cls')
  assert status == 404 and 'Malformed request' in body['error']
  core.draining = True
  try:
    assert _get(core, 'cls') == (503, {'error': 'the server is shutting down'})
  finally:
    core.draining = False


def test_large_body_is_answered_off_the_loop(core, local):
  xs = np.linspace(0, 1, 2800).astype(np.float32)
  body = {'signature_name': RAW, 'inputs': {'x': xs.tolist(),
                                            'c': ['b'] * len(xs)}}
  assert len(json.dumps(body)) > rest._INLINE_BODY_BYTES  # pylint: disable=protected-access
  status, answer = _post(core, 'cls:predict', body)
  assert status == 200, answer
  np.testing.assert_allclose(
      answer['outputs']['probabilities'],
      _raw(local, 'classifier', xs, ['b'] * len(xs))['probabilities'],
      rtol=1e-6)


def test_batched_requests_are_answered_from_the_batch(model_root, local):
  srv = ModelServer(ServerOptions(
      models=[ModelConfig('cls', str(model_root / 'cls'))], grpc_port=None,
      rest_port=None, poll_wait_seconds=0,
      batching=BatchingOptions(max_batch_size=8, batch_timeout_micros=200_000,
                               num_batch_threads=1))).start()
  try:
    xs = np.linspace(0, 1, 8).astype(np.float32)

    def one(x):
      return _post(srv, 'cls:predict', {'signature_name': RAW,
                                        'instances': [{'x': float(x),
                                                       'c': 'b'}]})
    with concurrent.futures.ThreadPoolExecutor(len(xs)) as pool:
      answers = list(pool.map(one, xs))
    assert all(status == 200 for status, _ in answers), answers
    np.testing.assert_allclose(
        [body['predictions'][0]['probabilities'] for _, body in answers],
        _raw(local, 'classifier', xs, ['b'] * len(xs))['probabilities'],
        rtol=1e-6)
    assert srv.batcher.stats['rows'] == len(xs)
    assert srv.batcher.stats['batches'] < len(xs)  # requests were merged
  finally:
    srv.stop(grace=5)
