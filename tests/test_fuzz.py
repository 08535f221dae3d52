"""Fuzzing the model server: no request may get a 5xx, none may kill it.

A few thousand seeded random and mutated REST requests (bad JSON, deep
nesting, odd Unicode, huge numbers, wrong shapes and types, bad paths, bad
headers, truncated bodies) go to a running server on 127.0.0.1, each on its
own connection; every answer must be under 500, and afterwards the server
must still answer a valid request correctly. The cases come from a seeded
generator, so a failure names a case that can be replayed:

  ESTPIPE_FUZZ_SEED=7 ESTPIPE_FUZZ_CASES=20000 pytest tests/test_fuzz.py

(defaults: seed 0, 3,000 REST cases; CI runs the defaults in well under a
minute). A small gRPC section follows; see "gRPC fuzz cases" below.
"""

import collections
import concurrent.futures
import json
import os
import random
import socket
import time

import pytest

tf = pytest.importorskip('tensorflow')

# pylint: disable=g-import-not-at-top,redefined-outer-name
import grpc
import numpy as np
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.apis import regression_pb2

from serving import grpc_service, rest
from serving.server import ModelServer, ServerOptions
from serving.versions import ModelConfig

SEED = int(os.environ.get('ESTPIPE_FUZZ_SEED', '0'))
CASES = int(os.environ.get('ESTPIPE_FUZZ_CASES', '3000'))
MAX_BODY = 100_000


@pytest.fixture(scope='module')
def server(model_root):
  options = ServerOptions(
      models=[ModelConfig('cls', str(model_root / 'cls')),
              ModelConfig('reg', str(model_root / 'reg'), policy='all',
                          labels={'stable': 1, 'canary': 2})],
      grpc_port=0, rest_port=0, poll_wait_seconds=0,
      max_body_bytes=MAX_BODY, header_timeout_seconds=5,
      body_timeout_seconds=5, max_connections=0)
  srv = ModelServer(options, (grpc_service.start, rest.start)).start()
  yield srv
  srv.stop(grace=5)


# REST cases

_NAMES = ['cls', 'reg', 'nope', '', 'cls ', 'c%6Cs', '\u00e9', '..', 'a' * 300]
_VERSIONS = ['1', '2', '0', '-1', '01', '\u00b2', '\u0661', '9' * 25, '',
             '1.0', ' 1', '1e3', '0x1']
_LABELS = ['stable', 'canary', '', 'nope', '\ud7ff', '%00']
_VERBS = [':predict', ':classify', ':regress', ':nope', ':', '/metadata',
          '', ':predict:predict', '/metadata:predict']
_SIGNATURES = ['raw:predict', 'serving_default', 'classification',
               'regression', 'predict', '', 'nope', 7, None, ['x']]
_FEATURES = ['x', 'c', 'inputs', 'examples', 'unknown', '', '\u0000',
             '\ud800', '\ud83d\ude00', 'b64']


def _odd_string(rng):
  return rng.choice([
      '', 'a', 'zzz', '\u0000', '\ud800', '\udfff', '\ud83d\ude00',
      '\ufffe', '\u202e', 'x' * rng.randint(1, 5000), '%s', '{"b64": 1}',
      ''.join(chr(rng.randint(0, 0x10FFFF)) for _ in range(rng.randint(1, 8))),
  ])


def _odd_number(rng):
  return rng.choice([
      0, -1, 1, 0.5, -0.0, 2**31, 2**63 - 1, 2**63, -2**63 - 1, 2**64,
      10**30, -10**400, 1e308, 1.7976931348623157e308, 5e-324,
      float('nan'), float('inf'), float('-inf'), True, False,
      rng.uniform(-1e6, 1e6), rng.randint(-2**70, 2**70)])


