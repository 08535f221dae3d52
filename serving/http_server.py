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
import re
import socket
import threading

log = logging.getLogger('estpipe')

_MAX_LINE = 65536
_HTTP_VERSION = re.compile(r'HTTP/[0-9]\.[0-9]\Z')
_MAX_HEADERS = 100
# Bodies over the limit up to this size are read and dropped after a 413.
_DRAIN_LIMIT = 64 << 20
# Bytes read from a connection at a time.
_READ_BYTES = 64 << 10
# A request head longer than this is refused line by line.
_HEAD_BYTES = 16 << 10
# Reading from a connection pauses while this much waits behind a request.
_PAUSE_BYTES = 1 << 20
# Connections over the limit are answered 503 and kept open this long (at
# most this many at once) to read what the client sends, so that closing
# doesn't reset the connection before the client reads the answer; past
# that many they are closed at once.
_REFUSED_LINGER_SECONDS = 0.25
_MAX_LINGERING = 32
# Headers that may appear once: a second Content-Length is refused rather
# than one of them believed.
_SINGLE_HEADERS = frozenset(('content-length', 'transfer-encoding', 'host'))
_REASONS = {status: text for status, (text, _) in
            http.server.BaseHTTPRequestHandler.responses.items()}


class Limits:
  """How long a connection may keep the server waiting, and how many there
  may be; a None or 0 setting is no limit. `names` maps each to the setting
  the operator changes it with, quoted in answers and logs."""

  def __init__(self, header_timeout=None, body_timeout=None,
               idle_timeout=None, max_connections=None, names=None):
    # A request head must arrive within header_timeout seconds of its first
    # byte (or of the connection, for the first): else 408 and close.
    self.header_timeout = header_timeout or None
    # A body must progress: at most body_timeout seconds between reads.
    self.body_timeout = body_timeout or None
    # A keep-alive connection with no request in it is closed after this.
    self.idle_timeout = idle_timeout or None
    # Connections over this many are answered 503 and closed.
    self.max_connections = max_connections or None
    self.names = names or {}

  def named(self, setting):
    name = self.names.get(setting)
    return f' ({name})' if name else ''

  def check_interval(self):
    """Seconds between the checks of every connection's clock; None if no
    timeout is set."""
    timeouts = [t for t in (self.header_timeout, self.body_timeout,
                            self.idle_timeout) if t]
    if not timeouts:
      return None
    return min(1.0, max(0.02, min(timeouts) / 4))


