"""TF Serving's REST API (v1) over the model server.

  GET  /v1/models/NAME[/versions/V | /labels/L]            model status
  GET  /v1/models/NAME[/versions/V | /labels/L]/metadata   signatures
  POST /v1/models/NAME[/versions/V | /labels/L]:predict | :classify | :regress

Predict takes the row (`instances`) or columnar (`inputs`) format and
answers `predictions` or `outputs` in the same format; classify and regress
take `examples` (+ `context`) and answer `results`. Errors answer
`{"error": "..."}` with TF Serving's HTTP codes.

`RestApi` is the application serving/http_server.py hands requests to: it
maps them to the ModelServer's protocol-neutral calls and their results to
JSON, so the API can be tested without sockets (`answer`). Status and
metadata come from serving/status.py, as for gRPC, so the two agree.

Requests are validated on the HTTP server's event loop, and model calls
leave it: with batching, a request joins a batch and the batch thread hands
the outputs back to the loop (no thread waits per request); without, it runs
on the server's model threads. Requests with large bodies are parsed on a
model thread too, so they don't hold up the loop.
"""

import asyncio
import json
import logging
import re

import grpc

try:  # a dependency of apache-beam: writes JSON ~10x faster than json
  import orjson  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  orjson = None

from serving import codec
from serving import status
from serving.errors import ServingError, invalid, not_found
from serving.http_server import HttpServer, Limits, LoopHandoff
from serving.http_server import default_max_connections

log = logging.getLogger('estpipe')

_PATH = re.compile(
    r'^/v1/models/(?P<name>[^/:]+)'
    r'(?:/versions/(?P<version>[^/:]*)|/labels/(?P<label>[^/:]*))?'
    r'(?:(?P<metadata>/metadata)|:(?P<verb>[^/:]*))?$')
_VERBS = ('predict', 'classify', 'regress')
_INT64_MAX = (1 << 63) - 1
# Larger bodies are parsed and answered on a model thread, off the loop.
_INLINE_BODY_BYTES = 64 << 10


def start(core):
  """Opens the REST front end of `core` (a ModelServer) on the port its
  options name; None if they name none."""
  opts = core.options
  if opts.rest_port is None:
    return None
  host = opts.rest_host or opts.host
  server = _http_server(core)
  server.start(host, opts.rest_port)
  front_end = _FrontEnd(server)
  log.info('REST API at http://%s:%d/v1/models/%s', host, front_end.port,
           core.manager.model_names[0])
  return front_end


def answer(core, method, target, body=None):
  """(HTTP status, JSON answer) of one request to `core`, answered as over
  HTTP (batching and model threads included) but without sockets."""
  status_code, payload = _http_server(core).exchange(method, target, body)
  return status_code, json.loads(payload)


def _http_server(core):
  opts = core.options
  limits = Limits(
      header_timeout=opts.header_timeout_seconds,
      body_timeout=opts.body_timeout_seconds,
      idle_timeout=opts.idle_timeout_seconds,
      max_connections=(default_max_connections()
                       if opts.max_connections is None
                       else opts.max_connections),
      names={name: f'--{name}_seconds' for name in (
          'header_timeout', 'body_timeout', 'idle_timeout')} | {
              'max_connections': '--max_connections'})
  return HttpServer(RestApi(core), opts.max_body_bytes,
                    limit_name='--max_request_bytes', thread_name='rest-api',
                    limits=limits)


class _FrontEnd:
  """The HTTP server as the ModelServer drives its front ends."""
  name = 'rest'

  def __init__(self, server):
    self.server = server
    self.port = server.server_address[1]

  def shutdown(self, grace):
    del grace  # open connections are answered until closed
    self.server.shutdown()

  def close(self, grace):
    # Requests whose head arrived before shutdown are in flight: their
    # bodies are read and they are answered, within the grace period.
    self.server.finish(grace)
    self.server.server_close()


