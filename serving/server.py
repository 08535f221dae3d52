"""The model server: versions, batching and front ends in one process.

`ModelServer` owns the model manager and implements the protocol-neutral
operations (predict / classify / regress on numpy values) that its front
ends (serving/rest.py and serving/grpc_service.py) translate to and from
their wire formats, so both protocols validate and answer alike.

The front ends are handed to it (`estpipe serve` hands both) rather than
imported here: they depend on this core, not the other way round. Each is a
callable `start(server)` that opens one on the port the options name (None
if they name none) and returns an object with `name`, `port`,
`shutdown(grace)` (take no new requests) and `close(grace)` (called once the
requests in flight are answered).

Each operation is validated into a `Call` (a signature, its inputs and how
to turn the signature's outputs into the answer). `Call.run()` runs it in the
calling thread; `Call.start(callback)` runs it without holding a thread
(batched, or on the server's model threads) for the event-loop REST front
end.
"""
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
from typing import List, Optional

import numpy as np

from pipeline import signatures
from serving.batching import Batcher, BatchingOptions
from serving import codec
from serving.codec import check_input_names, check_shape, dtype_name
from serving.errors import invalid
from serving.versions import ConfigFilePoller, ModelConfig, ModelManager

log = logging.getLogger('estpipe')

DEFAULT_MAX_BODY_BYTES = 64 << 20


@dataclasses.dataclass
class ServerOptions:
  """Everything `estpipe serve` configures (see serving/commands.py)."""
  models: List[ModelConfig]
  grpc_port: Optional[int] = 8500  # None: no gRPC; 0: any free port
  rest_port: Optional[int] = 8501  # None: no REST; 0: any free port
  host: str = '127.0.0.1'
  rest_host: Optional[str] = None  # defaults to host
  poll_wait_seconds: float = 1.0
  # Re-read this ModelServerConfig file every model_config_poll_seconds
  # (0: never) and apply it when it changes.
  model_config_file: Optional[str] = None
  model_config_poll_seconds: float = 0
  batching: Optional[BatchingOptions] = None
  max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
  grpc_max_workers: int = 32
  # Threads for unbatched model calls started without waiting (Call.start:
  # the REST front end's, whose requests share one event loop). Python's
  # default pool size.
  model_threads: int = min(32, (os.cpu_count() or 1) + 4)
  shutdown_grace_seconds: float = 30.0
  # REST connections (serving/http_server.py's Limits; 0 or None: none):
  # seconds for a request head to arrive, between reads of a body, and
  # before an idle keep-alive connection is closed; the most connections
  # open at once (None: serving/http_server.default_max_connections()).
  header_timeout_seconds: float = 10.0
  body_timeout_seconds: float = 30.0
  idle_timeout_seconds: float = 30.0
  max_connections: Optional[int] = None
  # A version that failed to load is retried after this many seconds,
  # doubling up to the second figure (and at once when its files change).
  load_retry_seconds: float = 1.0
  load_retry_max_seconds: float = 300.0
  # Replay a version's assets.extra/tf_serving_warmup_requests before it
  # serves (TF Serving's --enable_model_warmup).
  model_warmup: bool = True


