"""TF Serving's REST API (v1) over a lean threaded HTTP/1.1 server.

  GET  /v1/models/NAME[/versions/V | /labels/L]            model status
  GET  /v1/models/NAME[/versions/V | /labels/L]/metadata   signatures
  POST /v1/models/NAME[/versions/V | /labels/L]:predict | :classify | :regress

Predict takes the row (`instances`) or columnar (`inputs`) format and
answers `predictions` or `outputs` in the same format; classify and regress
take `examples` (+ `context`) and answer `results`. Errors answer
`{"error": "..."}` with TF Serving's HTTP codes. Connections are kept alive
and every response leaves in one write with TCP_NODELAY, so a request costs
one round trip.
"""

import http.server
import json
import logging
import re
import socket
import threading

import grpc

from serving import codec
from serving.errors import ServingError, invalid, not_found
from serving.server import _check_input_names

log = logging.getLogger('estpipe')

_PATH = re.compile(
    r'^/v1/models/(?P<name>[^/:]+)'
    r'(?:/versions/(?P<version>[^/:]*)|/labels/(?P<label>[^/:]*))?'
    r'(?:(?P<metadata>/metadata)|:(?P<verb>[^/:]*))?$')
_VERBS = ('predict', 'classify', 'regress')
_MAX_LINE = 65536
_MAX_HEADERS = 100
# Bodies over the limit up to this size are read and dropped after a 413.
_DRAIN_LIMIT = 64 << 20