def default_max_connections():
  """A connection limit under the process's file limit, leaving room for
  refused connections on their way out, model files, gRPC and logs: a
  quarter (at least 128) of it; at most 4096 connections."""
  try:
    import resource  # pylint: disable=g-import-not-at-top
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
  except (ImportError, OSError, ValueError):
    return 1024
  if soft == resource.RLIM_INFINITY or soft <= 0:
    return 4096
  return max(8, min(4096, soft - max(128, soft // 4)))


class HttpServer:
  """The event loop thread, its listening socket and its connections.

  `max_body_bytes` bounds request bodies (a larger one is answered 413);
  `limit_name` names the setting in that answer, for the operator. `limits`
  (Limits) bound how long a client may hold a connection without sending
  and how many connections there may be.
  """

  def __init__(self, app, max_body_bytes, limit_name=None,
               content_type='application/json', thread_name='http',
               limits=None):
    self.app = app
    self.max_body_bytes = max_body_bytes
    self.limit_name = limit_name
    self.content_type = content_type
    self.thread_name = thread_name
    self.limits = limits or Limits()
    # Requests whose head has arrived and that are not answered yet: shutdown
    # answers them before closing their connections.
    self.in_flight = 0
    self.lingering = 0  # refused connections not yet closed
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
    interval = self.limits.check_interval()
    if interval is not None:
      loop.call_later(interval, self._check_clocks, interval)
    try:
      loop.run_forever()
    finally:
      loop.close()

  def _check_clocks(self, interval):
    """Times out connections that kept the server waiting too long."""
    now = self.loop.time()
    for connection in list(self.connections):
      connection.check_clock(now)
    self.loop.call_later(interval, self._check_clocks, interval)

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
    """Stops taking connections and closes the idle ones; requests whose
    head has arrived are still read and answered (see finish)."""
    self.draining = True
    if self._thread.is_alive():
      self._in_loop(self._stop_listening)

  def _stop_listening(self):
    self._listener.close()
    for connection in list(self.connections):
      connection.close_if_idle()

  def finish(self, timeout):
    """Waits up to `timeout` seconds for the requests in flight (head
    arrived, not yet answered: a body still uploading included) to be
    answered; True if they were."""
    if not self._thread.is_alive():
      return True
    done = concurrent.futures.Future()

    def check():
      if not self.in_flight:
        done.set_result(True)
      elif not done.done():
        self.loop.call_later(0.01, check)
    self.loop.call_soon_threadsafe(check)
    try:
      return done.result(timeout)
    except concurrent.futures.TimeoutError:
      log.warning('HTTP: %d requests still unanswered after %ss',
                  self.in_flight, timeout)
      done.cancel()
      return False

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
    if _HTTP_VERSION.match(parts[2]) is None:  # not a version at all
      raise HttpError(400, 'malformed HTTP request line')
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
    # No space in a name ("Content-Length :"), no folded lines (RFC 9112):
    # proxies read those differently, which is how requests get smuggled.
    if (not colon or len(line) > _MAX_LINE or not name or
        name != name.strip() or ' ' in name or '\t' in name):
      raise HttpError(400, 'malformed HTTP header line')
    name = name.lower()
    if name in _SINGLE_HEADERS and name in headers:
      raise HttpError(400, f'more than one {name} header')
    headers[name] = value.strip()
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
  # ASCII digits only: int() also takes '+10', '1_0', ' 10' and '١٠'.
  if not (text.isascii() and text.isdigit()):
    raise HttpError(400, f'bad Content-Length {text!r}')
  if len(text) > 18:  # beyond any limit; int() stops at 4,300 digits
    raise HttpError(413, f'Content-Length {text[:40]}... is too large')
  return int(text)


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
    self.pending = False  # a request's head arrived, its answer not sent
    self.refused = False  # over the connection limit
    self.lingering = False  # refused, and counted in server.lingering
    # Clocks (loop time) for the timeouts, see check_clock.
    self.fresh = True  # no request has been answered yet
    self.idle_since = self.head_started = self.last_read = 0.0

  # asyncio.Protocol

  def connection_made(self, transport):
    self.transport = transport
    server = self.server
    limit = server.limits.max_connections
    if limit and len(server.connections) >= limit:
      self._refuse(limit)
      return
    sock = transport.get_extra_info('socket')
    if sock is not None:
      sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.connections.add(self)
    self.idle_since = self.head_started = self.last_read = (
        server.loop.time())

  def _refuse(self, limit):
    """Answers 503 at once and closes, without reading a request: the
    client gets an answer, not a stall."""
    self.refused = self.closed = True
    payload = self.app.error(503, f'the server has {limit} open connections, '
                             'its limit' + self.server.limits.named(
                                 'max_connections') + '; try again later')
    self.transport.write(
        f'HTTP/1.1 503 {_REASONS[503]}\r\nContent-Type: '
        f'{self.server.content_type}\r\nContent-Length: {len(payload)}\r\n'
        'Connection: close\r\n\r\n'.encode('latin-1') + payload)
    # Half-close, then read and drop what the client sends until it closes
    # (closing with its request unread would reset the connection, and the
    # client might lose the answer), briefly and for a few at a time: each
    # holds a file.
    server = self.server
    if (server.lingering < _MAX_LINGERING and
        self.transport.can_write_eof()):
      server.lingering += 1
      self.lingering = True
      self.transport.write_eof()
      server.loop.call_later(_REFUSED_LINGER_SECONDS, self.transport.close)
    else:
      self.transport.close()

  def connection_lost(self, exc):
    self.closed = True
    if self.refused:
      if self.lingering:
        self.lingering = False
        self.server.lingering -= 1
      return
    self.server.connections.discard(self)
    if self.pending and not self.busy:
      # Its answer can't be sent; one in the making still comes to _send.
      self.pending = False
      self.server.in_flight -= 1

  def check_clock(self, now):
    """Closes the connection if it kept the server waiting too long: for a
    request head (408), between reads of a body (408), or idle."""
    if self.closed or self.busy:
      return
    limits = self.server.limits
    if self.request is not None or self.skip:
      timeout, since, setting = (limits.body_timeout, self.last_read,
                                 'body_timeout')
    elif self.buffer or self.fresh:
      timeout, since, setting = (limits.header_timeout, self.head_started,
                                 'header_timeout')
    else:
      if self.server.draining:
        self.close()
        return
      timeout, since, setting = (limits.idle_timeout, self.idle_since,
                                 'idle_timeout')
    if timeout is None or now - since < timeout:
      return
    if setting == 'idle_timeout' or (setting == 'header_timeout' and
                                     not self.buffer) or self.skip:
      self.close()  # nothing to answer
      return
    what = 'request body' if self.request is not None else 'request head'
    message = (f'{what} not received in time: the limit is {timeout:g} s'
               + (' between reads' if self.request is not None else '')
               + limits.named(setting))
    self._send(self.request, 408, self.app.error(408, message), close=True)

  def close_if_idle(self):
    """Closes the connection if no request is in it (on shutdown)."""
    if not (self.busy or self.pending or self.buffer or self.skip):
      self.close()

  def get_buffer(self, sizehint):
    return self.reads

  def buffer_updated(self, nbytes):
    self.data_received(self.reads[:nbytes])

  def data_received(self, data):
    if self.refused:
      return
    now = self.last_read = self.server.loop.time()
    if not self.buffer and self.request is None and not self.skip:
      self.head_started = now
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
    if self.refused:
      return False  # close
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
        self.pending = True
        self.server.in_flight += 1
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
    if request is not None and self.pending:
      self.pending = False
      self.server.in_flight -= 1
    self.fresh = False
    self.idle_since = self.head_started = self.server.loop.time()
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
