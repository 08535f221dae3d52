"""TF Serving's REST API (v1) on one asyncio event loop.

  GET  /v1/models/NAME[/versions/V | /labels/L]            model status
  GET  /v1/models/NAME[/versions/V | /labels/L]/metadata   signatures
  POST /v1/models/NAME[/versions/V | /labels/L]:predict | :classify | :regress

Predict takes the row (`instances`) or columnar (`inputs`) format and
answers `predictions` or `outputs` in the same format; classify and regress
take `examples` (+ `context`) and answer `results`. Errors answer
`{"error": "..."}` with TF Serving's HTTP codes.

One thread runs the event loop: it reads HTTP/1.1 (keep-alive, pipelined
requests answered in order), parses and validates requests and writes the
answers. Model calls leave the loop: with batching, a request joins a batch
and the batch thread hands the outputs back to the loop (no thread waits per
request); without, it runs on the server's model threads. Requests with
large bodies are parsed on a model thread too, so they don't hold up the
loop. Every response leaves in one write with TCP_NODELAY, so a request
costs one round trip.
"""

import asyncio
import concurrent.futures
import http.server
import json
import logging
import re
import socket
import threading

import grpc

try:  # a dependency of apache-beam: writes JSON ~10x faster than json
  import orjson  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  orjson = None

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
# Larger bodies are parsed and answered on a model thread, off the loop.
_INLINE_BODY_BYTES = 64 << 10
# Bytes read from a connection at a time.
_READ_BYTES = 64 << 10
# A request head longer than this is refused line by line.
_HEAD_BYTES = 16 << 10
# Reading from a connection pauses while this much waits behind a request.
_PAUSE_BYTES = 1 << 20
_REASONS = {status: text for status, (text, _) in
            http.server.BaseHTTPRequestHandler.responses.items()}


def start(core, host, port):
  """Starts the REST server on its own event loop thread; returns it."""
  server = RestServer(core)
  server.start(host, port)
  return server


class RestServer:
  """The event loop thread, its listening socket and its connections."""

  def __init__(self, core):
    self.core = core
    self.loop = None
    self.server_address = None
    self.connections = set()
    self.reads = memoryview(bytearray(_READ_BYTES))  # see _Connection
    self._listener = None
    self._thread = None
    # Calls handed to the loop by other threads (see `from_thread`).
    self._handed = []
    self._handed_lock = threading.Lock()
    self._wakeup_due = False

  def start(self, host, port):
    started = concurrent.futures.Future()
    self._thread = threading.Thread(target=self._run, args=(host, port,
                                                            started),
                                    name='rest-api', daemon=True)
    self._thread.start()
    self.server_address = started.result()  # raises OSError if bind failed

  def _run(self, host, port, started):
    loop = self.loop = asyncio.new_event_loop()
    try:
      self._listener = loop.run_until_complete(loop.create_server(
          lambda: _Connection(self), host, port, backlog=128,
          reuse_address=True))
    except BaseException as e:  # pylint: disable=broad-except
      started.set_exception(e)
      loop.close()
      return
    started.set_result(self._listener.sockets[0].getsockname()[:2])
    try:
      loop.run_forever()
    finally:
      loop.close()

  def from_thread(self, fn, *args):
    """Has the loop call fn(*args) soon; for any thread. A batch thread
    answering many requests wakes the loop once for all of them."""
    with self._handed_lock:
      self._handed.append((fn, args))
      if self._wakeup_due:
        return
      self._wakeup_due = True
    self.loop.call_soon_threadsafe(self._run_handed)

  def _run_handed(self):
    with self._handed_lock:
      handed, self._handed = self._handed, []
      self._wakeup_due = False
    for fn, args in handed:
      try:
        fn(*args)
      except Exception:  # pylint: disable=broad-except
        log.exception('REST: answering a request failed')

  def _in_loop(self, fn, timeout=None):
    """Runs `fn` on the loop thread and waits for it."""
    done = concurrent.futures.Future()

    def call():
      try:
        done.set_result(fn())
      except BaseException as e:  # pylint: disable=broad-except
        done.set_exception(e)
    self.loop.call_soon_threadsafe(call)
    return done.result(timeout)

  def shutdown(self):
    """Stops taking connections; open ones are answered until closed."""
    if self._thread.is_alive():
      self._in_loop(self._listener.close)

  def server_close(self, timeout=10):
    """Closes every connection (after its pending writes), then the loop."""
    if not self._thread.is_alive():
      return
    closed = concurrent.futures.Future()

    def close_all():
      self._listener.close()
      for connection in list(self.connections):
        connection.close()
      self._when_no_connections(closed)
    self.loop.call_soon_threadsafe(close_all)
    try:
      closed.result(timeout)
    except concurrent.futures.TimeoutError:
      log.warning('REST connections still open after %ss; closing', timeout)
    self.loop.call_soon_threadsafe(self.loop.stop)
    self._thread.join(timeout)

  def _when_no_connections(self, future):
    if not self.connections:
      future.set_result(None)
    else:
      self.loop.call_later(0.01, self._when_no_connections, future)