def start(core, host, port):
  """Starts the REST server in a thread; returns the server."""
  server = _Server((host, port), _Handler)
  server.core = core
  thread = threading.Thread(
      target=server.serve_forever, kwargs={'poll_interval': 0.2},
      name='rest-api', daemon=True)
  thread.start()
  return server


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True  # idle keep-alive connections don't block exit
  request_queue_size = 128
  allow_reuse_address = True


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'
  server_version = 'estpipe-model-server'
  sys_version = ''

  def setup(self):
    super().setup()
    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    log.debug('%s %s', self.address_string(), format % args)

  def handle_one_request(self):
    """Reads one request and answers it.

    Replaces BaseHTTPRequestHandler's parsing, whose email-package header
    parser costs more than the rest of a one-row predict request.
    """
    try:
      line = self.rfile.readline(_MAX_LINE + 1)
    except (OSError, ValueError):
      line = b''
    if not line:
      self.close_connection = True
      return
    parts = line.split()
    if len(line) > _MAX_LINE or len(parts) != 3:
      return self._reject(400, 'malformed HTTP request line')
    method, target, version = (p.decode('latin-1') for p in parts)
    if version not in ('HTTP/1.1', 'HTTP/1.0'):
      return self._reject(505, f'unsupported protocol {version}')
    self.command, self.path, self.request_version = method, target, version
    self.headers = {}
    for _ in range(_MAX_HEADERS + 1):
      line = self.rfile.readline(_MAX_LINE + 1)
      if line in (b'\r\n', b'\n', b''):
        break
      name, colon, value = line.partition(b':')
      if not colon or len(line) > _MAX_LINE:
        return self._reject(400, 'malformed HTTP header line')
      self.headers[name.strip().lower().decode('latin-1')] = (
          value.strip().decode('latin-1'))
    else:
      return self._reject(431, f'more than {_MAX_HEADERS} header lines')
    connection = self.headers.get('connection', '').lower()
    self.close_connection = (connection == 'close' or (
        version == 'HTTP/1.0' and connection != 'keep-alive'))
    if self.headers.get('expect', '').lower() == '100-continue':
      self.wfile.write(b'HTTP/1.1 100 Continue\r\n\r\n')
    if method not in ('GET', 'POST'):
      self.close_connection = True
      return self._reject(405, f'method {method} is not supported; use GET '
                          'or POST')
    self._handle(method)

  def _reject(self, status, message):
    self.close_connection = True
    self._send(status, {'error': message})

  def _handle(self, method):
    core = self.server.core
    self._body_pending = bool(_content_length_or_none(self.headers))
    if 'transfer-encoding' in self.headers:
      self.close_connection = True  # unsupported: its end can't be found
    with core.request():
      try:
        if core.draining:
          self.close_connection = True
          raise ServingError(grpc.StatusCode.UNAVAILABLE,
                             'the server is shutting down')
        status, body = 200, self._dispatch(core, method)
      except ServingError as e:
        status, body = e.http_status, {'error': e.message}
      except Exception as e:  # pylint: disable=broad-except
        log.exception('REST %s %s failed', method, self.path)
        status, body = 500, {'error': f'Internal error: {e}'}
      if self._body_pending:
        # Unread body bytes would be taken for the next request.
        self._discard_body()
      self._send(status, body)
    if core.draining:
      self.close_connection = True

  def _send(self, status, body):
    payload = json.dumps(body).encode('utf-8')
    head = (f'HTTP/1.1 {status} {self.responses.get(status, ("",))[0]}\r\n'
            f'Content-Type: application/json\r\n'
            f'Content-Length: {len(payload)}\r\n')
    if self.close_connection:
      head += 'Connection: close\r\n'
    elif self.request_version == 'HTTP/1.0':
      head += 'Connection: keep-alive\r\n'
    try:
      self.wfile.write(head.encode('latin-1') + b'\r\n' + payload)
    except OSError:  # the client went away; nothing left to tell it
      self.close_connection = True

  def _dispatch(self, core, method):
    path = self.path.split('?', 1)[0]
    match = _PATH.match(path)
    if match is None:
      raise not_found(f'Malformed request: {method} {path}; expected '
                      '/v1/models/NAME[/versions/V|/labels/L]'
                      '[/metadata|:predict|:classify|:regress]')
    name, label, verb = match['name'], match['label'], match['verb']
    version = _version(match['version'])
    if label == '':
      raise invalid('empty version label in the URL')
    if verb is not None:
      if verb not in _VERBS:
        raise invalid(f'unknown method :{verb}; expected :predict, '
                      ':classify or :regress')
      if method != 'POST':
        raise invalid(f':{verb} takes POST, got {method}')
      body = self._read_json()
      servable = core.resolve(name, version, label)
      return _VERB_HANDLERS[verb](core, servable, body)
    if method != 'GET':
      raise invalid(f'{path} takes GET, got {method}')
    from serving import grpc_service  # pylint: disable=g-import-not-at-top
    if match['metadata']:
      servable = core.resolve(name, version, label)
      return grpc_service.metadata_json(servable)
    return grpc_service.status_json(core, name, version, label)

  def _read_json(self):
    if 'transfer-encoding' in self.headers:
      raise _http_error(411, 'chunked request bodies are not supported; '
                        'send a Content-Length')
    length = _content_length(self.headers)
    if length is None:
      raise _http_error(411, 'a request body with a Content-Length header '
                        'is required')
    limit = self.server.core.options.max_body_bytes
    if length > limit:
      raise _http_error(413, f'request body is {length} bytes; the limit '
                        f'is {limit} bytes (--max_request_bytes)')
    data = self.rfile.read(length)
    self._body_pending = False
    try:
      body = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
      raise invalid(f'request body is not valid JSON: {e}') from None
    if not isinstance(body, dict):
      raise invalid('request body must be a JSON object, got '
                    f'{type(body).__name__}')
    return body

  def _discard_body(self):
    self._body_pending = False
    length = _content_length_or_none(self.headers)
    if length is None:  # no usable length: the connection can't continue
      self.close_connection = True
      return
    if length > self.server.core.options.max_body_bytes:
      # The client sees the answer rather than a reset connection if what
      # it sends is read, but only up to a point.
      self.close_connection = True
      if length > _DRAIN_LIMIT:
        return
    self._skip(length)

  def _skip(self, length):
    while length > 0:
      chunk = self.rfile.read(min(length, 1 << 20))
      if not chunk:
        break
      length -= len(chunk)


def _http_error(status, message):
  return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message,
                      http_status=status)


def _version(text):
  if text is None:
    return None
  if not text.isdigit():
    raise invalid(f'model version must be a positive integer, got {text!r}')
  return int(text)


def _content_length_or_none(headers):
  """The Content-Length, or None if absent or malformed."""
  try:
    return _content_length(headers)
  except ServingError:
    return None


def _content_length(headers):
  text = headers.get('content-length')
  if text is None:
    return None
  try:
    length = int(text)
  except ValueError:
    raise invalid(f'bad Content-Length {text!r}') from None
  if length < 0:
    raise invalid(f'bad Content-Length {text!r}')
  return length


def _signature(servable, body):
  key = body.get('signature_name', '')
  if not isinstance(key, str):
    raise invalid('signature_name must be a string')
  return servable.signature(key)