def _odd_value(rng, depth=0):
  kind = rng.randrange(9 if depth < 4 else 4)
  if kind == 0:
    return _odd_number(rng)
  if kind == 1:
    return _odd_string(rng)
  if kind == 2:
    return None
  if kind == 3:
    return {'b64': rng.choice(['', 'AAAA', '!!!', 'YQ==', '\ud800', 3,
                               None, 'YQ'])}
  if kind in (4, 5):
    return [_odd_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
  if kind == 6:
    return {rng.choice(_FEATURES): _odd_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}
  if kind == 7:  # a ragged or oddly shaped numeric tensor
    return [[rng.random() for _ in range(rng.randint(0, 3))]
            for _ in range(rng.randint(0, 3))]
  return _deep(rng, rng.randint(10, 3000))


def _deep(rng, depth):
  """A JSON value nested `depth` deep (as text: json.dumps would recurse)."""
  opener, closer = rng.choice([('[', ']'), ('{"a":', '}')])
  return _Raw(opener * depth + json.dumps(_odd_number(rng)) + closer * depth)


class _Raw:
  """JSON text spliced into a body as is."""

  def __init__(self, text):
    self.text = text


def _dumps(value):
  """JSON text of a value that may hold _Raw parts, NaN and lone
  surrogates (json.dumps escapes them: "\\ud800")."""
  if isinstance(value, _Raw):
    return value.text
  if isinstance(value, list):
    return '[' + ','.join(_dumps(v) for v in value) + ']'
  if isinstance(value, dict):
    return '{' + ','.join(f'{json.dumps(str(k))}:{_dumps(v)}'
                          for k, v in value.items()) + '}'
  return json.dumps(value)


def _valid_body(rng, verb):
  """A body that is valid, or nearly, for a verb of the tiny models."""
  rows = rng.randint(1, 3)
  if verb == ':predict':
    if rng.random() < 0.5:
      return {'signature_name': 'raw:predict',
              'instances': [{'x': rng.random(), 'c': rng.choice('abcz')}
                            for _ in range(rows)]}
    return {'signature_name': 'raw:predict',
            'inputs': {'x': [rng.random()] * rows, 'c': ['a'] * rows}}
  return {'examples': [{'x': rng.random(), 'c': rng.choice('abcz')}
                       for _ in range(rows)]}


def _mutate_json(rng, body):
  """Breaks a valid body in one of many ways (as JSON text)."""
  kind = rng.randrange(8)
  if kind == 0:  # replace a value anywhere
    body = json.loads(json.dumps(body))
    target = body
    for _ in range(rng.randint(0, 3)):
      if not isinstance(target, (dict, list)) or not target:
        break
      key = (rng.choice(list(target)) if isinstance(target, dict)
             else rng.randrange(len(target)))
      if isinstance(target[key], (dict, list)) and target[key]:
        target = target[key]
        continue
      target[key] = _odd_value(rng)
      break
    return _dumps(body)
  if kind == 1:  # add or replace a top-level key
    body = dict(body)
    body[rng.choice(['instances', 'inputs', 'examples', 'context',
                     'signature_name', 'output_filter', 'junk'])] = (
                         _odd_value(rng))
    return _dumps(body)
  if kind == 2:  # a whole odd value
    return _dumps(_odd_value(rng))
  if kind == 3:  # truncated text
    text = _dumps(body)
    return text[:rng.randrange(len(text) + 1)]
  if kind == 4:  # a signature of another shape
    body = dict(body)
    body['signature_name'] = rng.choice(_SIGNATURES)
    return _dumps(body)
  if kind == 5:  # rows of differing features or shapes
    key = rng.choice(['instances', 'examples'])
    return _dumps({key: [_odd_value(rng, 1) for _ in range(rng.randint(1, 4))],
                   'signature_name': rng.choice(_SIGNATURES[:5])})
  if kind == 6:  # escapes and control characters in the text itself
    text = _dumps(body)
    at = rng.randrange(len(text) + 1)
    return text[:at] + rng.choice(['\\ud800', '\\u0000', '\\', '"', '\x00',
                                   '\\uZZZZ', '\ufeff', '\n']) + text[at:]
  return _dumps({'instances': _deep(rng, rng.randint(100, 5000))})


def _path(rng):
  """(target, verb): mostly a model's verb, so bodies reach the model."""
  if rng.random() < 0.75:
    name = rng.choice(['cls', 'reg'])
    middle = rng.choice(['', '', '', '/versions/1'])
    verb = rng.choice([':predict', ':predict', ':classify', ':regress'])
    if name == 'cls' and verb == ':regress':
      verb = ':classify'
    return f'/v1/models/{name}{middle}{verb}', verb
  if rng.random() < 0.5:
    name = rng.choice(['cls', 'reg'])
    middle = rng.choice(['', f'/versions/{rng.choice(_VERSIONS)}',
                         f'/labels/{rng.choice(_LABELS)}'])
    verb = rng.choice([':predict', ':classify', ':regress'])
  else:
    name = rng.choice(_NAMES)
    middle = rng.choice(['', f'/versions/{rng.choice(_VERSIONS)}',
                         f'/labels/{rng.choice(_LABELS)}', '/versions',
                         '//', '/versions/1/labels/stable'])
    verb = rng.choice(_VERBS)
  prefix = rng.choice(['/v1/models/'] * 8 + ['/v2/models/', '/', '',
                                            '/v1/models', '*'])
  suffix = rng.choice([''] * 8 + ['?x=1', '#f', '?', '/'])
  return prefix + name + middle + verb + suffix, verb


def _request(rng, method, target, body, headers=None, length=None):
  body = body if isinstance(body, bytes) else body.encode('utf-8',
                                                          'surrogatepass')
  lines = [f'{method} {target} HTTP/1.1']
  if length is None:
    length = str(len(body))
  if length is not False:
    lines.append(f'Content-Length: {length}')
  lines.extend(headers or [])
  if rng.random() < 0.3:
    lines.append('Connection: close')
  return ('\r\n'.join(lines) + '\r\n\r\n').encode('utf-8',
                                                  'surrogatepass') + body


def _bad_head(rng, body):
  """A request whose head is malformed or odd."""
  target, _ = _path(rng)
  kind = rng.randrange(12)
  if kind == 0:
    return _request(rng, 'POST', target, body, length=rng.choice(
        ['+5', '1_0', '-1', ' ', '', '0x10', '5, 5', '\u0661', '9' * 40,
         '18446744073709551616', '1.5', '1e3']))
  if kind == 1:
    return _request(rng, 'POST', target, body, headers=[
        f'Content-Length: {rng.randint(0, 50)}'])
  if kind == 2:
    return _request(rng, 'POST', target, body, headers=[
        rng.choice(['Transfer-Encoding: chunked', 'Expect: 100-continue',
                    'Host: a', 'Host: b', 'Connection: keep-alive, close',
                    'X: ' + 'y' * 70000, 'Bad Header: 1', ' folded',
                    'NoColon', ':', 'Content-Type: text/\ud800'])
        for _ in range(rng.randint(1, 3))])
  if kind == 3:
    return _request(rng, rng.choice(['GET', 'PUT', 'DELETE', 'HEAD',
                                     'OPTIONS', 'post', 'P\u00d6ST', '']),
                    target, body)
  if kind == 4:
    line = rng.choice(['POST {t} HTTP/1.1', 'POST {t} HTTP/2.0',
                       'POST {t} HTTP/1.x', 'POST {t}', 'POST  {t} HTTP/1.1',
                       'POST {t} HTTP/1.1 extra', '{t}', 'GET {t} FOO/1.1'])
    return (line.format(t=target) + '\r\n\r\n').encode('utf-8',
                                                       'surrogatepass')
  if kind == 5:
    return _request(rng, 'POST', target, body, length=False)
  if kind == 6:
    return b'\r\n'.join([b'GET /v1/models/cls HTTP/1.1'] +
                        [b'X-%d: 1' % i for i in range(rng.choice(
                            [99, 100, 101, 500]))]) + b'\r\n\r\n'
  if kind == 7:  # bare LF line ends, or CR alone
    sep = rng.choice([b'\n', b'\r'])
    return (b'POST ' + target.encode('utf-8', 'surrogatepass') +
            b' HTTP/1.1' + sep + b'Content-Length: ' +
            str(len(body)).encode() + sep + sep + body)
  if kind == 8:  # a truncated head
    data = _request(rng, 'POST', target, body)
    return data[:rng.randrange(data.index(b'\r\n\r\n') + 1)]
  if kind == 9:  # random bytes
    return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
  if kind == 10:  # a body over the limit
    return _request(rng, 'POST', target, b'[' * (MAX_BODY + 1))
  data = _request(rng, 'POST', target, body)
  return data * rng.randint(2, 4)  # pipelined


def _mutate_bytes(rng, data):
  data = bytearray(data)
  for _ in range(rng.randint(1, 4)):
    if not data:
      break
    at = rng.randrange(len(data))
    kind = rng.randrange(4)
    if kind == 0:
      data[at] = rng.randrange(256)
    elif kind == 1:
      data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == 2:
      del data[at:at + rng.randint(1, 16)]
    else:
      data[at:at] = data[at:at + rng.randint(1, 64)]
  return bytes(data)


def rest_case(rng):
  """One raw HTTP request (bytes): valid, broken JSON, or broken HTTP."""
  target, verb = _path(rng)
  verb = verb if verb in (':predict', ':classify', ':regress') else ':predict'
  body = _valid_body(rng, verb)
  kind = rng.random()
  if kind < 0.1:
    return _request(rng, 'POST', target, json.dumps(body))
  if kind < 0.15:
    return _request(rng, 'GET', target, b'')
  if kind < 0.65:
    return _request(rng, 'POST', target, _mutate_json(rng, body))
  if kind < 0.85:
    return _bad_head(rng, json.dumps(body).encode())
  if kind < 0.92:  # truncated body: the client gives up half way
    data = _request(rng, 'POST', target, json.dumps(body))
    return data[:rng.randrange(data.index(b'\r\n\r\n') + 4, len(data))]
  return _mutate_bytes(rng, _request(rng, 'POST', target, json.dumps(body)))


def _statuses(answer):
  """The status codes of every response in `answer`."""
  codes = []
  for line in answer.split(b'\r\n'):
    if line.startswith(b'HTTP/1.1 ') and line[9:12].isdigit():
      codes.append(int(line[9:12]))
  return codes


def _send(port, data):
  with socket.create_connection(('127.0.0.1', port), 30) as sock:
    try:
      sock.sendall(data)
      sock.shutdown(socket.SHUT_WR)
    except OSError:  # answered and closed before all was sent
      pass
    chunks = []
    while True:
      try:
        chunk = sock.recv(1 << 16)
      except ConnectionResetError:
        break
      if not chunk:
        break
      chunks.append(chunk)
  return b''.join(chunks)


def _allowed(status, data):
  # 505 is the right answer to a well-formed request line of another HTTP
  # version; nothing else may be a server error.
  if status == 505:
    return b' HTTP/2.0' in data.split(b'\n', 1)[0]
  return status < 500


def _predict_ok(port):
  body = json.dumps({'signature_name': 'raw:predict',
                     'instances': [{'x': 0.9, 'c': 'a'}]}).encode()
  answer = _send(port, (f'POST /v1/models/cls:predict HTTP/1.1\r\n'
                        f'Content-Length: {len(body)}\r\n\r\n').encode()
                 + body)
  assert answer.startswith(b'HTTP/1.1 200 '), answer[:300]
  payload = json.loads(answer.split(b'\r\n\r\n', 1)[1])
  (row,) = payload['predictions']
  assert np.isclose(sum(row['probabilities']), 1, atol=1e-5)


def test_rest_fuzz_never_answers_5xx(server):
  port = server.rest_port
  _predict_ok(port)
  rng = random.Random(SEED)
  cases = [rest_case(rng) for _ in range(CASES)]
  started = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    answers = list(pool.map(lambda data: _send(port, data), cases))
  elapsed = time.monotonic() - started
  failures = []
  for index, (data, answer) in enumerate(zip(cases, answers)):
    bad = [s for s in _statuses(answer) if not _allowed(s, data)]
    if bad:
      failures.append(f'case {index} (seed {SEED}): {bad} for '
                      f'{data[:300]!r} -> {answer[:500]!r}')
  assert not failures, f'{len(failures)} 5xx answers:\n' + '\n'.join(
      failures[:10])
  answered = sum(1 for a in answers if _statuses(a))
  assert answered > CASES // 2, f'only {answered} of {CASES} were answered'
  # Still alive, still right, and nothing left counted as in flight.
  _predict_ok(port)
  (front_end,) = [f for f in server.front_ends if f.name == 'rest']
  deadline = time.monotonic() + 10
  while front_end.server.in_flight and time.monotonic() < deadline:
    time.sleep(0.05)
  assert front_end.server.in_flight == 0
  counts = collections.Counter(s for a in answers for s in _statuses(a))
  assert counts[200] > CASES // 50, counts  # many reach the model
  print(f'{CASES} REST cases in {elapsed:.1f} s, {answered} answered: '
        f'{sorted(counts.items())}')


# ---------------------------------------------------------------------------
# gRPC fuzz cases
#
# Add gRPC cases here. Each case is (method name, request message, the
# status codes it may get); test_grpc_fuzz_never_fails_internally sends
# them all and requires every answer to be one of its codes and never
# INTERNAL or UNKNOWN, then checks the server still answers.
#
# These are fixed cases, each with its expected codes; the seeded random
# and mutated gRPC requests (absurd shapes and dtypes in TensorProtos,
# rank 40, wrong value counts...) are in tests/test_fuzz_grpc.py.
# ---------------------------------------------------------------------------

_CLIENT_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                  grpc.StatusCode.FAILED_PRECONDITION)