class _Request:
  """One parsed HTTP request, until it is answered."""
  __slots__ = ('method', 'path', 'version', 'headers', 'close', 'length')

  def __init__(self, method, path, version, headers):
    self.method = method
    self.path = path
    self.version = version
    self.headers = headers
    connection = headers.get('connection', '').lower()
    self.close = connection == 'close' or (
        version == 'HTTP/1.0' and connection != 'keep-alive')
    self.length = _content_length_or_none(headers)
    if self.length is None and 'content-length' in headers:
      self.close = True  # where this request ends is unknown


class _Reject(Exception):
  """An HTTP request that cannot be parsed: answered, then closed."""

  def __init__(self, status, message):
    super().__init__(message)
    self.status = status
    self.message = message


def _check_request_line(line):
  """(method, target, version) of a request line; _Reject if malformed."""
  parts = line.split()
  if len(parts) != 3 or len(line) > _MAX_LINE:
    raise _Reject(400, 'malformed HTTP request line')
  if parts[2] not in ('HTTP/1.1', 'HTTP/1.0'):
    raise _Reject(505, f'unsupported protocol {parts[2]}')
  return parts


def _head(lines):
  """A _Request from the lines of a complete head; _Reject if malformed."""
  method, target, version = _check_request_line(lines[0])
  if len(lines) > _MAX_HEADERS + 1:
    raise _Reject(431, f'more than {_MAX_HEADERS} header lines')
  headers = {}
  for line in lines[1:]:
    name, colon, value = line.partition(':')
    if not colon or len(line) > _MAX_LINE:
      raise _Reject(400, 'malformed HTTP header line')
    headers[name.strip().lower()] = value.strip()
  if method not in ('GET', 'POST'):
    raise _Reject(405, f'method {method} is not supported; use GET or POST')
  return _Request(method, target, version, headers)


