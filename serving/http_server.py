"""An HTTP/1.1 server on one asyncio event loop, for one application.

It knows HTTP and nothing of what is served: it reads requests (keep-alive,
pipelined requests answered in order, limits on lines, headers and bodies),
hands each to the application and writes the answers. The application
(serving/rest.py's RestApi) has three methods, all called on the loop:

  head(request)    the head is complete, the body not yet read: returns
                   (status, payload) to answer at once (an unread body is
                   dropped), or None to have the body read and handle() called;
  handle(request)  request.body is read: returns (status, payload), or None
                   and answers later with request.respond(status, payload),
                   also on the loop (LoopHandoff brings it back from other
                   threads);
  error(status, message)  the payload of a request refused here (malformed,
                   body without Content-Length or over the limit).

The split keeps the API testable without sockets (`HttpServer.exchange`)
and this loop free of model code. Why it is built this way: one thread
serves every connection, so a request costs no thread of its own while its
model call runs (the application answers from a callback); reads go into
one buffer shared by all connections; every response leaves in one write
with TCP_NODELAY, so a request costs one round trip.
"""

import asyncio
import concurrent.futures
import http.server
import logging
import socket
import threading

log = logging.getLogger('estpipe')

_MAX_LINE = 65536
_MAX_HEADERS = 100
# Bodies over the limit up to this size are read and dropped after a 413.
_DRAIN_LIMIT = 64 << 20
# Bytes read from a connection at a time.
_READ_BYTES = 64 << 10
# A request head longer than this is refused line by line.
_HEAD_BYTES = 16 << 10
# Reading from a connection pauses while this much waits behind a request.
_PAUSE_BYTES = 1 << 20
_REASONS = {status: text for status, (text, _) in
            http.server.BaseHTTPRequestHandler.responses.items()}


class HttpServer:
  """The event loop thread, its listening socket and its connections.

  `max_body_bytes` bounds request bodies (a larger one is answered 413);
  `limit_name` names the setting in that answer, for the operator.
  """

  def __init__(self, app, max_body_bytes, limit_name=None,
               content_type='application/json', thread_name='http'):
    self.app = app
    self.max_body_bytes = max_body_bytes
    self.limit_name = limit_name
    self.content_type = content_type
    self.thread_name = thread_name
    self.loop = None
    self.server_address = None
    self.connections = set()
    self.reads = memoryview(bytearray(_READ_BYTES))  # see _Connection
    # Set by shutdown(): answers from then on close their connections.
    self.draining = False
    self._listener = None
    self._thread = None

  def start(self, host, port):
    started = concurrent.futures.Future()
    self._thread = threading.Thread(target=self._run, args=(host, port,
                                                            started),
                                    name=self.thread_name, daemon=True)
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
    self.draining = True
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
      log.warning('HTTP connections still open after %ss; closing', timeout)
    self.loop.call_soon_threadsafe(self.loop.stop)
    self._thread.join(timeout)

  def _when_no_connections(self, future):
    if not self.connections:
      future.set_result(None)
    else:
      self.loop.call_later(0.01, self._when_no_connections, future)

  def accept(self, request):
    """Hands a complete head to the application: (status, payload) to
    answer at once, or None with `request.wanted` set (the body to read)."""
    if 'transfer-encoding' in request.headers:
      request.close = True  # unsupported: its end can't be found
    try:
      answer = self.app.head(request)
      if answer is None:
        request.wanted = self._body_length(request)
      return answer
    except HttpError as e:
      return e.status, self.app.error(e.status, e.message)

  def _body_length(self, request):
    """The length of a body to read; HttpError if unusable."""
    if 'transfer-encoding' in request.headers:
      raise HttpError(411, 'chunked request bodies are not supported; send a '
                      'Content-Length')
    length = _content_length(request.headers)
    if length is None:
      raise HttpError(411, 'a request body with a Content-Length header is '
                      'required')
    limit = self.max_body_bytes
    if length > limit:
      named = f' ({self.limit_name})' if self.limit_name else ''
      raise HttpError(413, f'request body is {length} bytes; the limit is '
                      f'{limit} bytes{named}')
    return length

  def exchange(self, method, target, body=None, headers=None):
    """(status, payload) of one request answered by the application as a
    connection would have it answered, but without sockets or this server's
    thread: on an event loop of the calling thread. For tests."""
    headers = {name.lower(): value for name, value in
               (headers or {}).items()}
    if body is not None:
      headers.setdefault('content-length', str(len(body)))
    loop = asyncio.new_event_loop()
    answered = loop.create_future()

    def respond(unused_request, status, payload):
      answered.set_result((status, payload))
    request = Request(method, target, 'HTTP/1.1', headers, respond)

    def begin():
      try:
        answer = self.accept(request)
        if answer is None:
          request.body = bytes(body or b'')[:request.wanted]
          answer = self.app.handle(request)
        if answer is not None:
          answered.set_result(answer)
      except BaseException as e:  # pylint: disable=broad-except
        answered.set_exception(e)
    loop.call_soon(begin)
    try:
      return loop.run_until_complete(answered)
    finally:
      loop.close()


class LoopHandoff:
  """Has an event loop call fn(*args) soon, from any thread: a batch thread
  answering many requests wakes the loop once for all of them."""

  def __init__(self, loop):
    self.loop = loop
    self._handed = []
    self._lock = threading.Lock()
    self._wakeup_due = False

  def __call__(self, fn, *args):
    with self._lock:
      self._handed.append((fn, args))
      if self._wakeup_due:
        return
      self._wakeup_due = True
    self.loop.call_soon_threadsafe(self._run_handed)

  def _run_handed(self):
    with self._lock:
      handed, self._handed = self._handed, []
      self._wakeup_due = False
    for fn, args in handed:
      try:
        fn(*args)
      except Exception:  # pylint: disable=broad-except
        log.exception('HTTP: answering a request failed')


