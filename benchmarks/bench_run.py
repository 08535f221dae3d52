"""`estpipe run` end to end: the time of each stage, then of a skipped re-run.

  python benchmarks/bench_run.py                      # Census, 1000 steps
  python benchmarks/bench_run.py CONFIG --steps 500 --run_dir DIR

Each run is a fresh `estpipe run` process on a new run directory (unless
--run_dir names one); per-stage times come from its RUN_DIR/run.json, the
wall time includes starting Python and importing TensorFlow. The second run
changes nothing, so it should skip every stage: its time is the price of
the checks (input hashes, completeness). Results go to
benchmarks/results/run.json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def estpipe_run(config, run_dir, steps):
  """One `estpipe run` in its own process: (wall seconds, run.json)."""
  command = [sys.executable, '-m', 'pipeline.cli', 'run', config,
             '--set', f'run_dir={run_dir}', '--set', f'train.steps={steps}']
  env = dict(os.environ, PYTHONPATH=ROOT)
  start = time.perf_counter()
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                        text=True)
  wall = time.perf_counter() - start
  if proc.returncode:
    sys.exit(f'estpipe run failed:\n{proc.stderr[-3000:]}')
  with open(os.path.join(run_dir, 'run.json')) as f:
    return wall, json.load(f)


def summary(wall, record):
  return {'wall_s': round(wall, 1),
          'stages': {s['name']: {'status': s['status'],
                                 'seconds': s.get('duration_s')}
                     for s in record['stages']},
          'export_version': record.get('export_version'),
          'metrics': {k: record.get('metrics', {}).get(k)
                      for k in ('accuracy', 'auc')}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('config', nargs='?',
                      default=os.path.join(ROOT, 'examples', 'census.yaml'))
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--run_dir', default=None,
                      help='default: a new temporary folder, removed after')
  parser.add_argument('--output',
                      default=os.path.join(ROOT, 'benchmarks', 'results',
                                           'run.json'))
  args = parser.parse_args()
  run_dir = args.run_dir or tempfile.mkdtemp(prefix='bench_run_')
  try:
    first = summary(*estpipe_run(args.config, run_dir, args.steps))
    again = summary(*estpipe_run(args.config, run_dir, args.steps))
  finally:
    if not args.run_dir:
      shutil.rmtree(run_dir, ignore_errors=True)
  result = {'config': args.config, 'steps': args.steps, 'first_run': first,
            'rerun': again, 'cpus': os.cpu_count(),
            'load_average': os.getloadavg()}
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