class _Connection(asyncio.BufferedProtocol):
  """One client connection: requests are parsed and answered in order.

  A BufferedProtocol: reads land in one buffer that all connections share,
  as the loop copies each read out before the next (the plain Protocol's
  transport allocates 256 KiB per read, which costs more than parsing a
  small request).
  """

  def __init__(self, server):
    self.server = server
    self.core = server.core
    self.transport = None
    self.reads = server.reads
    self.buffer = bytearray()
    self.request = None  # parsed head, waiting for its body
    self.busy = False  # a request is being answered off the loop
    self.skip = 0  # body bytes of an answered request still to drop
    self.close_after_skip = False
    self.closed = False
    self.paused = False
    self.eof = False  # the client sends no more

  # asyncio.Protocol

  def connection_made(self, transport):
    self.transport = transport
    sock = transport.get_extra_info('socket')
    if sock is not None:
      sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    self.server.connections.add(self)

  def connection_lost(self, exc):
    self.closed = True
    self.server.connections.discard(self)

  def get_buffer(self, sizehint):
    return self.reads

  def buffer_updated(self, nbytes):
    self.data_received(self.reads[:nbytes])

  def data_received(self, data):
    if self.skip:
      if len(data) <= self.skip:
        self.skip -= len(data)
        if not self.skip and self.close_after_skip:
          self.close()
        return
      data = data[self.skip:]
      self.skip = 0
      if self.close_after_skip:
        self.close()
        return
    self.buffer += data
    if self.busy:
      if len(self.buffer) > _PAUSE_BYTES and not self.paused:
        self.paused = True
        self.transport.pause_reading()
      return
    self._process()

  def eof_received(self):
    # Half-closed by the client: answer what it sent, then close.
    self.eof = True
    if not self.busy:
      self._process()
    return True  # keep the transport open for the answers

  def close(self):
    if not self.closed:
      self.closed = True
      self.transport.close()  # after the pending writes

  # Requests

  def _process(self):
    """Answers the complete requests in the buffer, in order."""
    while not self.busy and not self.closed:
      if self.request is None:
        if not self.buffer:
          break
        try:
          self.request = self._parse_head()
        except _Reject as e:
          self._answer(None, e.status, {'error': e.message}, close=True)
          return
        if self.request is None:
          break  # an incomplete head: wait for more
        if self.request.headers.get('expect', '').lower() == '100-continue':
          self.transport.write(b'HTTP/1.1 100 Continue\r\n\r\n')
      if not self._handle(self.request):
        break  # the body is still arriving
    if self.busy or self.closed:
      return
    if self.eof:
      self.close()
    elif self.paused:
      self.paused = False
      self.transport.resume_reading()

  def _parse_head(self):
    """The next request's head (consumed), None if incomplete; _Reject."""
    buffer = self.buffer
    end = buffer.find(b'\r\n\r\n', 0, _HEAD_BYTES)
    if end >= 0:
      head = buffer[:end].decode('latin-1')
      lines = head.split('\r\n')
      if head.count('\n') == len(lines) - 1:  # no bare LF line ends
        del buffer[:end + 4]
        return _head(lines)
    return self._parse_head_by_lines()

  def _parse_head_by_lines(self):
    """_parse_head for heads not yet complete or with bare LF line ends:
    lines are checked as they arrive, so an endless one is refused."""
    buffer = self.buffer
    lines = []
    start = 0
    while True:
      end = buffer.find(b'\n', start, start + _MAX_LINE + 1)
      if end < 0:
        if len(buffer) - start > _MAX_LINE:
          raise _Reject(400, 'malformed HTTP header line' if lines else
                        'malformed HTTP request line')
        if lines:
          _check_request_line(lines[0])  # refused before the rest arrives
        return None
      line = buffer[start:end].decode('latin-1')
      start = end + 1
      if line.endswith('\r'):
        line = line[:-1]
      if lines and not line:
        break
      lines.append(line)
      if len(lines) > _MAX_HEADERS + 1:
        raise _Reject(431, f'more than {_MAX_HEADERS} header lines')
    del buffer[:start]
    return _head(lines)

  def _handle(self, request):
    """Answers or starts answering `request`; False to wait for its body."""
    core = self.core
    if 'transfer-encoding' in request.headers:
      request.close = True  # unsupported: its end can't be found
    try:
      if core.draining:
        request.close = True
        raise ServingError(grpc.StatusCode.UNAVAILABLE,
                           'the server is shutting down')
      route = _route(request.method, request.path)
      if route.verb is None:
        return self._answer(request, 200, _get(core, route))
      limit = core.options.max_body_bytes
      length = _body_length(request, limit)
    except ServingError as e:
      return self._answer(request, e.http_status, {'error': e.message})
    except Exception as e:  # pylint: disable=broad-except
      log.exception('REST %s %s failed', request.method, request.path)
      return self._answer(request, 500, {'error': f'Internal error: {e}'})
    if len(self.buffer) < length:
      return False
    body = bytes(self.buffer[:length])
    del self.buffer[:length]
    request.length = None  # the body is read
    core.begin_request()
    if length > _INLINE_BODY_BYTES:
      self.busy = True
      core.model_pool.submit(
          self._answer_off_loop, request, route, body)
      return True
    try:
      call, answer = _start_verb(core, route, body)
    except Exception as e:  # pylint: disable=broad-except
      core.end_request()
      return self._answer(request, *_error_answer(request, e))
    self.busy = True
    from_thread = self.server.from_thread

    def done(outputs, error):  # on a batch or model thread
      from_thread(self._model_done, request, call, answer, outputs, error)
    try:
      call.start(done)
    except Exception as e:  # pylint: disable=broad-except
      self._model_done(request, call, answer, None, e)
    return True

  def _model_done(self, request, call, answer, outputs, error):
    try:
      if error is not None:
        raise error
      status, body = 200, answer(call.finish(outputs))
    except Exception as e:  # pylint: disable=broad-except
      status, body = _error_answer(request, e)
    self._finish(request, status, _json(body))

  def _answer_off_loop(self, request, route, body):
    """Parses, runs and answers a large request on a model thread."""
    try:
      call, answer = _start_verb(self.core, route, body)
      status, body = 200, answer(call.run())
    except Exception as e:  # pylint: disable=broad-except
      status, body = _error_answer(request, e)
    self.server.from_thread(self._finish, request, status, _json(body))

  def _finish(self, request, status, payload):
    """Answers a request that was in flight, then goes on reading."""
    self.busy = False
    self.core.end_request()
    self._send(request, status, payload)
    self._process()

  def _answer(self, request, status, body, close=False):
    """Answers a request without a model call; True to go on reading."""
    payload = _json(body)
    if request is None or close:
      self._send(request, status, payload, close=True)
      return False
    # A body that was not read is dropped as it arrives (keeping the
    # connection), or, over the size limit, read up to a point and the
    # connection closed: the client sees the answer, not a reset.
    unread, request.length = request.length or 0, None
    if unread > self.core.options.max_body_bytes:
      request.close = True
      if unread > _DRAIN_LIMIT:
        unread = 0  # not worth reading: close now
    dropped = min(unread, len(self.buffer))
    del self.buffer[:dropped]
    self.skip = unread - dropped
    if self.skip and request.close:
      self.close_after_skip = True
      self._send(request, status, payload, close=False, close_header=True)
      return False
    self._send(request, status, payload)
    return not self.closed

  def _send(self, request, status, payload, close=None, close_header=None):
    """Writes one response; closes the connection if it must."""
    self.request = None
    if close is None:
      close = request.close or self.core.draining
    if close_header is None:
      close_header = close
    head = (f'HTTP/1.1 {status} {_REASONS.get(status, "")}\r\n'
            f'Content-Type: application/json\r\n'
            f'Content-Length: {len(payload)}\r\n')
    if close_header:
      head += 'Connection: close\r\n'
    elif request is not None and request.version == 'HTTP/1.0':
      head += 'Connection: keep-alive\r\n'
    if not self.closed:
      self.transport.write(head.encode('latin-1') + b'\r\n' + payload)
    if close:
      self.close()