class Request:
  """One parsed HTTP request, until it is answered.

  `state` is the application's, from head() to handle(); `respond` answers
  a request whose answer head() or handle() left for later.
  """
  __slots__ = ('method', 'target', 'version', 'headers', 'close', 'length',
               'wanted', 'body', 'state', '_responder')

  def __init__(self, method, target, version, headers, responder):
    self.method = method
    self.target = target
    self.version = version
    self.headers = headers
    connection = headers.get('connection', '').lower()
    self.close = connection == 'close' or (
        version == 'HTTP/1.0' and connection != 'keep-alive')
    self.length = _content_length_or_none(headers)  # body bytes unread
    if self.length is None and 'content-length' in headers:
      self.close = True  # where this request ends is unknown
    self.wanted = None  # the body length to read, once head() asks for it
    self.body = None
    self.state = None
    self._responder = responder

  def respond(self, status, payload):
    """Answers the request; on the loop thread."""
    self._responder(self, status, payload)


class HttpError(Exception):
  """A request refused by the HTTP layer, with its status."""

  def __init__(self, status, message):
    super().__init__(message)
    self.status = status
    self.message = message


def _check_request_line(line):
  """(method, target, version) of a request line; HttpError if malformed."""
  parts = line.split()
  if len(parts) != 3 or len(line) > _MAX_LINE:
    raise HttpError(400, 'malformed HTTP request line')
  if parts[2] not in ('HTTP/1.1', 'HTTP/1.0'):
    raise HttpError(505, f'unsupported protocol {parts[2]}')
  return parts


def _head(lines, responder):
  """A Request from the lines of a complete head; HttpError if malformed."""
  method, target, version = _check_request_line(lines[0])
  if len(lines) > _MAX_HEADERS + 1:
    raise HttpError(431, f'more than {_MAX_HEADERS} header lines')
  headers = {}
  for line in lines[1:]:
    name, colon, value = line.partition(':')
    if not colon or len(line) > _MAX_LINE:
      raise HttpError(400, 'malformed HTTP header line')
    headers[name.strip().lower()] = value.strip()
  if method not in ('GET', 'POST'):
    raise HttpError(405, f'method {method} is not supported; use GET or POST')
  return Request(method, target, version, headers, responder)


def _content_length_or_none(headers):
  """The Content-Length, or None if absent or malformed."""
  try:
    return _content_length(headers)
  except HttpError:
    return None


def _content_length(headers):
  text = headers.get('content-length')
  if text is None:
    return None
  try:
    length = int(text)
  except ValueError:
    raise HttpError(400, f'bad Content-Length {text!r}') from None
  if length < 0:
    raise HttpError(400, f'bad Content-Length {text!r}')
  return length


class _Connection(asyncio.BufferedProtocol):
  """One client connection: requests are parsed and answered in order.

  A BufferedProtocol: reads land in one buffer that all connections share,
  as the loop copies each read out before the next (the plain Protocol's
  transport allocates 256 KiB per read, which costs more than parsing a
  small request).
  """

  def __init__(self, server):
    self.server = server
    self.app = server.app
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
        except HttpError as e:
          self._answer(None, e.status, self.app.error(e.status, e.message),
                       close=True)
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
    """The next request's head (consumed), None if incomplete; HttpError."""
    buffer = self.buffer
    end = buffer.find(b'\r\n\r\n', 0, _HEAD_BYTES)
    if end >= 0:
      head = buffer[:end].decode('latin-1')
      lines = head.split('\r\n')
      if head.count('\n') == len(lines) - 1:  # no bare LF line ends
        del buffer[:end + 4]
        return _head(lines, self._finish)
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
          raise HttpError(400, 'malformed HTTP header line' if lines else
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
        raise HttpError(431, f'more than {_MAX_HEADERS} header lines')
    del buffer[:start]
    return _head(lines, self._finish)

  def _handle(self, request):
    """Answers or starts answering `request`; False to wait for its body."""
    if request.wanted is None:
      answer = self.server.accept(request)
      if answer is not None:
        return self._answer(request, *answer)
    length = request.wanted
    if len(self.buffer) < length:
      return False
    request.body = bytes(self.buffer[:length])
    del self.buffer[:length]
    request.length = None  # the body is read
    self.busy = True  # until answered, perhaps from within handle()
    answer = self.app.handle(request)
    if answer is None:
      return True
    self.busy = False
    return self._answer(request, *answer)

  def _finish(self, request, status, payload):
    """Answers a request that was in flight, then goes on reading."""
    self.busy = False
    self._send(request, status, payload)
    self._process()

  def _answer(self, request, status, payload, close=False):
    """Answers a request on the spot; True to go on reading."""
    if request is None or close:
      self._send(request, status, payload, close=True)
      return False
    # A body that was not read is dropped as it arrives (keeping the
    # connection), or, over the size limit, read up to a point and the
    # connection closed: the client sees the answer, not a reset.
    unread, request.length = request.length or 0, None
    if unread > self.server.max_body_bytes:
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
      close = request.close or self.server.draining
    if close_header is None:
      close_header = close
    head = (f'HTTP/1.1 {status} {_REASONS.get(status, "")}\r\n'
            f'Content-Type: {self.server.content_type}\r\n'
            f'Content-Length: {len(payload)}\r\n')
    if close_header:
      head += 'Connection: close\r\n'
    elif request is not None and request.version == 'HTTP/1.0':
      head += 'Connection: keep-alive\r\n'
    if not self.closed:
      self.transport.write(head.encode('latin-1') + b'\r\n' + payload)
    if close:
      self.close()