class ModelServer:
  """Serves the configured models until `stop()`, over the front ends
  handed to it (see the module docstring)."""

  def __init__(self, options, front_ends=()):
    self.options = options
    self.batcher = Batcher(options.batching) if options.batching else None
    self.manager = ModelManager(
        options.models, options.poll_wait_seconds,
        on_load=self._attach_batcher,
        load_retry_seconds=options.load_retry_seconds,
        load_retry_max_seconds=options.load_retry_max_seconds,
        warmup=options.model_warmup)
    self._inflight = 0
    self._inflight_lock = threading.Lock()
    self._idle = threading.Condition(self._inflight_lock)
    self.draining = False
    self._front_end_starts = tuple(front_ends)
    self.front_ends = []  # the open ones
    self.model_pool = None  # threads for unbatched Call.start calls
    self.config_poller = None

  @property
  def grpc_port(self):
    return self._port('grpc')

  @property
  def rest_port(self):
    return self._port('rest')

  def _port(self, name):
    for front_end in self.front_ends:
      if front_end.name == name:
        return front_end.port
    return None

  def _attach_batcher(self, servable):
    if self.batcher is not None:
      for signature in servable.signatures.values():
        signature.batcher = self.batcher

  def start(self):
    """Loads the current versions, then opens the front ends' ports."""
    opts = self.options
    if opts.model_config_file and opts.model_config_poll_seconds > 0:
      self.config_poller = ConfigFilePoller(
          opts.model_config_file, opts.model_config_poll_seconds, self.manager)
    self.manager.start()
    if self.config_poller is not None:
      self.config_poller.start()
    # Threads start as calls need them: none where nothing uses Call.start.
    self.model_pool = concurrent.futures.ThreadPoolExecutor(
        opts.model_threads, thread_name_prefix='model')
    for start in self._front_end_starts:
      front_end = start(self)
      if front_end is not None:
        self.front_ends.append(front_end)
    return self

  def stop(self, grace=None):
    """Stops taking requests, finishes the in-flight ones, then stops."""
    grace = self.options.shutdown_grace_seconds if grace is None else grace
    self.draining = True
    for front_end in self.front_ends:
      front_end.shutdown(grace)
    with self._idle:
      self._idle.wait_for(lambda: self._inflight == 0, timeout=grace)
    for front_end in self.front_ends:
      front_end.close(grace)
    if self.model_pool is not None:
      self.model_pool.shutdown()
    if self.batcher is not None:
      self.batcher.stop()
    if self.config_poller is not None:
      self.config_poller.stop()
    self.manager.stop()

  def reload_config(self, models):
    """Serves `models` (ModelConfigs) from now on: TF Serving's
    ReloadConfig. Returns once added models are loaded."""
    self.manager.reconfigure(models)

  def begin_request(self):
    """Counts a request as in flight, so shutdown waits for it."""
    with self._inflight_lock:
      self._inflight += 1

  def end_request(self):
    with self._inflight_lock:
      self._inflight -= 1
      if not self._inflight:
        self._idle.notify_all()

  @contextlib.contextmanager
  def request(self):
    """A request in flight for the duration of the block."""
    self.begin_request()
    try:
      yield
    finally:
      self.end_request()

  # Protocol-neutral operations.

  def resolve(self, name, version=None, label=None):
    if version is not None and label is not None:
      raise invalid('Only one of version or version_label may be specified')
    return self.manager.resolve(name, version, label)

  def predict(self, signature, inputs, output_filter=None):
    """Runs a signature on {input name: array}; returns {output: array}."""
    return self.predict_call(signature, inputs, output_filter).run()

  def classify(self, signature, serialized):
    """[[(label bytes, score)] per example] from a classification signature."""
    return self.classify_call(signature, serialized).run()

  def regress(self, signature, serialized):
    """[value per example] from a regression signature."""
    return self.regress_call(signature, serialized).run()

  def predict_call(self, signature, inputs, output_filter=None):
    """The validated Call of `predict`."""
    if signature.fill_values:
      inputs = codec.fill_absent(signature, inputs)
    if signature.example_kinds:
      inputs = codec.coerce_serialized(signature, inputs)
    check_input_names(signature, inputs)
    checks = signature.input_checks
    for name, value in inputs.items():
      want, strings, rank, fixed = checks[name]
      if value.dtype != want and not (strings and value.dtype.kind in 'OS'):
        raise invalid(f'input {name!r} is {dtype_name(value.dtype)} but '
                      f'signature {signature.key!r} expects '
                      f'{dtype_name(signature.inputs[name][0])}')
      if rank is not None and (value.ndim != rank or fixed and any(
          value.shape[axis] != size for axis, size in fixed.items())):
        check_shape(value, name, signature.inputs[name][1])  # raises
    if not output_filter:
      return Call(self, signature, inputs, _identity)
    unknown = sorted(set(output_filter) - set(signature.outputs))
    if unknown:
      raise invalid(f'output_filter names unknown outputs {unknown}; '
                    f'signature {signature.key!r} has '
                    f'{sorted(signature.outputs)}')
    return Call(self, signature, inputs, lambda outputs: {
        k: v for k, v in outputs.items() if k in output_filter})

  def classify_call(self, signature, serialized):
    """The validated Call of `classify`."""
    inputs = self._example_inputs(signature, serialized,
                                  signatures.CLASSIFY_METHOD, 'classification')
    count = len(serialized)

    def finish(outputs):
      classes = outputs.get(signatures.CLASSIFY_OUTPUT_CLASSES)
      scores = outputs.get(signatures.CLASSIFY_OUTPUT_SCORES)
      if classes is None and scores is None:
        raise invalid('Expected classification signature outputs to contain '
                      'classes or scores')
      for key, value in ((signatures.CLASSIFY_OUTPUT_CLASSES, classes),
                         (signatures.CLASSIFY_OUTPUT_SCORES, scores)):
        if value is not None and (value.ndim != 2 or value.shape[0] != count):
          raise invalid(f'Expected {key} output of shape [{count}, k], got '
                        f'{list(value.shape)}')
      width = (classes if classes is not None else scores).shape[1]
      labels = classes.tolist() if classes is not None else [[b''] * width
                                                             ] * count
      values = scores.tolist() if scores is not None else [[0.0] * width
                                                           ] * count
      return [list(zip(l, v)) for l, v in zip(labels, values)]
    return Call(self, signature, inputs, finish)

  def regress_call(self, signature, serialized):
    """The validated Call of `regress`."""
    inputs = self._example_inputs(signature, serialized,
                                  signatures.REGRESS_METHOD, 'regression')
    count = len(serialized)

    def finish(outputs):
      values = outputs.get(signatures.REGRESS_OUTPUTS)
      if values is None:
        raise invalid('Expected regression signature to have an "outputs" '
                      'output')
      if values.size != count or values.shape[0] != count:
        raise invalid(f'Expected outputs of shape [{count}] or [{count}, 1], '
                      f'got {list(values.shape)}')
      return values.reshape(count).tolist()
    return Call(self, signature, inputs, finish)

  def _example_inputs(self, signature, serialized, method, kind):
    if signature.method_name != method:
      raise invalid(f'Expected {kind} signature method_name to be {method}. '
                    f'Was: {signature.method_name}')
    if len(signature.inputs) != 1:
      raise invalid(f'Expected one input tensor in the {kind} signature, got '
                    f'{len(signature.inputs)}')
    if not serialized:
      raise invalid('Input is empty: send at least one example')
    (name,) = signature.inputs
    batch = np.empty(len(serialized), dtype=object)
    batch[:] = serialized
    return {name: batch}

  def statuses(self, name, version=None, label=None):
    if version is not None and label is not None:
      raise invalid('Only one of version or version_label may be specified')
    return self.manager.statuses(name, version, label)