def _json(body):
  """The JSON of an answer, as json.dumps writes it (non-ASCII text may
  stay UTF-8 rather than \\u-escaped: the same JSON)."""
  if orjson is not None:
    try:
      payload = orjson.dumps(body)
    except TypeError:  # e.g. integers beyond 64 bits
      pass
    else:
      # orjson writes NaN and infinities as null; json.dumps as NaN and
      # Infinity, as TF Serving does. Answers hold no null otherwise.
      if b'null' not in payload:
        return payload
  return json.dumps(body).encode('utf-8')


def _error_answer(request, error):
  """(HTTP status, body) of a failed request."""
  if isinstance(error, ServingError):
    return error.http_status, {'error': error.message}
  log.error('REST %s %s failed', request.method, request.path,
            exc_info=(type(error), error, error.__traceback__))
  return 500, {'error': f'Internal error: {error}'}


class _Route:
  __slots__ = ('name', 'version', 'label', 'verb', 'metadata')

  def __init__(self, name, version, label, verb, metadata):
    self.name = name
    self.version = version
    self.label = label
    self.verb = verb
    self.metadata = metadata


_ROUTES = {}  # (method, target) -> _Route: clients repeat their URLs


def _route(method, target):
  """What a request asks for, checked before its body is read."""
  route = _ROUTES.get((method, target))
  if route is None:
    route = _parse_route(method, target)
    if len(_ROUTES) >= 1024:
      _ROUTES.clear()
    _ROUTES[method, target] = route
  return route