class RestApi:
  """The REST API of one ModelServer, as an http_server application."""

  def __init__(self, core):
    self.core = core
    self._hand_back = None  # to the loop, from batch and model threads

  def error(self, status_code, message):
    del status_code  # TF Serving's error body is the same for every status
    return _json({'error': message})

  def head(self, request):
    """Answers status and metadata; checks a verb's URL before its body."""
    core = self.core
    try:
      if core.draining:
        request.close = True
        raise ServingError(grpc.StatusCode.UNAVAILABLE,
                           'the server is shutting down')
      route = request.state = _route(request.method, request.target)
      if route.verb is None:
        return 200, _json(_get(core, route))
    except Exception as e:  # pylint: disable=broad-except
      return _error_answer(request, e)
    return None

  def handle(self, request):
    """Starts a verb's model call; its answer follows on the loop."""
    core = self.core
    hand_back = self._hand_back
    if hand_back is None:  # the first call: this is the server's loop
      hand_back = self._hand_back = LoopHandoff(asyncio.get_running_loop())
    core.begin_request()
    if len(request.body) > _INLINE_BODY_BYTES:
      core.model_pool.submit(self._answer_off_loop, request, hand_back)
      return None
    try:
      call, answer_of = _start_verb(core, request.state, request.body)
    except Exception as e:  # pylint: disable=broad-except
      core.end_request()
      return _error_answer(request, e)

    def done(outputs, error):  # on a batch or model thread
      hand_back(self._model_done, request, call, answer_of, outputs, error)
    try:
      call.start(done)
    except Exception as e:  # pylint: disable=broad-except
      self._model_done(request, call, answer_of, None, e)
    return None

  def _model_done(self, request, call, answer_of, outputs, error):
    try:
      if error is not None:
        raise error
      status_code, payload = 200, _json(answer_of(call.finish(outputs)))
    except Exception as e:  # pylint: disable=broad-except
      status_code, payload = _error_answer(request, e)
    self._respond(request, status_code, payload)

  def _answer_off_loop(self, request, hand_back):
    """Parses, runs and answers a large request on a model thread."""
    try:
      call, answer_of = _start_verb(self.core, request.state, request.body)
      status_code, payload = 200, _json(answer_of(call.run()))
    except Exception as e:  # pylint: disable=broad-except
      status_code, payload = _error_answer(request, e)
    hand_back(self._respond, request, status_code, payload)

  def _respond(self, request, status_code, payload):
    """Answers a request that was in flight; on the loop."""
    self.core.end_request()
    request.respond(status_code, payload)


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
  """(HTTP status, payload) of a failed request."""
  if isinstance(error, ServingError):
    return error.http_status, _json({'error': error.message})
  log.error('REST %s %s failed', request.method, request.target,
            exc_info=(type(error), error, error.__traceback__))
  return 500, _json({'error': f'Internal error: {error}'})


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
  if route.metadata:
    servable = core.resolve(route.name, route.version, route.label)
    return status.metadata_json(servable)
  return status.status_json(core, route.name, route.version, route.label)


def _start_verb(core, route, data):
  """(Call, answer) of a verb request: answer(result) is the JSON body."""
  body = _parse_json(data)
  if not isinstance(body, dict):
    raise invalid('request body must be a JSON object, got '
                  f'{type(body).__name__}')
  servable = core.resolve(route.name, route.version, route.label)
  try:
    return _VERB_HANDLERS[route.verb](core, servable, body)
  except RecursionError:
    raise invalid(_TOO_DEEP) from None


_TOO_DEEP = 'request body is nested too deeply'
# A \u escape of a UTF-16 surrogate, which json.loads decodes unpaired too.
_SURROGATE_ESCAPE = re.compile(rb'\\u[dD][89abcdefABCDEF]')