def _identity(outputs):
  return outputs


class Call:
  """A validated signature call and how its outputs become the answer."""
  __slots__ = ('server', 'signature', 'inputs', 'finish')

  def __init__(self, server, signature, inputs, finish):
    self.server = server
    self.signature = signature
    self.inputs = inputs
    self.finish = finish  # signature outputs -> the operation's result

  def run(self):
    """Runs the call in this thread (batched with others if batching is
    on); returns the result."""
    return self.finish(self.signature.run(self.inputs))

  def start(self, callback):
    """Starts the call without waiting for it: `callback(outputs, error)`
    follows from another thread, with the signature's outputs (pass them to
    `finish`) or a ServingError. A batched call takes no thread while it
    waits; others run on the server's model threads."""
    if self.signature.submit(self.inputs, callback):
      return
    self.server.model_pool.submit(
        _run_for, self.signature, self.inputs, callback)


def _run_for(signature, inputs, callback):
  try:
    outputs = signature.run(inputs)
  except Exception as e:  # pylint: disable=broad-except
    callback(None, e)
  else:
    callback(outputs, None)


def serve_until_signal(server):
  """Runs `server` until SIGTERM or SIGINT, then shuts it down cleanly."""
  import signal  # pylint: disable=g-import-not-at-top
  stop = threading.Event()
  previous = {sig: signal.signal(sig, lambda *_: stop.set())
              for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    server.start()
    log.info('serving; SIGTERM or Ctrl-C stops after in-flight requests')
    while not stop.wait(3600):
      pass
    log.info('shutting down: finishing in-flight requests')
    server.stop()
    log.info('stopped')
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)

