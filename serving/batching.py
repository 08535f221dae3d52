"""Dynamic batching: concurrent requests merged into one signature call.

Each signature gets a `Batcher`. A request joins the open batch when its
inputs have the same per-row shapes and the batch has room; a batch closes
when it reaches max_batch_size or batch_timeout_micros after it opened, and
a pool of batch threads runs closed batches, then hands each request its rows:
`run` waits for them in the caller's thread, `submit` has them passed to a
callback (so an event loop can wait for many requests without a thread each).

The parameters file uses TF Serving's text format (BatchingParameters from
session_bundle_config.proto). tensorflow-serving-api does not ship that
message, so the subset we honour is declared here and parsed with
text_format: unknown fields fail with the line and field name.
"""

import collections
import logging
import os
import threading
import time

import grpc
import numpy as np
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from google.protobuf import text_format
from google.protobuf import wrappers_pb2

from serving.errors import ServingError

log = logging.getLogger('estpipe')


def _batching_parameters_class():
  pool = descriptor_pool.DescriptorPool()
  wrappers = descriptor_pb2.FileDescriptorProto()
  wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
  pool.Add(wrappers)
  proto = descriptor_pb2.FileDescriptorProto(
      name='estpipe/serving/batching_parameters.proto',
      package='tensorflow.serving', syntax='proto3',
      dependency=['google/protobuf/wrappers.proto'])
  message = proto.message_type.add(name='BatchingParameters')
  field = descriptor_pb2.FieldDescriptorProto
  # Field numbers as in TF Serving's session_bundle_config.proto.
  for name, number, kind in (
      ('max_batch_size', 1, 'Int64Value'),
      ('batch_timeout_micros', 2, 'Int64Value'),
      ('max_enqueued_batches', 3, 'Int64Value'),
      ('num_batch_threads', 4, 'Int64Value'),
      ('thread_pool_name', 5, 'StringValue'),
      ('enable_large_batch_splitting', 7, 'BoolValue'),
      ('max_execution_batch_size', 8, 'Int64Value')):
    message.field.add(name=name, number=number, type=field.TYPE_MESSAGE,
                      label=field.LABEL_OPTIONAL,
                      type_name=f'.google.protobuf.{kind}')
  message.field.add(name='allowed_batch_sizes', number=6,
                    type=field.TYPE_INT64, label=field.LABEL_REPEATED)
  message.field.add(name='pad_variable_length_inputs', number=9,
                    type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL)
  pool.Add(proto)
  return message_factory.GetMessageClass(
      pool.FindMessageTypeByName('tensorflow.serving.BatchingParameters'))


BatchingParameters = _batching_parameters_class()


class BatchingOptions:
  """The batching settings in force (TF Serving's defaults otherwise)."""

  def __init__(self, max_batch_size=1000, batch_timeout_micros=0,
               max_enqueued_batches=100, num_batch_threads=None,
               allowed_batch_sizes=()):
    self.max_batch_size = max_batch_size
    self.batch_timeout_micros = batch_timeout_micros
    self.max_enqueued_batches = max_enqueued_batches
    self.num_batch_threads = num_batch_threads or os.cpu_count() or 1
    self.allowed_batch_sizes = sorted(allowed_batch_sizes)
    self.validate()

  def validate(self):
    if self.max_batch_size < 1:
      raise ValueError('max_batch_size must be >= 1')
    if self.batch_timeout_micros < 0:
      raise ValueError('batch_timeout_micros must be >= 0')
    if self.max_enqueued_batches < 1:
      raise ValueError('max_enqueued_batches must be >= 1')
    if self.num_batch_threads < 1:
      raise ValueError('num_batch_threads must be >= 1')
    if self.allowed_batch_sizes and (
        self.allowed_batch_sizes[-1] != self.max_batch_size):
      raise ValueError('the largest allowed_batch_sizes entry must equal '
                       'max_batch_size')


def parse_batching_parameters(text):
  """BatchingOptions from TF Serving's text-format BatchingParameters."""
  params = BatchingParameters()
  text_format.Parse(text, params)  # ParseError names the line and field
  if params.pad_variable_length_inputs:
    raise ValueError('pad_variable_length_inputs is not supported: requests '
                     'with different row shapes run in separate batches')
  kwargs = {}
  for name in ('max_batch_size', 'batch_timeout_micros',
               'max_enqueued_batches', 'num_batch_threads'):
    if params.HasField(name):
      kwargs[name] = getattr(params, name).value
  if params.allowed_batch_sizes:
    kwargs['allowed_batch_sizes'] = list(params.allowed_batch_sizes)
  return BatchingOptions(**kwargs)


class _Task:
  """One request's rows; `done` is held until its outputs are set, or
  `callback(outputs, error)` is called with them."""
  __slots__ = ('inputs', 'rows', 'done', 'outputs', 'error', 'callback')

  def __init__(self, inputs, rows, callback=None):
    self.inputs = inputs
    self.rows = rows
    self.callback = callback
    if callback is None:
      # A bare lock is the cheapest one-shot signal between two threads.
      self.done = threading.Lock()
      self.done.acquire()
    self.outputs = None
    self.error = None

  def finish(self):
    if self.callback is None:
      self.done.release()
      return
    try:
      self.callback(self.outputs, self.error)
    except Exception:  # pylint: disable=broad-except
      log.exception('a batched request\'s callback failed')


class _Batch:
  __slots__ = ('signature', 'key', 'tasks', 'rows', 'deadline')

  def __init__(self, signature, key, deadline):
    self.signature = signature
    self.key = key
    self.tasks = []
    self.rows = 0
    self.deadline = deadline