def _parse_route(method, target):
  path = target.split('?', 1)[0]
  match = _PATH.match(path)
  if match is None:
    raise not_found(f'Malformed request: {method} {path}; expected '
                    '/v1/models/NAME[/versions/V|/labels/L]'
                    '[/metadata|:predict|:classify|:regress]')
  label, verb = match['label'], match['verb']
  version = _version(match['version'])
  if label == '':
    raise invalid('empty version label in the URL')
  if verb is not None:
    if verb not in _VERBS:
      raise invalid(f'unknown method :{verb}; expected :predict, '
                    ':classify or :regress')
    if method != 'POST':
      raise invalid(f':{verb} takes POST, got {method}')
  elif method != 'GET':
    raise invalid(f'{path} takes GET, got {method}')
  return _Route(match['name'], version, label, verb,
                bool(match['metadata']))


def _get(core, route):
  from serving import grpc_service  # pylint: disable=g-import-not-at-top
  if route.metadata:
    servable = core.resolve(route.name, route.version, route.label)
    return grpc_service.metadata_json(servable)
  return grpc_service.status_json(core, route.name, route.version,
                                  route.label)


def _body_length(request, limit):
  """The length of a verb request's body; ServingError if unusable."""
  if 'transfer-encoding' in request.headers:
    raise _http_error(411, 'chunked request bodies are not supported; '
                      'send a Content-Length')
  length = _content_length(request.headers)
  if length is None:
    raise _http_error(411, 'a request body with a Content-Length header '
                      'is required')
  if length > limit:
    raise _http_error(413, f'request body is {length} bytes; the limit '
                      f'is {limit} bytes (--max_request_bytes)')
  return length


def _start_verb(core, route, data):
  """(Call, answer) of a verb request: answer(result) is the JSON body."""
  try:
    body = json.loads(data)
  except (UnicodeDecodeError, ValueError) as e:
    raise invalid(f'request body is not valid JSON: {e}') from None
  if not isinstance(body, dict):
    raise invalid('request body must be a JSON object, got '
                  f'{type(body).__name__}')
  servable = core.resolve(route.name, route.version, route.label)
  return _VERB_HANDLERS[route.verb](core, servable, body)


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
    count = len(body['instances'])
    return (core.predict_call(signature, inputs),
            lambda outputs: {'predictions': _outputs_to_rows(outputs,
                                                             count)})
  if 'inputs' in body:
    inputs = _columns_to_arrays(body['inputs'], signature)
    return core.predict_call(signature, inputs), _columnar_answer
  raise invalid("Missing 'instances' (row format) or 'inputs' (columnar "
                "format) key")


def _columnar_answer(outputs):
  if len(outputs) == 1:
    ((name, value),) = outputs.items()
    return {'outputs': codec.array_to_json(value, name)}
  return {'outputs': {name: codec.array_to_json(value, name)
                      for name, value in outputs.items()}}


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
  call = core.classify_call(signature, _examples(body, servable.raw_features))
  return call, _classify_answer


def _classify_answer(results):
  return {'results': [[[_text(label), score] for label, score in result]
                      for result in results]}


def _regress(core, servable, body):
  signature = _signature(servable, body)
  call = core.regress_call(signature, _examples(body, servable.raw_features))
  return call, _regress_answer


def _regress_answer(values):
  return {'results': values}


def _text(label):
  return label.decode('utf-8', 'replace') if isinstance(label, bytes) else label


_VERB_HANDLERS = {'predict': _predict, 'classify': _classify,
                  'regress': _regress}
