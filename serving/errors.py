"""The one error type the model server answers with, and its HTTP codes.

Handlers raise `ServingError(code, message)` with a gRPC status code; the gRPC
service aborts with it and the REST service turns it into TF Serving's HTTP
status and `{"error": message}` body, so both protocols agree.
"""

import grpc

# TF Serving's mapping from canonical status codes to HTTP status codes
# (model_servers/http_server.cc), so REST clients see the same codes.
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# tf.errors codes are the canonical codes, numbered as in gRPC.
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
  """A request failure with the status code a client should see."""

  def __init__(self, code, message):
    super().__init__(message)
    self.code = code
    self.message = message

  @property
  def http_status(self):
    return _HTTP_STATUS.get(self.code, 500)


def invalid(message):
  return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message):
  return ServingError(grpc.StatusCode.NOT_FOUND, message)


def from_tf_error(error):
  """A ServingError for a tf.errors.OpError raised while running a model."""
  code = _BY_NUMBER.get(getattr(error, 'error_code', 2),
                        grpc.StatusCode.UNKNOWN)
  return ServingError(code, _op_error_message(
      getattr(error, 'message', None) or str(error)))


def _op_error_message(text):
  """The lines of a TF runtime error that say what went wrong, without
  the 'Graph execution error' banner, Python trace and node annotations."""
  lines = [line.strip() for line in text.splitlines()
           if line.strip() and not line[0].isspace()
           and not line.startswith(('Graph execution error',
                                    'Detected at node'))]
  lines = [_assertion(line.split(' [[', 1)[0].split(' [Op:', 1)[0])
           for line in lines]
  return ' '.join(line for line in lines if line) or text.strip()


def _assertion(line):
  """A tf.debugging assertion's message as written: TF prints it as
  `assertion failed: [text] [more data]...`, with quotes escaped."""
  start = line.find(_ASSERTION)
  if start < 0:
    return line
  inner = line[start + len(_ASSERTION):]
  end = inner.find('] [')
  inner = inner[:end] if end >= 0 else inner[:-1] if inner.endswith(']') \
      else inner
  return inner.replace("\\'", "'").replace('\\"', '"')


_ASSERTION = 'assertion failed: ['