def _predict(core, servable, body):
  signature = _signature(servable, body)
  if 'instances' in body and 'inputs' in body:
    raise invalid("Only one of 'instances' (row format) or 'inputs' "
                  "(columnar format) may be present")
  if 'instances' in body:
    inputs = _rows_to_arrays(body['instances'], signature)
    outputs = core.predict(signature, inputs)
    count = len(body['instances'])
    return {'predictions': _outputs_to_rows(outputs, count)}
  if 'inputs' in body:
    inputs = _columns_to_arrays(body['inputs'], signature)
    outputs = core.predict(signature, inputs)
    if len(outputs) == 1:
      ((name, value),) = outputs.items()
      return {'outputs': codec.array_to_json(value, name)}
    return {'outputs': {name: codec.array_to_json(value, name)
                        for name, value in outputs.items()}}
  raise invalid("Missing 'instances' (row format) or 'inputs' (columnar "
                "format) key")


def _is_named(value):
  """A JSON object naming inputs (a {"b64": ...} object is a value)."""
  return isinstance(value, dict) and not (len(value) == 1 and 'b64' in value)


def _rows_to_arrays(instances, signature):
  if not isinstance(instances, list) or not instances:
    raise invalid("'instances' must be a non-empty list")
  if _is_named(instances[0]):
    names = set(instances[0])
    for i, instance in enumerate(instances):
      if not _is_named(instance) or set(instance) != names:
        raise invalid(f'instances[{i}] names inputs {_keys(instance)}, but '
                      f'instances[0] names {sorted(names)}; every instance '
                      'must name the same inputs')
    _check_input_names(signature, names)
    columns = {name: [instance[name] for instance in instances]
               for name in names}
  elif len(signature.inputs) == 1:
    columns = {next(iter(signature.inputs)): instances}
  else:
    raise invalid(f'signature {signature.key!r} has inputs '
                  f'{sorted(signature.inputs)}: each instance must be an '
                  'object naming them')
  return _convert(columns, signature)


def _columns_to_arrays(inputs, signature):
  if _is_named(inputs):
    _check_input_names(signature, set(inputs))
    columns = inputs
  elif len(signature.inputs) == 1:
    columns = {next(iter(signature.inputs)): inputs}
  else:
    raise invalid(f'signature {signature.key!r} has inputs '
                  f'{sorted(signature.inputs)}: \'inputs\' must be an object '
                  'naming them')
  return _convert(columns, signature)


def _keys(value):
  return sorted(value) if isinstance(value, dict) else type(value).__name__


def _convert(columns, signature):
  return {name: codec.json_to_array(value, name, signature.inputs[name][0])
          for name, value in columns.items()}


def _outputs_to_rows(outputs, count):
  columns = {}
  for name, value in outputs.items():
    if value.ndim == 0 or value.shape[0] != count:
      raise invalid(f'output {name!r} has shape {list(value.shape)}, which '
                    f'has no batch dimension of {count}; use the columnar '
                    "'inputs' format for this signature")
    columns[name] = codec.array_to_json(value, name)
  if len(columns) == 1:
    return next(iter(columns.values()))
  return [{name: column[i] for name, column in columns.items()}
          for i in range(count)]


def _examples(body, kinds):
  """Serialized tf.Examples of `examples` (+ `context`), typed by `kinds`."""
  examples = body.get('examples')
  if not isinstance(examples, list) or not examples:
    raise invalid("'examples' must be a non-empty list of feature objects")
  serialized = [codec.json_to_example(e, f'examples[{i}]', kinds)
                .SerializeToString() for i, e in enumerate(examples)]
  context = body.get('context')
  if context is not None:
    # Protobuf merge semantics: an example's features win over the context's.
    prefix = codec.json_to_example(context, 'context',
                                   kinds).SerializeToString()
    serialized = [prefix + s for s in serialized]
  return serialized


def _classify(core, servable, body):
  signature = _signature(servable, body)
  results = core.classify(signature, _examples(body, servable.raw_features))
  return {'results': [[[_text(label), score] for label, score in result]
                      for result in results]}


def _regress(core, servable, body):
  signature = _signature(servable, body)
  return {'results': core.regress(signature,
                                  _examples(body, servable.raw_features))}


def _text(label):
  return label.decode('utf-8', 'replace') if isinstance(label, bytes) else label


_VERB_HANDLERS = {'predict': _predict, 'classify': _classify,
                  'regress': _regress}
