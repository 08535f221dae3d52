"""Where a version's load time goes, and what warmup does to first requests.

  .venv/bin/python benchmarks/bench_load.py RUN_DIR/export/VERSION [--runs 2]

Each run is a fresh process (nothing cached from an earlier load) that loads
the export as the model server does (serving.models.ServableVersion: a TF1
Session filled by SavedModelLoader.load, one Session.make_callable per
signature), with the phases timed separately: reading the MetaGraph
(estpipe's own copy for metadata, and TF's parses of saved_model.pb), graph
import, restoring variables, the init op (the tf.Transform vocabulary
tables), and make_callable per signature. Then either the export's warmup
file is replayed (`warmup`) or not (`cold`), and each warmup request is sent
once (the first call of its signature) and 20 more times (steady state,
median). Results go to benchmarks/results/load.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'benchmarks', 'results', 'load.json')


def _timed(owner, name, phases, label):
  original = getattr(owner, name)

  def wrapper(*args, **kwargs):
    started = time.perf_counter()
    try:
      return original(*args, **kwargs)
    finally:
      phases[label] = phases.get(label, 0.0) + time.perf_counter() - started
  setattr(owner, name, wrapper)


def measure(path, mode):
  """One load of `path` in this process; returns its figures."""
  started = time.perf_counter()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  from tensorflow.python.client import session as session_lib
  from tensorflow.python.saved_model import loader_impl
  from serving import models, warmup
  # pylint: enable=g-import-not-at-top,g-direct-tensorflow-import
  imports = time.perf_counter() - started
  phases = {}
  loader = loader_impl.SavedModelLoader
  _timed(models, '_read_meta_graph', phases, 'read MetaGraph (estpipe)')
  # SavedModelLoader parses saved_model.pb twice: in __init__ and in load.
  _timed(loader_impl, 'parse_saved_model', phases, 'read MetaGraph (TF, x2)')
  _timed(loader, 'load_graph', phases, 'graph import')
  _timed(loader, 'restore_variables', phases, 'restore variables')
  _timed(loader, 'run_init_ops', phases, 'init op (tables)')
  make_callable = {}  # signature key -> seconds
  building = []  # the key of the Signature being built
  original_init = models.Signature.__init__
  original_make_callable = session_lib.BaseSession.make_callable

  def signature_init(self, key, *args, **kwargs):
    building.append(key)
    try:
      original_init(self, key, *args, **kwargs)
    finally:
      building.pop()

  def timed_make_callable(self, *args, **kwargs):
    started = time.perf_counter()
    try:
      return original_make_callable(self, *args, **kwargs)
    finally:
      key = building[-1] if building else 'other'
      make_callable[key] = (make_callable.get(key, 0.0) +
                            time.perf_counter() - started)
  models.Signature.__init__ = signature_init
  session_lib.BaseSession.make_callable = timed_make_callable
  started = time.perf_counter()
  servable = models.ServableVersion('m', 1, path)
  load = time.perf_counter() - started
  phases[f'make_callable ({len(make_callable)} signatures)'] = sum(
      make_callable.values())
  phases['other'] = load - sum(phases.values())
  logs = warmup.read(os.path.join(path, warmup.WARMUP_FILE))
  replay = None
  if mode == 'warmup':
    started = time.perf_counter()
    warmup.replay(servable)
    replay = time.perf_counter() - started
  first, steady = {}, {}
  for prediction_log in logs:
    kind = prediction_log.WhichOneof('log_type')
    request = getattr(prediction_log, kind).request
    key = request.model_spec.signature_name
    call = warmup._REPLAY[kind]  # pylint: disable=protected-access
    started = time.perf_counter()
    call(servable, request)
    first[key] = time.perf_counter() - started
    times = []
    for _ in range(20):
      started = time.perf_counter()
      call(servable, request)
      times.append(time.perf_counter() - started)
    steady[key] = statistics.median(times)
  del tf
  return {'mode': mode, 'imports_s': imports, 'load_s': load,
          'phases_s': phases, 'make_callable_s': make_callable,
          'warmup_replay_s': replay,
          'first_request_s': first, 'steady_request_s': steady}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('export')
  parser.add_argument('--runs', type=int, default=2)
  parser.add_argument('--child', choices=('cold', 'warmup'))
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.export, args.child)))
    return
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3')
  results = []
  for run in range(args.runs):
    for mode in ('cold', 'warmup'):
      out = subprocess.run(
          [sys.executable, __file__, args.export, '--child', mode],
          env=env, check=True, capture_output=True, text=True).stdout
      result = json.loads(out.strip().splitlines()[-1])
      result['run'] = run + 1
      results.append(result)
      phases = ', '.join(f'{k} {v:.2f}' for k, v in
                         result['phases_s'].items())
      firsts = ', '.join(f'{k} {v * 1000:.0f}' for k, v in
                         result['first_request_s'].items())
      steadies = ', '.join(f'{k} {v * 1000:.1f}' for k, v in
                           result['steady_request_s'].items())
      print(f'run {run + 1} {mode}: load {result["load_s"]:.2f}s ({phases});'
            f' warmup {result["warmup_replay_s"] or 0:.2f}s; first ms: '
            f'{firsts}; steady ms: {steadies}', flush=True)
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, 'w') as f:
    json.dump({'export': args.export, 'loadavg_before': os.getloadavg(),
               'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