def _parse_json(data):
  """The JSON value of a request body; a ServingError unless the body is
  valid JSON of valid Unicode text."""
  try:
    body = json.loads(data)
  except RecursionError:
    raise invalid(f'{_TOO_DEEP} to parse as JSON') from None
  except (UnicodeDecodeError, ValueError) as e:
    raise invalid(f'request body is not valid JSON: {e}') from None
  # JSON text may escape a lone surrogate ("\ud800"), which is no Unicode
  # character: TF Serving refuses it, as does UTF-8. Paired ones are fine.
  if _SURROGATE_ESCAPE.search(data) is not None:
    _check_surrogates(body)
  return body


def _check_surrogates(value):
  """Raises a ServingError if a string (or object key) in `value` holds an
  unpaired UTF-16 surrogate. Iterative: any nesting depth."""
  stack = [value]
  while stack:
    value = stack.pop()
    if isinstance(value, dict):
      stack.extend(value)
      stack.extend(value.values())
    elif isinstance(value, list):
      stack.extend(value)
    elif isinstance(value, str):
      try:
        value.encode('utf-8')
      except UnicodeEncodeError as e:
        raise invalid(
            'request body holds a string with an unpaired UTF-16 surrogate '
            f'({value[e.start:e.end]!r} at character {e.start}), which is '
            'not valid Unicode text') from None


def _version(text):
  if text is None:
    return None
  # ASCII digits only: str.isdigit() takes '²' and '١', which int() refuses.
  if not (text.isascii() and text.isdigit()):
    raise invalid(f'model version must be a positive integer, got {text!r}')
  if len(text.lstrip('0')) > 19 or int(text) > _INT64_MAX:
    raise invalid(f'model version {text} is out of range (int64)')
  return int(text)


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
  if _is_named(instances[0]) and signature.fill_values:
    # Inputs with a missing value may be left out of any instance.
    names = set()
    for i, instance in enumerate(instances):
      if not _is_named(instance):
        raise invalid(f'instances[{i}] is {_describe(instance)}; every '
                      'instance must be an object naming inputs')
      names.update(instance)
    codec.check_input_names(signature, names)
    columns = {name: [instance.get(name) for instance in instances]
               for name in signature.inputs}
  elif _is_named(instances[0]):
    names = set(instances[0])
    for i, instance in enumerate(instances):
      if not _is_named(instance) or set(instance) != names:
        raise invalid(f'instances[{i}] names inputs {_keys(instance)}, but '
                      f'instances[0] names {sorted(names)}; every instance '
                      'must name the same inputs')
    codec.check_input_names(signature, names)
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
    if signature.fill_values:  # a null column: missing in every row
      inputs = {name: value for name, value in inputs.items()
                if value is not None or name not in signature.fill_values}
    codec.check_input_names(signature, set(inputs))
    columns = inputs
  elif len(signature.inputs) == 1:
    columns = {next(iter(signature.inputs)): inputs}
  else:
    raise invalid(f'signature {signature.key!r} has inputs '
                  f'{sorted(signature.inputs)}: \'inputs\' must be an object '
                  'naming them')
  return _convert(columns, signature)


def _describe(value):
  return type(value).__name__ if not isinstance(value, (int, float, str)) \
      else repr(value)


def _keys(value):
  return sorted(value) if isinstance(value, dict) else type(value).__name__


def _convert(columns, signature):
  """JSON columns as arrays; on a signature with missing values (an estpipe
  export's raw features), null stands for missing and an input left out of
  the columnar format is missing in every row (codec.fill_absent)."""
  if signature.fill_values:
    columns = {name: codec.fill_nulls(value, codec.json_fill(signature, name))
               for name, value in columns.items()}
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
  return {'results': [[[codec.label_text(label), score] for label, score in result]
                      for result in results]}


def _regress(core, servable, body):
  signature = _signature(servable, body)
  call = core.regress_call(signature, _examples(body, servable.raw_features))
  return call, _regress_answer


def _regress_answer(values):
  return {'results': values}


_VERB_HANDLERS = {'predict': _predict, 'classify': _classify,
                  'regress': _regress}
