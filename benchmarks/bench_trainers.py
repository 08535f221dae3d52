"""Training throughput of the three trainers on one Keras model.

Trains the same `model.type: keras` model (functional by default) with
`train.trainer` estimator (model_to_estimator), keras_fit and custom_loop on
one preprocessed run, in alternating rounds, each in a fresh process so no
trainer inherits another's graph or threads, and reports examples/sec and
each native trainer's ratio to the Estimator's.

  python benchmarks/bench_trainers.py examples/census.yaml \\
      --set run_dir=/path/to/preprocessed/census [--steps 2000] [--rounds 3]

Every trainer prints the same progress lines (estimators/trainlib.py
ProgressLines: steps times batch size over the wall time since the last
line), so they are measured with one yardstick: the median of a run's
rates, without the first (tracing, warm-up) and without any that spans an
evaluation (training evaluates once, at the end: save_checkpoints_steps is
the step target). Exports are off; the final save and evaluation are not
timed.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINERS = ('estimator', 'keras_fit', 'custom_loop')
_RATE = re.compile(r'step (\d+) loss \S+ examples/sec (\d+)(.*)')


def train_once(config, overrides, kind, trainer, steps, run_dir):
  """One training run in its own process; returns its progress-line rates."""
  code = (
      'import logging, sys\n'
      'from estimators import quality\n'
      'from pipeline.config import load_config\n'
      'from pipeline import quiet\n'
      'logging.basicConfig(level=logging.INFO, format="%(message)s")\n'
      'quiet.quiet_tensorflow(False)\n'
      'logging.getLogger("estpipe").setLevel(logging.INFO)\n'
      'config = load_config(sys.argv[1], sys.argv[5:])\n'
      'scratch = quality.scratch_run(config, sys.argv[4], sys.argv[2], '
      'sys.argv[3])\n'
      'scratch.validate(check_columns=False)\n'
      'quality.train_one(scratch)\n')
  settings = [f'train.steps={steps}', f'train.save_checkpoints_steps={steps}',
              'train.eval_steps=2', f'train.log_step_count_steps={steps // 20}']
  result = subprocess.run(
      [sys.executable, '-c', code, config, kind, trainer, run_dir,
       *overrides, *[f'{s}' for s in settings]],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2'))
  if result.returncode:
    sys.exit(f'{trainer} failed:\n{result.stderr[-3000:]}')
  rates = [(int(m.group(1)), int(m.group(2)), 'eval@' in m.group(3))
           for m in map(_RATE.search, result.stderr.splitlines()) if m]
  return [rate for _, rate, evaluated in rates[1:] if not evaluated]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('config')
  parser.add_argument('--set', dest='overrides', action='append', default=[])
  parser.add_argument('--model', default='keras:functional',
                      help='type or keras:style (default %(default)s)')
  parser.add_argument('--trainers', default=','.join(TRAINERS))
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--output')
  args = parser.parse_args(argv)
  trainers = args.trainers.split(',')
  rates = {t: [] for t in trainers}
  with tempfile.TemporaryDirectory() as scratch:
    for round_ in range(args.rounds):
      # Alternating order: no trainer always runs first on a cold cache.
      order = trainers if round_ % 2 == 0 else trainers[::-1]
      for trainer in order:
        run = train_once(args.config, args.overrides, args.model, trainer,
                         args.steps, os.path.join(scratch, trainer))
        rates[trainer].append(statistics.median(run))
        print(f'round {round_ + 1} {trainer}: {rates[trainer][-1]:.0f} '
              'examples/sec', flush=True)
  base = statistics.median(rates[trainers[0]])
  print(f'\n{"trainer":12s} {"median ex/s":>12s} {"range":>17s} '
        f'{"vs " + trainers[0]:>16s}')
  summary = {}
  for trainer in trainers:
    median = statistics.median(rates[trainer])
    summary[trainer] = {'median': median, 'runs': rates[trainer],
                        'ratio': median / base}
    print(f'{trainer:12s} {median:12,.0f} '
          f'{min(rates[trainer]):8,.0f}-{max(rates[trainer]):<8,.0f} '
          f'{median / base:16.2f}')
  if args.output:
    with open(args.output, 'w') as f:
      json.dump({'model': args.model, 'steps': args.steps,
                 'overrides': args.overrides, 'results': summary}, f,
                indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
