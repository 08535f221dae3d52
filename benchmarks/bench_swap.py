"""Latency across a version swap, with and without warmup.

  .venv/bin/python benchmarks/bench_swap.py RUN_DIR/export/VERSION cold|warmup

Serves a copy of the export as version 1 (gRPC only, polling every 0.5 s),
with one client thread per signature of its warmup file sending that
request in a loop; once every client has had its first answer (not
recorded: version 1's own first calls), waits 5 s, publishes version 2
(copy, then rename) and runs until 8 s after version 2 first answers.
Prints one JSON line: the time from publishing to version 2 answering, the
median latency before, the slowest request after publishing, how many took
over 500 ms, and the eight slowest answers from version 2. `cold` turns
warmup off.
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving import grpc_service, warmup
from serving.server import ModelServer, ServerOptions
from serving.versions import ModelConfig


def main(source, mode):
  base = tempfile.mkdtemp(prefix=f'bench_swap_{mode}_')
  shutil.copytree(source, os.path.join(base, '1'))
  requests = {}
  for prediction_log in warmup.read(os.path.join(source, warmup.WARMUP_FILE)):
    kind = prediction_log.WhichOneof('log_type')
    request = getattr(prediction_log, kind).request
    request.model_spec.name = 'model'
    requests[request.model_spec.signature_name] = (kind, request)
  server = ModelServer(ServerOptions(
      models=[ModelConfig('model', base)], grpc_port=0, rest_port=None,
      poll_wait_seconds=0.5, model_warmup=mode == 'warmup'),
                       (grpc_service.start,)).start()
  channel = grpc.insecure_channel(f'127.0.0.1:{server.grpc_port}')
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  stop = threading.Event()
  answers = []  # (time, seconds, version)
  # Each client's first call, unrecorded: without warmup, version 1's first
  # calls wait for the Session to build each signature's executor (~1 s
  # each alone, several together on 2 cores), which is not the swap.
  ready = threading.Barrier(len(requests) + 1)

  def client(kind, request):
    call = {'classify_log': stub.Classify, 'regress_log': stub.Regress,
            'predict_log': stub.Predict}[kind]
    call(request, timeout=300)
    ready.wait()
    while not stop.is_set():
      started = time.perf_counter()
      response = call(request, timeout=300)
      answers.append((time.time(), time.perf_counter() - started,
                      response.model_spec.version.value))

  threads = [threading.Thread(target=client, args=value, daemon=True)
             for value in requests.values()]
  for thread in threads:
    thread.start()
  ready.wait()
  time.sleep(5)
  staged = os.path.join(base, 'temp-2')
  shutil.copytree(source, staged)
  published = time.time()
  os.rename(staged, os.path.join(base, '2'))
  while not any(v == 2 for *_, v in answers[-50:]):
    assert all(t.is_alive() for t in threads), 'a client failed'
    time.sleep(0.2)
  first_v2 = min(t for t, _, v in answers if v == 2)
  time.sleep(8)
  stop.set()
  for thread in threads:
    thread.join()
  channel.close()
  server.stop(grace=5)
  shutil.rmtree(base)
  after = [s for t, s, _ in answers if t >= published]
  print(json.dumps({
      'mode': mode, 'publish_to_v2_s': round(first_v2 - published, 1),
      'median_before_ms': round(1000 * statistics.median(
          s for t, s, _ in answers if t < published), 1),
      'slowest_after_publish_ms': round(1000 * max(after)),
      'over_500ms_after_publish': sum(s > 0.5 for s in after),
      'slowest_v2_ms': [round(1000 * s) for s in sorted(
          s for _, s, v in answers if v == 2)[-8:]],
      'loadavg': [round(x, 1) for x in os.getloadavg()]}))


if __name__ == '__main__':
  main(*sys.argv[1:3])
