"""Trains every model type on one preprocessed run and tabulates eval quality.

  python -m estimators.quality examples/census.yaml [--set key=value ...]
      [--types linear,wide_deep] [--trainers estimator,keras_fit]
      [--output quality.json]

Each model type trains with the config's `train:` settings in its own
scratch run directory, RUN_DIR/quality/<type>, that links to RUN_DIR's
transform and data (RUN_DIR must be preprocessed). Prints accuracy and AUC
(RMSE and MAE for regression) per type. With `--trainers`, each Keras type also trains with each listed
`train.trainer` (the premade and `model_fn` types train as Estimators only),
so the Estimator and the native trainers are compared on the same data and
steps.
"""

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import time

from pipeline.config import load_config
from pipeline.errors import ConfigError, UserError
from pipeline.rundir import RunDir

ALL_TYPES = ('baseline', 'linear', 'dnn', 'wide_deep', 'custom',
             'keras:sequential', 'keras:functional', 'keras:subclassed')


def scratch_run(config, run_dir, kind, trainer='estimator'):
  """A copy of `config` training `kind` (type or keras:style) in run_dir.

  run_dir is made afresh (an old one is removed) with links to the
  transform, data and preprocess.json of config's preprocessed run; the
  copy exports nothing. Also used by benchmarks/bench_training.py.
  """
  model_type, _, style = kind.partition(':')
  derived = copy.deepcopy(config)
  shutil.rmtree(run_dir, ignore_errors=True)
  os.makedirs(run_dir)
  source, target = config.rundir, RunDir(run_dir)
  for path in ('transform', 'data', 'preprocess_summary'):
    os.symlink(os.path.abspath(getattr(source, path)), getattr(target, path))
  derived.run_dir = run_dir
  derived.model.type = model_type
  if style:
    derived.model.keras_style = style
  derived.export.exporters = []
  derived.train.trainer = trainer
  return derived


def scratch_config(config, kind, trainer='estimator'):
  """`config` training `kind` (type or keras:style) with `trainer` in
  RUN_DIR/quality/."""
  name = kind.replace(':', '-')
  if trainer != 'estimator':
    name = f'{name}-{trainer}'
  derived = scratch_run(config, config.rundir.path('quality', name), kind,
                        trainer)
  derived.validate(check_columns=False)
  return derived


def runs(kinds, trainers):
  """(kind, trainer) pairs: native trainers train Keras types only."""
  return [(kind, trainer) for kind in kinds for trainer in trainers
          if trainer == 'estimator' or kind.startswith('keras')]


def train_one(config):
  """Trains a scratch config with its trainer; returns metrics.json's record."""
  # pylint: disable=g-import-not-at-top
  if config.train.trainer == 'estimator':
    from estimators import train
    return train.train(config)
  if config.train.trainer == 'keras_fit':
    from estimators import native
    return native.train(config)
  from estimators import custom_loop
  return custom_loop.train(config)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('config')
  parser.add_argument('--set', dest='overrides', action='append', default=[])
  parser.add_argument('--types', default=','.join(ALL_TYPES))
  parser.add_argument('--trainers', default='estimator',
                      help='comma-separated train.trainer values')
  parser.add_argument('--output')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s',
                      datefmt='%H:%M:%S')
  logging.getLogger('estpipe').setLevel(logging.INFO)
  from estimators import train  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel('ERROR')
  try:
    config = load_config(args.config, args.overrides)
    train.load_tft_output(config)  # fails early when not preprocessed
    rows = {}
    for kind, trainer in runs(args.types.split(','),
                              args.trainers.split(',')):
      start = time.time()
      record = train_one(scratch_config(config, kind, trainer))
      name = kind if trainer == 'estimator' else f'{kind} {trainer}'
      rows[name] = dict(record['metrics'],
                        seconds=round(time.time() - start))
      tf.keras.backend.clear_session()
  except (ConfigError, UserError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  keys = (('rmse', 'mae') if config.label.task == 'regression' else
          ('accuracy', 'auc'))
  print(f'{"model":28s} ' + ' '.join(f'{k:>9s}' for k in keys) +
        '    steps  seconds')
  for kind, metrics in rows.items():
    print(f'{kind:28s} ' + ' '.join(f'{metrics[k]:9.4f}' for k in keys) +
          f' {metrics["global_step"]:8d} {metrics["seconds"]:8d}')
  if args.output:
    with open(args.output, 'w') as f:
      json.dump({'config': os.path.abspath(args.config),
                 'overrides': args.overrides,
                 'trainers': args.trainers.split(','), 'results': rows}, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
