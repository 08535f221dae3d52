"""Training throughput: the Estimator path against Keras `fit`.

For `dnn` and `wide_deep` on a preprocessed run (transformed Census by
default), trains the configured Estimator and, in the same process on the
same tf.data input (same files, batch size and batch-then-parse pipeline),
the same architecture as a Keras model with `fit`, and reports examples per
second of each and their ratio (target: Estimator >= 0.9x Keras fit).

  python benchmarks/bench_training.py examples/census.yaml \
      --set run_dir=/path/to/preprocessed/census [--steps 2000]

Steps after `--warmup` are timed, from the end of the first timed step to
the end of the last, so graph building, tracing and the final checkpoint are
not counted. The Estimator keeps its configured summaries and progress hook:
this is the throughput `estpipe train` gets.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from estimators import features as features_lib  # pylint: disable=g-import-not-at-top
from estimators import inputs  # pylint: disable=g-import-not-at-top
from estimators import keras_models  # pylint: disable=g-import-not-at-top
from estimators import models  # pylint: disable=g-import-not-at-top
from estimators import quality  # pylint: disable=g-import-not-at-top
from estimators import train as train_lib  # pylint: disable=g-import-not-at-top
from pipeline.config import load_config  # pylint: disable=g-import-not-at-top


class _StepTimer(tf.estimator.SessionRunHook):
  """Wall time between the end of step `warmup` and the last step."""

  def __init__(self, warmup):
    self.warmup = warmup
    self.steps = 0
    self.t_start = None
    self.t_end = None

  def after_run(self, run_context, run_values):
    self.steps += 1
    if self.steps == self.warmup:
      self.t_start = time.perf_counter()
    self.t_end = time.perf_counter()


class _BatchTimer(tf.keras.callbacks.Callback):

  def __init__(self, warmup):
    super().__init__()
    self.warmup = warmup
    self.steps = 0
    self.t_start = None
    self.t_end = None

  def on_train_batch_end(self, batch, logs=None):
    self.steps += 1
    if self.steps == self.warmup:
      self.t_start = time.perf_counter()
    self.t_end = time.perf_counter()


def _run_copy(config, model_type, work):
  """The config training `model_type` in a scratch run dir over the data."""
  config = quality.scratch_run(config, os.path.join(work, model_type),
                               model_type)
  config.train.warm_start_from = None
  config.train.save_checkpoints_steps = 10 ** 9  # only the final one
  return config


def estimator_rate(config, steps, warmup):
  tft_output = train_lib.load_tft_output(config)
  estimator = train_lib.build_estimator(config, tft_output=tft_output)
  input_fn = inputs.make_input_fn(config, tft_output, 'train', True,
                                  models.label_format(config))
  timer = _StepTimer(warmup)
  estimator.train(input_fn, max_steps=warmup + steps, hooks=[timer])
  timed = timer.steps - timer.warmup
  return timed * config.train.batch_size / (timer.t_end - timer.t_start)


def keras_model(config, columns):
  """dnn / wide_deep as a functional Keras model over the same columns.

  The wide part is a linear model over the wide columns: one weight per id
  (a 1-wide embedding summed, as the canned linear model does) plus the
  numeric columns; the deep part is the canned DNN's tower.
  """
  spec = columns.feature_spec
  inputs_ = keras_models.keras_inputs(
      spec, keras_models.input_names(config, spec))
  net = tf.keras.layers.DenseFeatures(columns.deep)(inputs_)
  for units in config.model.hidden_units:
    net = tf.keras.layers.Dense(units, activation='relu')(net)
  logit = tf.keras.layers.Dense(1)(net)
  if config.model.type == 'wide_deep':
    fc = tf.feature_column
    weights = [fc.embedding_column(c, 1, combiner='sum')
               if c.name not in columns.numeric else c for c in columns.wide]
    wide = tf.keras.layers.DenseFeatures(weights)(inputs_)
    linear = tf.reduce_sum(wide, axis=1, keepdims=True)
    logit = tf.keras.layers.Add()([logit, linear])
  output = tf.keras.layers.Activation('sigmoid')(logit)
  model = tf.keras.Model(inputs_, output)
  model.compile(optimizer=tf.keras.optimizers.legacy.Adam(
      config.model.learning_rate), loss='binary_crossentropy')
  return model


def keras_rate(config, steps, warmup):
  tft_output = train_lib.load_tft_output(config)
  columns = features_lib.build_feature_columns(config, tft_output)
  model = keras_model(config, columns)
  dataset = inputs.make_dataset(
      config, inputs.data_files(config, 'train'),
      tft_output.transformed_feature_spec(), training=True,
      label_format='keras')
  timer = _BatchTimer(warmup)
  model.fit(dataset, steps_per_epoch=warmup + steps, epochs=1, verbose=0,
            callbacks=[timer])
  timed = timer.steps - timer.warmup
  return timed * config.train.batch_size / (timer.t_end - timer.t_start)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('config', nargs='?',
                      default=os.path.join('examples', 'census.yaml'))
  parser.add_argument('--set', dest='overrides', action='append', default=[])
  parser.add_argument('--models', default='dnn,wide_deep')
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--warmup', type=int, default=100)
  parser.add_argument('--repeats', type=int, default=3,
                      help='alternating runs of each path; the median counts'
                      ' (robust to other load on the machine)')
  parser.add_argument('--output', help='write the results as JSON here')
  args = parser.parse_args(argv)
  tf.get_logger().setLevel('ERROR')
  config = load_config(args.config, args.overrides)
  if config.label.task != 'binary':
    parser.error('the Keras comparison model is binary: use a binary label')
  results = {'config': os.path.abspath(args.config),
             'batch_size': config.train.batch_size, 'steps': args.steps,
             'cpus': os.cpu_count(),
             'gpus': len(tf.config.list_physical_devices('GPU')),
             'models': {}}
  work = tempfile.mkdtemp(prefix='bench_training-')
  try:
    for model_type in args.models.split(','):
      est, keras = [], []
      for repeat in range(args.repeats):
        run = _run_copy(config, model_type, os.path.join(work, str(repeat)))
        est.append(estimator_rate(run, args.steps, args.warmup))
        keras.append(keras_rate(run, args.steps, args.warmup))
      row = {'estimator_examples_per_sec': statistics.median(est),
             'keras_fit_examples_per_sec': statistics.median(keras),
             'ratio': statistics.median(est) / statistics.median(keras),
             'runs': {'estimator': est, 'keras_fit': keras}}
      results['models'][model_type] = row
      print(f'{model_type:10s} estimator {row["estimator_examples_per_sec"]:9.0f}'
            f' ex/s   keras fit {row["keras_fit_examples_per_sec"]:9.0f} ex/s'
            f'   ratio {row["ratio"]:.2f}', flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
