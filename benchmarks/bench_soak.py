"""Model server memory under sustained load: does RSS stay flat?

  python benchmarks/bench_soak.py [--model_base_path DIR --signature S
                                   --clients 32 --seconds 60
                                   --batching off,on]

Starts `estpipe serve` on 127.0.0.1 in a subprocess (once per batching
mode), drives `--clients` concurrent keep-alive REST clients with one-row
predict requests for `--seconds`, and samples the server's resident memory
(VmRSS from /proc) every few seconds. It reports RSS after warm-up, at 10 s
and at the end, and the growth per 1,000 requests between 10 s and the end
(the first seconds hold one-off allocations: caches, thread stacks, arenas),
as one JSON line per mode and a table. A leak shows as a growth per 1k
requests that stays the same however long the run; a flat server's is near
zero and shrinks as the run gets longer.

Without --model_base_path it trains the tests' tiny LinearClassifier
(serving/tiny_models.py) and serves its per-feature 'raw:predict' signature.
Linux only (/proc).
"""

import argparse
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = {'x': 0.3, 'c': 'b'}


def tiny_model(work_dir):
  """The tests' tiny LinearClassifier as version 1; returns its base path."""
  sys.path.insert(0, ROOT)
  # pylint: disable-next=g-import-not-at-top
  from serving import tiny_models
  exported = tiny_models.train_and_export('classifier',
                                          os.path.join(work_dir, 'train'))
  base = os.path.join(work_dir, 'served')
  os.makedirs(base)
  os.rename(exported, os.path.join(base, '1'))
  return base


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def rss_bytes(pid):
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f'no VmRSS for {pid}')


def start_server(base, port, batching, extra_flags):
  env = dict(os.environ, PYTHONPATH=ROOT)
  flags = [sys.executable, '-m', 'pipeline.cli', 'serve', '--model_name=m',
           f'--model_base_path={base}', '--port=0',
           f'--rest_api_port={port}', '--file_system_poll_wait_seconds=0',
           f'--enable_batching={"true" if batching else "false"}',
           *extra_flags]
  process = subprocess.Popen(flags, cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 180
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f'server exited with {process.returncode}')
    try:
      connection = http.client.HTTPConnection('127.0.0.1', port, timeout=5)
      connection.request('GET', '/v1/models/m')
      if connection.getresponse().status == 200:
        connection.close()
        return process
    except OSError:
      pass
    time.sleep(0.2)
  process.kill()
  raise RuntimeError('server did not start')


class Load:
  """`clients` threads posting one-row predicts until stopped."""

  def __init__(self, port, signature, clients):
    self.body = json.dumps({'signature_name': signature,
                            'instances': [ROW]}).encode()
    self.port = port
    self.count = 0
    self.errors = 0
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._threads = [threading.Thread(target=self._client, daemon=True)
                     for _ in range(clients)]

  def start(self):
    for thread in self._threads:
      thread.start()

  def stop(self):
    self._stop.set()
    for thread in self._threads:
      thread.join(30)

  def _client(self):
    connection = None
    headers = {'Content-Type': 'application/json'}
    while not self._stop.is_set():
      try:
        if connection is None:
          connection = http.client.HTTPConnection('127.0.0.1', self.port,
                                                  timeout=30)
        connection.request('POST', '/v1/models/m:predict', self.body,
                           headers)
        response = connection.getresponse()
        response.read()
        ok = response.status == 200
      except (OSError, http.client.HTTPException):
        ok = False
        connection = None
      with self._lock:
        if ok:
          self.count += 1
        else:
          self.errors += 1


def soak(base, signature, clients, seconds, batching, extra_flags,
         sample_every=5.0, warmup=3.0):
  port = free_port()
  process = start_server(base, port, batching, extra_flags)
  try:
    load = Load(port, signature, clients)
    load.start()
    time.sleep(warmup)
    start, start_count = time.monotonic(), load.count
    samples = [(0.0, 0, rss_bytes(process.pid))]
    at_10 = None
    next_sample = sample_every
    while True:
      elapsed = time.monotonic() - start
      if elapsed >= seconds:
        break
      if at_10 is None and elapsed >= 10:
        at_10 = (elapsed, load.count - start_count, rss_bytes(process.pid))
        samples.append(at_10)
      if elapsed >= next_sample:
        samples.append((elapsed, load.count - start_count,
                        rss_bytes(process.pid)))
        next_sample += sample_every
      time.sleep(0.1)
    end = (time.monotonic() - start, load.count - start_count,
           rss_bytes(process.pid))
    samples.append(end)
    load.stop()
  finally:
    process.send_signal(signal.SIGTERM)
    try:
      process.wait(60)
    except subprocess.TimeoutExpired:
      process.kill()
  at_10 = at_10 or samples[0]
  requests = end[1] - at_10[1]
  growth = end[2] - at_10[2]
  return {
      'batching': batching, 'clients': clients, 'seconds': round(end[0], 1),
      'requests': end[1], 'errors': load.errors,
      'requests_per_s': round(end[1] / end[0], 1),
      'rss_start_mb': round(samples[0][2] / 2**20, 1),
      'rss_10s_mb': round(at_10[2] / 2**20, 1),
      'rss_end_mb': round(end[2] / 2**20, 1),
      'growth_kb_per_1k_requests_after_10s': round(
          growth / 1024 / max(requests, 1) * 1000, 1),
      'samples': [(round(t, 1), n, round(rss / 2**20, 1))
                  for t, n, rss in sorted(set(samples))],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model_base_path', default=None)
  parser.add_argument('--signature', default='raw:predict')
  parser.add_argument('--clients', type=int, default=32)
  parser.add_argument('--seconds', type=float, default=60)
  parser.add_argument('--batching', default='off,on',
                      help='modes to run, comma-separated: off, on')
  parser.add_argument('--server_flag', action='append', default=[],
                      help='extra `estpipe serve` flag (repeatable)')
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix='bench_soak_')
  try:
    base = args.model_base_path or tiny_model(work)
    results = []
    for mode in args.batching.split(','):
      result = soak(base, args.signature, args.clients, args.seconds,
                    mode.strip() == 'on', args.server_flag)
      print(json.dumps(result), flush=True)
      results.append(result)
    print(f'\n{"batching":>8} {"requests":>9} {"req/s":>7} {"RSS 0s":>8} '
          f'{"RSS 10s":>8} {"RSS end":>8} {"KB/1k req after 10s":>20}')
    for r in results:
      print(f'{"on" if r["batching"] else "off":>8} {r["requests"]:>9} '
            f'{r["requests_per_s"]:>7} {r["rss_start_mb"]:>7}M '
            f'{r["rss_10s_mb"]:>7}M {r["rss_end_mb"]:>7}M '
            f'{r["growth_kb_per_1k_requests_after_10s"]:>20}')
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