def _predict_request(model='cls', signature='raw:predict', **inputs):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model
  request.model_spec.signature_name = signature
  for name, value in inputs.items():
    request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
  return request


def _grpc_cases():
  cases = []
  add = lambda method, request, *codes: cases.append(
      (method, request, codes or _CLIENT_ERRORS))
  add('Predict', _predict_request(model=''))
  add('Predict', _predict_request(model='nope'), grpc.StatusCode.NOT_FOUND)
  add('Predict', _predict_request(signature='nope'))
  add('Predict', _predict_request(x=np.array([0.5], np.float32)),
      grpc.StatusCode.INVALID_ARGUMENT)  # c is missing
  add('Predict', _predict_request(x=np.array([0.5], np.float32),
                                  c=np.array([b'a']),
                                  unknown=np.array([1.0], np.float32)),
      grpc.StatusCode.INVALID_ARGUMENT)
  add('Predict', _predict_request(x=np.array([1, 2], np.int64),
                                  c=np.array([b'a', b'b'])),
      grpc.StatusCode.INVALID_ARGUMENT)  # int64 for a float input
  add('Predict', _predict_request(x=np.array([0.5], np.float32),
                                  c=np.array([1.0], np.float32)),
      grpc.StatusCode.INVALID_ARGUMENT)  # numbers for a string input
  versioned = _predict_request(x=np.array([0.5], np.float32),
                               c=np.array([b'a']))
  versioned.model_spec.version.value = 99
  add('Predict', versioned, grpc.StatusCode.NOT_FOUND)
  label = _predict_request(model='reg', signature='predict')
  label.model_spec.version_label = 'nope'
  add('Predict', label)
  for method, request_class in (('Classify',
                                 classification_pb2.ClassificationRequest),
                                ('Regress', regression_pb2.RegressionRequest)):
    request = request_class()
    request.model_spec.name = 'cls' if method == 'Classify' else 'reg'
    add(method, request, grpc.StatusCode.INVALID_ARGUMENT)  # no examples
    wrong = request_class()
    wrong.model_spec.name = 'reg' if method == 'Classify' else 'cls'
    wrong.model_spec.signature_name = 'predict'
    wrong.input.example_list.examples.add()
    add(method, wrong)
  metadata = get_model_metadata_pb2.GetModelMetadataRequest()
  metadata.model_spec.name = 'cls'
  metadata.metadata_field.append('nope')
  add('GetModelMetadata', metadata, grpc.StatusCode.INVALID_ARGUMENT)
  return cases


def test_grpc_fuzz_never_fails_internally(server):
  with grpc.insecure_channel(f'127.0.0.1:{server.grpc_port}') as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    failures = []
    for index, (method, request, codes) in enumerate(
        _grpc_cases()):
      try:
        getattr(stub, method)(request, timeout=30)
        code = grpc.StatusCode.OK
      except grpc.RpcError as e:
        code = e.code()
      if code not in codes:
        failures.append(f'case {index} {method}: {code}, expected one of '
                        f'{[c.name for c in codes]}: {request}')
    assert not failures, '\n'.join(failures)
    ok = stub.Predict(_predict_request(x=np.array([0.5], np.float32),
                                       c=np.array([b'a'])), timeout=30)
    assert 'probabilities' in ok.outputs