class Batcher:
  """Merges concurrent calls of signatures into batched calls.

  One Batcher (with its threads) serves every signature of every model; a
  batch only ever holds requests for one signature.
  """

  def __init__(self, options):
    self.options = options
    self._lock = threading.Condition()
    self._open = {}  # signature -> open _Batch (one per signature)
    self._closed = collections.deque()
    self._stopping = False
    self.stats = {'batches': 0, 'rows': 0}  # for tests and logs
    self._threads = [
        threading.Thread(target=self._work, name=f'batch-{i}', daemon=True)
        for i in range(options.num_batch_threads)]
    for thread in self._threads:
      thread.start()

  def run(self, signature, inputs):
    """Runs `signature` on `inputs` as part of a batch; returns its rows."""
    rows = self._batchable_rows(inputs)
    if rows is None:
      # Unbatchable or larger than a batch: run on its own, unsplit.
      return signature.call(inputs)
    task = _Task(inputs, rows)
    self._enqueue(signature, task)
    task.done.acquire()
    if task.error is not None:
      raise task.error
    return task.outputs

  def submit(self, signature, inputs, callback):
    """Queues `inputs` for a batch; a batch thread calls
    `callback(outputs, error)` with its rows or a ServingError. Returns False
    (and queues nothing) if the inputs can't join a batch; raises
    ServingError if the queue is full or the batcher is stopping."""
    rows = self._batchable_rows(inputs)
    if rows is None:
      return False
    self._enqueue(signature, _Task(inputs, rows, callback))
    return True

  def _batchable_rows(self, inputs):
    rows = _rows(inputs)
    if rows is None or rows == 0 or rows > self.options.max_batch_size:
      return None
    return rows

  def _enqueue(self, signature, task):
    key = tuple((name, value.shape[1:], value.dtype)
                for name, value in sorted(task.inputs.items()))
    with self._lock:
      if self._stopping:
        raise ServingError(grpc.StatusCode.UNAVAILABLE,
                           'the server is shutting down')
      batch = self._open.get(signature)
      # Batch threads only need waking when a batch opens (a new deadline)
      # or closes, not for every request that joins one.
      wake = False
      if batch is not None and (
          batch.key != key or
          batch.rows + task.rows > self.options.max_batch_size):
        self._close(signature)
        batch, wake = None, True
      if batch is None:
        if len(self._closed) >= self.options.max_enqueued_batches:
          raise ServingError(
              grpc.StatusCode.UNAVAILABLE,
              'the batch queue is full; retry later')
        deadline = time.monotonic() + self.options.batch_timeout_micros / 1e6
        batch = self._open[signature] = _Batch(signature, key, deadline)
        wake = True
      batch.tasks.append(task)
      batch.rows += task.rows
      # With a zero timeout the batch stays open until a batch thread is
      # free, so requests that arrive while all threads are busy merge.
      if batch.rows >= self.options.max_batch_size:
        self._close(signature)
        wake = True
      if wake:
        self._lock.notify_all()

  def _close(self, signature):
    self._closed.append(self._open.pop(signature))

  def _work(self):
    while True:
      with self._lock:
        batch = self._next_batch()
        if batch is None:
          return
      self._execute(batch)

  def _next_batch(self):
    """Waits for a closed batch (closing expired open ones); None to stop."""
    while True:
      if self._closed:
        return self._closed.popleft()
      now = time.monotonic()
      expired = [s for s, b in self._open.items() if b.deadline <= now]
      for signature in expired:
        self._close(signature)
      if self._closed:
        continue
      if self._stopping and not self._open:
        return None
      timeout = (min(b.deadline for b in self._open.values()) - now
                 if self._open else None)
      self._lock.wait(timeout)

  def _execute(self, batch):
    tasks = batch.tasks
    try:
      if len(tasks) == 1:
        inputs = tasks[0].inputs
      else:
        inputs = {name: np.concatenate([t.inputs[name] for t in tasks])
                  for name in tasks[0].inputs}
      padded = self._padded_size(batch.rows)
      if padded > batch.rows:
        inputs = {name: _pad(value, padded) for name, value in inputs.items()}
      outputs = batch.signature.call(inputs)
      self.stats['batches'] += 1  # only batch threads write these
      self.stats['rows'] += batch.rows
      start = 0
      for task in tasks:
        end = start + task.rows
        task.outputs = {name: value[start:end]
                        for name, value in outputs.items()}
        start = end
    except ServingError as e:
      for task in tasks:
        task.error = e
    except Exception as e:  # pylint: disable=broad-except
      log.exception('batched call of %s failed', batch.signature.key)
      for task in tasks:
        task.error = ServingError(grpc.StatusCode.INTERNAL,
                                  f'batched call failed: {e}')
    for task in tasks:
      task.finish()

  def _padded_size(self, rows):
    for size in self.options.allowed_batch_sizes:
      if size >= rows:
        return size
    return rows

  def stop(self):
    """Runs what is queued, then stops the batch threads."""
    with self._lock:
      self._stopping = True
      for signature in list(self._open):
        self._close(signature)
      self._lock.notify_all()
    for thread in self._threads:
      thread.join()


def _rows(inputs):
  """The common leading dimension of the inputs, or None if they differ."""
  rows = None
  for value in inputs.values():
    if value.ndim == 0 or (rows is not None and value.shape[0] != rows):
      return None
    rows = value.shape[0]
  return rows


def _pad(value, size):
  """Pads a batch to an allowed size by repeating its first row."""
  extra = np.repeat(value[:1], size - value.shape[0], axis=0)
  return np.concatenate([value, extra])
