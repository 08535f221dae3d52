"""Model server latency and throughput, against the in-process floor.

  python benchmarks/bench_serving.py [--model_base_path DIR --signature S
                                      --requests 2000 --seconds 5]

Without --model_base_path it trains the tests' tiny LinearClassifier (numeric +
categorical feature; serving/tiny_models.py) and serves its per-feature
'raw:predict' signature.
It measures, in one run:
  * the floor: one-row calls of the loaded signature in this process;
  * one-row predict latency p50/p99 over REST (keep-alive) and gRPC;
  * throughput at 1, 8 and 32 concurrent clients, batching off and on.
The server runs as `estpipe serve` in a subprocess (as in production) so
that client and server don't share a GIL.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# pylint: disable=g-import-not-at-top,wrong-import-position
import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
# pylint: enable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = {'x': 0.3, 'c': 'b'}


def tiny_model(work_dir):
  """The tests' tiny LinearClassifier, exported as version 1; returns its
  base path."""
  # pylint: disable-next=g-import-not-at-top
  from serving import tiny_models
  exported = tiny_models.train_and_export('classifier', work_dir)
  base = os.path.join(work_dir, 'served')
  os.makedirs(base)
  os.rename(exported, os.path.join(base, '1'))
  return base


def percentiles(samples):
  ms = np.array(samples) * 1e3
  return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def time_calls(fn, count):
  for _ in range(min(50, count)):
    fn()
  samples = []
  for _ in range(count):
    start = time.perf_counter()
    fn()
    samples.append(time.perf_counter() - start)
  return percentiles(samples)


def in_process(base, signature, count):
  """The floor: the loaded signature, called in this process."""
  # pylint: disable-next=g-import-not-at-top
  from serving.models import ServableVersion
  version = sorted(os.listdir(base), key=int)[-1]
  loaded = tf.saved_model.load(os.path.join(base, version))
  fn = loaded.signatures[signature]
  public = time_calls(lambda: fn(x=tf.constant([ROW['x']]),
                                 c=tf.constant([ROW['c']])), count)
  served = ServableVersion('m', int(version), os.path.join(base, version))
  sig = served.signatures[signature]
  inputs = {'x': np.array([ROW['x']], np.float32),
            'c': np.array([ROW['c'].encode()], object)}
  internal = time_calls(lambda: sig.call(inputs), count)
  return public, internal


class RestClient:
  """A keep-alive HTTP/1.1 client sending a prepared request on a raw socket.

  Like wrk, it spends as little CPU as possible per request, so that on a
  small machine the figures measure the server rather than the client.
  """

  def __init__(self, port, model, signature):
    body = json.dumps({'signature_name': signature,
                       'instances': [ROW]}).encode()
    self.request = (f'POST /v1/models/{model}:predict HTTP/1.1\r\n'
                    f'Host: 127.0.0.1:{port}\r\n'
                    'Content-Type: application/json\r\n'
                    f'Content-Length: {len(body)}\r\n\r\n').encode() + body
    self.sock = socket.create_connection(('127.0.0.1', port))
    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    self.buffer = b''

  def __call__(self):
    self.sock.sendall(self.request)
    while b'\r\n\r\n' not in self.buffer:
      self._recv()
    head, self.buffer = self.buffer.split(b'\r\n\r\n', 1)
    length = int(head.lower().split(b'content-length:', 1)[1]
                 .split(b'\r\n', 1)[0])
    while len(self.buffer) < length:
      self._recv()
    body, self.buffer = self.buffer[:length], self.buffer[length:]
    if not head.startswith(b'HTTP/1.1 200'):
      raise RuntimeError(body.decode())

  def _recv(self):
    chunk = self.sock.recv(65536)
    if not chunk:
      raise RuntimeError('the server closed the connection')
    self.buffer += chunk


class GrpcClient:

  def __init__(self, port, model, signature):
    self.channel = grpc.insecure_channel(f'127.0.0.1:{port}')
    self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
    self.request = predict_pb2.PredictRequest()
    self.request.model_spec.name = model
    self.request.model_spec.signature_name = signature
    self.request.inputs['x'].CopyFrom(tf.make_tensor_proto([ROW['x']]))
    self.request.inputs['c'].CopyFrom(tf.make_tensor_proto([ROW['c']]))

  def __call__(self):
    self.stub.Predict(self.request, timeout=30)


def cpu_seconds(pid):
  """User + system CPU time of a process so far."""
  with open(f'/proc/{pid}/stat') as f:
    fields = f.read().rsplit(')', 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def throughput(make_client, clients, seconds):
  """Requests per second with `clients` closed-loop clients."""
  stop = threading.Event()
  counts = [0] * clients
  errors = []
  ready = threading.Barrier(clients + 1)

  def loop(i):
    client = make_client()
    client()
    ready.wait()
    while not stop.is_set():
      try:
        client()
      except Exception as e:  # pylint: disable=broad-except
        errors.append(repr(e))
        return
      counts[i] += 1

  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    futures = [pool.submit(loop, i) for i in range(clients)]
    ready.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - start
    for future in futures:
      future.result()
  if errors:
    raise RuntimeError(f'{len(errors)} failed requests: {errors[0]}')
  return sum(counts) / elapsed


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_server(base, batching_file, extra_flags=()):
  grpc_port, rest_port = free_port(), free_port()
  command = [sys.executable, '-m', 'pipeline.cli', 'serve',
             '--model_name=m', f'--model_base_path={base}',
             f'--port={grpc_port}', f'--rest_api_port={rest_port}',
             '--file_system_poll_wait_seconds=0', *extra_flags]
  if batching_file:
    command += ['--enable_batching',
                f'--batching_parameters_file={batching_file}']
  env = dict(os.environ, PYTHONPATH=ROOT)
  process = subprocess.Popen(command, cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 180
  while time.monotonic() < deadline:
    try:
      conn = http.client.HTTPConnection('127.0.0.1', rest_port, timeout=2)
      conn.request('GET', '/v1/models/m')
      if conn.getresponse().status == 200:
        return process, grpc_port, rest_port
    except OSError:
      pass
    if process.poll() is not None:
      raise RuntimeError('the server exited at start')
    time.sleep(0.2)
  process.kill()
  raise RuntimeError('the server did not start')


def stop_server(process):
  process.send_signal(signal.SIGTERM)
  process.wait(timeout=60)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model_base_path')
  parser.add_argument('--signature', default='raw:predict')
  parser.add_argument('--requests', type=int, default=2000,
                      help='timed one-row requests per latency figure')
  parser.add_argument('--seconds', type=float, default=5,
                      help='duration of each throughput run')
  parser.add_argument('--max_batch_size', type=int, default=32)
  parser.add_argument('--batch_timeout_micros', type=int, default=2000)
  parser.add_argument('--num_batch_threads', type=int, default=1)
  parser.add_argument('--tf_threads', type=int, default=1,
                      help='--tensorflow_{intra,inter}_op_parallelism for the '
                      'server (0: TensorFlow default)')
  parser.add_argument('--json', help='also write the figures here')
  args = parser.parse_args(argv)

  work = tempfile.mkdtemp(prefix='bench_serving_')
  try:
    base = args.model_base_path or tiny_model(work)
    results = {'cpus': os.cpu_count()}
    public, internal = in_process(base, args.signature, args.requests)
    results['in_process_ms'] = {'signature_call': public,
                                'server_call_path': internal}
    print(f'in process, loaded signature   p50 {public[0]:.3f} ms  '
          f'p99 {public[1]:.3f} ms')
    print(f'in process, server call path   p50 {internal[0]:.3f} ms  '
          f'p99 {internal[1]:.3f} ms')
    batching_file = os.path.join(work, 'batching.txt')
    with open(batching_file, 'w') as f:
      f.write(f'max_batch_size {{ value: {args.max_batch_size} }}\n'
              f'batch_timeout_micros {{ value: {args.batch_timeout_micros} }}\n'
              f'num_batch_threads {{ value: {args.num_batch_threads} }}\n')
    for mode, batching in (('off', None), ('on', batching_file)):
      process, grpc_port, rest_port = start_server(base, batching, [
          f'--tensorflow_intra_op_parallelism={args.tf_threads}',
          f'--tensorflow_inter_op_parallelism={args.tf_threads}'])
      try:
        clients = {
            'rest': lambda p=rest_port: RestClient(p, 'm', args.signature),
            'grpc': lambda p=grpc_port: GrpcClient(p, 'm', args.signature)}
        if batching is None:
          for name, make in clients.items():
            p50, p99 = time_calls(make(), args.requests)
            results[f'{name}_latency_ms'] = (p50, p99)
            print(f'{name:4s} one-row latency          p50 {p50:.3f} ms  '
                  f'p99 {p99:.3f} ms  (p50 {p50 - public[0]:+.3f} ms vs in '
                  'process)')
        for name, make in clients.items():
          for count in (1, 8, 32):
            cpu = cpu_seconds(process.pid)
            rps = throughput(make, count, args.seconds)
            server_us = ((cpu_seconds(process.pid) - cpu) /
                         (rps * args.seconds) * 1e6)
            results[f'{name}_rps_batching_{mode}_{count}'] = rps
            print(f'{name:4s} batching {mode:3s} {count:2d} clients  '
                  f'{rps:8.0f} requests/s  (server CPU ~{server_us:.0f} '
                  'us/request)')
      finally:
        stop_server(process)
    for name in ('rest', 'grpc'):
      ratio = (results[f'{name}_rps_batching_on_32'] /
               results[f'{name}_rps_batching_off_32'])
      results[f'{name}_batching_speedup_32'] = ratio
      print(f'{name:4s} batching speed-up at 32 clients: {ratio:.2f}x')
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(results, f, indent=2)
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
