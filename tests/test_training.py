"""Training on real data: every model type, the three tasks, hooks, resume.

Runs share the session's preprocessed Census run (read-only links to its
transform and data) and train a few hundred steps each; they must beat the
majority-class baseline computed from the eval data, not a fixed number.
"""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import yaml

from estimators import keras_models
from estimators import models
from estimators import train as train_lib
from pipeline import runrecord
from pipeline.errors import UserError
from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from tests.conftest import EXAMPLES, KERAS_BUILDER, ROOT, preprocessed

STEPS = 300


# --- helpers (also used by test_training_distributed.py) --------------------

def derive(base, run_dir, **settings):
  """A copy of `base` training in `run_dir` over base's preprocessed data.

  settings: section__key=value, e.g. model__type='dnn'.
  """
  os.makedirs(run_dir, exist_ok=True)
  for item in ('transform', 'data', 'preprocess.json'):
    link = os.path.join(run_dir, item)
    if not os.path.exists(link):
      os.symlink(base.rundir.path(item), link)
  config = copy.deepcopy(base)
  config.run_dir = str(run_dir)
  config.train.steps = STEPS
  config.train.batch_size = 64
  config.train.save_checkpoints_steps = STEPS
  config.train.log_step_count_steps = 100
  config.export.exporters = []
  for key, value in settings.items():
    section, name = key.split('__')
    setattr(getattr(config, section), name, value)
  config.validate(check_columns=False)
  return config


def write_yaml(config, path):
  """The config as a YAML file for `estpipe` subprocesses."""
  tree = config.to_dict()
  tree.pop('source', None)
  with open(path, 'w') as f:
    yaml.safe_dump(tree, f)
  return str(path)


def eval_labels(config):
  files = sorted(tf.io.gfile.glob(config.rundir.data_pattern('eval')))
  spec = {config.label.name: tf.io.FixedLenFeature(
      [], tf.float32 if config.label.task == 'regression' else tf.int64)}
  labels = []
  for batch in tf.data.TFRecordDataset(files, 'GZIP').batch(4096):
    labels.append(tf.io.parse_example(batch, spec)[config.label.name].numpy())
  return np.concatenate(labels)


def majority_accuracy(config):
  labels = eval_labels(config)
  return float(np.bincount(labels).max() / len(labels))


def estpipe(*args, env=None, timeout=300):
  """Runs the estpipe CLI in a new process; returns CompletedProcess."""
  return subprocess.run(
      [sys.executable, '-m', 'pipeline.cli', *args], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=timeout)


def cli_env(**extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT)
  env.pop('TF_CONFIG', None)
  env.update(extra)
  return env


# --- fixtures -------------------------------------------------------------------

@pytest.fixture(scope='module')
def census_majority(census_run):
  return majority_accuracy(census_run)


@pytest.fixture(scope='module')
def wide_deep_run(census_run, tmp_path_factory):
  """A wide & deep model trained once through the CLI, shared below."""
  config = derive(census_run, tmp_path_factory.mktemp('wide_deep'),
                  model__type='wide_deep')
  path = write_yaml(config, config.rundir.path('config.yaml'))
  result = estpipe('train', path, env=cli_env())
  assert result.returncode == 0, result.stderr[-3000:]
  return config, result


def _subset_csv(src, dst, rows):
  with open(src) as f_in, open(dst, 'w') as f_out:
    for i, line in enumerate(f_in):
      if i >= rows:
        break
      f_out.write(line)
  return str(dst)


@pytest.fixture(scope='module')
def relationship_run(census_data, tmp_path_factory):
  """Census (a subset, for time) with a 6-class label: relationship."""
  out = tmp_path_factory.mktemp('relationship')
  with open(os.path.join(EXAMPLES, 'census.yaml')) as f:
    tree = yaml.safe_load(f)
  tree['run_dir'] = str(out / 'run')
  tree['data']['train'] = _subset_csv(census_data['train'],
                                      out / 'train.csv', 12000)
  tree['data']['eval'] = _subset_csv(census_data['eval'], out / 'eval.csv',
                                     5000)
  tree['features'] = [f for f in tree['features']
                      if f['name'] != 'relationship']
  tree['label'] = {'name': 'relationship', 'task': 'multiclass',
                   'values': ['Husband', 'Not-in-family', 'Own-child',
                              'Unmarried', 'Wife', 'Other-relative']}
  tree['model']['crosses'] = []
  return preprocessed(config_from_dict(tree))


@pytest.fixture(scope='module')
def fare_run(taxi_data, tmp_path_factory):
  """Chicago taxi with a numeric target: the fare, from the trip."""
  with open(os.path.join(EXAMPLES, 'taxi.yaml')) as f:
    tree = yaml.safe_load(f)
  tree['run_dir'] = str(tmp_path_factory.mktemp('fare') / 'run')
  tree['data']['train'] = taxi_data
  tree['features'] = [f for f in tree['features'] if f['name'] != 'fare']
  tree['label'] = {'name': 'fare', 'task': 'regression'}
  return preprocessed(config_from_dict(tree))


# --- every model type on Census -------------------------------------------------

@pytest.mark.parametrize('model_type,style', [
    ('linear', None), ('dnn', None), ('custom', None),
    ('keras', 'sequential'), ('keras', 'functional'), ('keras', 'subclassed'),
])
def test_model_beats_majority_baseline(census_run, census_majority, tmp_path,
                                       model_type, style):
  settings = {'model__type': model_type}
  if style:
    settings['model__keras_style'] = style
  config = derive(census_run, tmp_path / 'run', **settings)
  record = train_lib.train(config)
  assert record['global_step'] == STEPS
  metrics = record['metrics']
  assert metrics['accuracy'] > census_majority + 0.04, (metrics,
                                                         census_majority)
  assert metrics['auc'] > 0.85
  for key in ('precision', 'recall'):
    assert 0.0 < metrics[key] <= 1.0
  on_disk = runrecord.read_json(config.rundir.metrics)
  assert on_disk['metrics']['accuracy'] == pytest.approx(metrics['accuracy'])
  assert tf.train.latest_checkpoint(config.rundir.model).endswith(f'-{STEPS}')


def test_wide_deep_cli_trains_logs_progress_and_events(wide_deep_run,
                                                       census_majority):
  config, result = wide_deep_run
  record = runrecord.read_json(config.rundir.metrics)
  assert record['model_type'] == 'wide_deep' and record['global_step'] == STEPS
  assert record['metrics']['accuracy'] > census_majority + 0.04
  # Progress: step, loss, examples/sec, then the latest eval metrics.
  assert 'step 100 loss ' in result.stderr
  assert 'examples/sec' in result.stderr
  assert f'eval@{STEPS}: accuracy' in result.stderr
  events = tf.io.gfile.glob(os.path.join(config.rundir.model, 'events.out.*'))
  assert events, 'no TensorBoard events in the model dir'
  assert tf.io.gfile.glob(os.path.join(config.rundir.model, 'eval',
                                       'events.out.*'))
  history = [line for line in open(config.rundir.history)
             if '"train"' in line]
  assert history and '"succeeded"' in history[-1]


def test_baseline_learns_the_prior(census_run, census_majority, tmp_path):
  # At the example's small learning rate 300 steps would not reach the prior.
  config = derive(census_run, tmp_path / 'run', model__type='baseline',
                  model__learning_rate=0.01)
  metrics = train_lib.train(config)['metrics']
  assert metrics['accuracy'] == pytest.approx(census_majority, abs=0.01)
  assert metrics['prediction/mean'] == pytest.approx(1 - census_majority,
                                                     abs=0.05)


@pytest.mark.parametrize('model_type', ['dnn', 'custom'])
def test_multiclass_label(relationship_run, tmp_path, model_type):
  config = derive(relationship_run, tmp_path / 'run', model__type=model_type)
  majority = majority_accuracy(config)
  metrics = train_lib.train(config)['metrics']
  assert metrics['accuracy'] > majority + 0.1, (metrics, majority)
  if model_type == 'custom':
    assert metrics['auc'] > 0.8
  # Predictions carry the configured class names.
  estimator = train_lib.build_estimator(config, warm_start=False)
  tft_output = train_lib.load_tft_output(config)
  from estimators import inputs  # pylint: disable=g-import-not-at-top
  batch = next(estimator.predict(
      inputs.make_input_fn(config, tft_output, 'eval', False,
                           models.label_format(config)),
      yield_single_examples=False))
  names = {c.decode() for c in batch['classes'].ravel()}
  assert names <= set(config.label.values) and names


@pytest.mark.parametrize('model_type', ['dnn', 'custom'])
def test_regression_on_taxi_fare(fare_run, tmp_path, model_type):
  # Fares are dollars, not standardized: a larger step reaches their scale.
  config = derive(fare_run, tmp_path / 'run', model__type=model_type,
                  model__learning_rate=0.05, train__batch_size=128)
  labels = eval_labels(config).astype(np.float64)
  mean_rmse = float(np.sqrt(np.mean((labels - labels.mean()) ** 2)))
  median_mae = float(np.mean(np.abs(labels - np.median(labels))))
  metrics = train_lib.train(config)['metrics']
  # Fares have a long tail, and the read order varies between runs (parallel
  # interleave): RMSE after 300 steps ranged 0.35-0.81 of the mean
  # predictor's. The median-based MAE bound is the tighter, steadier one.
  assert metrics['rmse'] < 0.9 * mean_rmse, (metrics, mean_rmse)
  assert metrics['mae'] < 0.6 * median_mae, (metrics, median_mae)


# --- hooks, warm start, resume, evaluate -----------------------------------------

def test_learning_rate_schedule_decays_with_the_global_step(census_run,
                                                            tmp_path):
  config = derive(
      census_run, tmp_path / 'run', model__type='custom',
      train__save_summary_steps=50,
      train__learning_rate_schedule={'type': 'exponential', 'decay_steps': 100,
                                     'decay_rate': 0.5})
  train_lib.train(config)
  rates = {}
  for path in tf.io.gfile.glob(os.path.join(config.rundir.model, 'events.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == 'learning_rate':
          rates[event.step] = value.simple_value
  assert rates, 'no learning_rate summaries'
  step = max(rates)
  assert step >= 200
  assert rates[step] == pytest.approx(
      config.model.learning_rate * 0.5 ** (step / 100), rel=0.05)


def test_early_stopping_stops_before_max_steps(census_run, tmp_path):
  # 'max' on the loss: the loss falls, so it stops 150 steps after the first
  # evaluation -- a deterministic way to see the hook stop training.
  config = derive(
      census_run, tmp_path / 'run', model__type='linear',
      train__steps=5000, train__save_checkpoints_steps=100,
      train__eval_throttle_secs=0, train__eval_steps=40,
      train__early_stopping={'metric': 'loss', 'mode': 'max',
                             'max_steps_without_improvement': 150,
                             'check_every_secs': 0})
  record = train_lib.train(config)
  assert 200 <= record['global_step'] < 1000, record['global_step']


def test_warm_start_from_another_run(wide_deep_run, census_majority,
                                     tmp_path):
  source, _ = wide_deep_run
  source_accuracy = runrecord.read_json(
      source.rundir.metrics)['metrics']['accuracy']
  config = derive(source, tmp_path / 'warm', model__type='wide_deep',
                  train__steps=1, train__warm_start_from=source.run_dir)
  metrics = train_lib.train(config)['metrics']
  # One step from scratch is near the majority baseline; warm-started it
  # keeps what the source run learned.
  assert metrics['accuracy'] > census_majority + 0.04
  assert metrics['accuracy'] == pytest.approx(source_accuracy, abs=0.02)


@pytest.mark.parametrize('style', ['functional', 'sequential'])
def test_keras_warm_start_from_object_based_checkpoints(
    census_run, census_majority, style, tmp_path):
  # These styles write object-based checkpoints, whose keys are not graph
  # variable names: the warm start maps them through the model_fn's saver.
  source = derive(census_run, tmp_path / 'source', model__type='keras',
                  model__keras_style=style)
  source_accuracy = train_lib.train(source)['metrics']['accuracy']
  config = derive(census_run, tmp_path / 'warm', model__type='keras',
                  model__keras_style=style, train__steps=1,
                  train__warm_start_from=source.run_dir)
  metrics = train_lib.train(config)['metrics']
  assert metrics['accuracy'] > census_majority + 0.04
  assert metrics['accuracy'] == pytest.approx(source_accuracy, abs=0.01)


def test_warm_start_without_checkpoint_is_a_clear_error(census_run, tmp_path):
  config = derive(census_run, tmp_path / 'run', model__type='linear',
                  train__warm_start_from=str(tmp_path))
  with pytest.raises(UserError, match='no checkpoint'):
    train_lib.train(config)


def test_evaluate_with_slices(wide_deep_run, tmp_path):
  config, _ = wide_deep_run
  path = config.rundir.path('config.yaml')
  out = tmp_path / 'eval.json'
  result = estpipe('evaluate', path, '--slice', 'race', '--output', str(out),
                   env=cli_env())
  assert result.returncode == 0, result.stderr[-3000:]
  report = runrecord.read_json(str(out))
  assert report['global_step'] == STEPS
  overall = report['metrics']['accuracy']
  races = report['slices']['race']
  assert set(races) <= {'White', 'Black', 'Asian-Pac-Islander',
                        'Amer-Indian-Eskimo', 'Other', '<OOV>'}
  assert 'White' in races and 'Black' in races
  total = sum(s['count'] for s in races.values())
  assert total == len(eval_labels(config))
  # The slices add up to the overall accuracy.
  weighted = sum(s['accuracy'] * s['count'] for s in races.values()) / total
  assert weighted == pytest.approx(overall, abs=1e-3)


def test_evaluate_a_given_checkpoint_and_bad_inputs(wide_deep_run):
  config, _ = wide_deep_run
  result = train_lib.evaluate(config, checkpoint=str(STEPS))
  assert result['global_step'] == STEPS
  with pytest.raises(UserError, match='does not exist'):
    train_lib.evaluate(config, checkpoint='12345')
  with pytest.raises(UserError, match='categorical'):
    train_lib.evaluate(config, slices=['age'])
  with pytest.raises(UserError, match='not a feature'):
    train_lib.evaluate(config, slices=['nope'])


# --- user modules -------------------------------------------------------------------

USER_MODULE = '''
import tensorflow as tf
from estimators import heads
from estimators import optimizers

def model_fn(features, labels, mode, params, config):
  cfg = params['pipeline_config']
  net = tf.keras.layers.DenseFeatures(params['deep_columns'])(features)
  net = tf.keras.layers.Dense(16, activation='relu')(net)
  logits = tf.keras.layers.Dense(1)(net)
  make_optimizer = optimizers.optimizer_fn('adam', 0.01, None)
  return heads.estimator_spec(cfg, mode, logits, labels, make_optimizer)
''' + KERAS_BUILDER


@pytest.mark.parametrize('model_type', ['custom', 'keras'])
def test_user_module_model(census_run, census_majority, tmp_path,
                           model_type):
  module = tmp_path / 'my_model.py'
  module.write_text(USER_MODULE)
  config = derive(census_run, tmp_path / 'run', model__type=model_type,
                  model__module=str(module))
  metrics = train_lib.train(config)['metrics']
  assert metrics['accuracy'] > census_majority + 0.04


def test_user_module_missing_function_is_a_clear_error(census_run, tmp_path):
  module = tmp_path / 'empty_model.py'
  module.write_text('X = 1\n')
  config = derive(census_run, tmp_path / 'run', model__type='keras',
                  model__module=str(module))
  with pytest.raises(UserError, match='build_keras_model'):
    train_lib.train(config)


# --- units: features, layers, config ------------------------------------------------

def test_feature_columns_read_sizes_from_the_transform(census_run):
  from estimators import features  # pylint: disable=g-import-not-at-top
  import tensorflow_transform as tft  # pylint: disable=g-import-not-at-top
  tft_output = tft.TFTransformOutput(census_run.rundir.transform)
  columns = features.build_feature_columns(census_run, tft_output)
  vocab = tft_output.vocabulary_size_by_name('native-country')
  country = columns.categorical['native-country']
  assert country.num_buckets >= vocab  # vocabulary + OOV ids
  assert columns.categorical['hours-per-week'].num_buckets == 10
  crossed = [c for c in columns.wide
             if isinstance(c, type(tf.feature_column.crossed_column(
                 ['a', 'b'], 10)))]
  assert len(crossed) == len(census_run.model.crosses)
  small = census_run.model.max_indicator_size
  for column in columns.deep:
    if hasattr(column, 'categorical_column'):
      one_hot = column.name.endswith('_indicator')
      assert one_hot == (column.categorical_column.num_buckets <= small)


def test_cross_layer_config_round_trip():
  layer = keras_models.CrossLayer(use_bias=False, name='x')
  clone = keras_models.CrossLayer.from_config(layer.get_config())
  assert clone.use_bias is False and clone.name == 'x'
  x = tf.constant([[1.0, 2.0]])
  assert clone(x).shape == (1, 2)


def test_train_steps_from_epochs(census_run, tmp_path):
  config = derive(census_run, tmp_path / 'run', train__steps=None,
                  train__epochs=0.5, train__batch_size=128)
  assert train_lib.train_steps(config) == int(np.ceil(0.5 * 32561 / 128))


@pytest.mark.parametrize('section,value,message', [
    ('early_stopping', {'metric': 'auc', 'mode': 'up',
                        'max_steps_without_improvement': 5}, 'min or max'),
    ('early_stopping', {'metric': 'auc'}, 'max_steps_without_improvement'),
    ('learning_rate_schedule', {'type': 'linear'}, 'expected one of'),
    ('learning_rate_schedule', {'type': 'piecewise', 'boundaries': [10],
                                'values': [1.0]}, 'one more value'),
])
def test_bad_train_settings_are_config_errors(census_run, tmp_path, section,
                                              value, message):
  with pytest.raises(ConfigError, match=message):
    derive(census_run, tmp_path / 'run', **{f'train__{section}': value})


def test_cluster_modes_need_a_matching_tf_config(census_run, tmp_path,
                                                 monkeypatch):
  from estimators import runconfig  # pylint: disable=g-import-not-at-top
  config = derive(census_run, tmp_path / 'run',
                  train__distribution='parameter_server')
  monkeypatch.delenv('TF_CONFIG', raising=False)
  with pytest.raises(UserError, match='TF_CONFIG'):
    runconfig.check_cluster(config)
  monkeypatch.setenv('TF_CONFIG', '{"cluster": {"chief": ["127.0.0.1:1"]},'
                     ' "task": {"type": "chief", "index": 0}}')
  with pytest.raises(UserError, match='ps tasks'):
    runconfig.check_cluster(config)
  config.train.distribution = 'none'
  with pytest.raises(UserError, match='describes a cluster'):
    runconfig.check_cluster(config)


def test_progress_lines_show_each_eval_result_once():
  # Both trainers' lines (hooks.ProgressHook, native.Progress) come from here.
  from estimators import trainlib  # pylint: disable=g-import-not-at-top
  lines = trainlib.ProgressLines(100, 128)
  evals = [None, (500, {'auc': 0.9}), (500, {'auc': 0.9}),
           (500, {'auc': 0.9}), (1000, {'auc': 0.95}), (1000, {'auc': 0.95})]
  shown = [lines.eval_text(e) for e in evals]
  assert shown == ['', ' | eval@500: auc 0.9000', '', '',
                   ' | eval@1000: auc 0.9500', '']


def test_every_stage_records_its_start(synthetic_csv, tmp_path):
  """A killed stage leaves its `started` line: the record shows it ran."""
  from estimators import commands  # pylint: disable=g-import-not-at-top
  from tests.conftest import example_config  # pylint: disable=g-import-not-at-top
  # Not preprocessed: every stage fails early.
  config = example_config('synthetic', tmp_path / 'run',
                          f'data.train={synthetic_csv}/data-*.csv')
  for stage, run in (('train', commands.run_train),
                     ('evaluate', commands.run_evaluate),
                     ('export', commands.run_export)):
    with pytest.raises(UserError):
      run(config)
    lines = [(h['stage'], h['status'])
             for h in runrecord.read_history(config.run_dir)]
    assert lines[-2:] == [(stage, 'started'), (stage, 'failed')], lines


def test_quiet_by_default_hides_tensorflow_and_keras_noise(caplog):
  """verify-export printed TF's name sanitizing and Keras's deprecation
  warnings around its few result lines; -v still shows them."""
  import logging  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top
  from pipeline import quiet  # pylint: disable=g-import-not-at-top
  quiet.quiet_tensorflow(False)
  with caplog.at_level(logging.WARNING):
    # absl's logger: what tf.function's name sanitizing logs through.
    logging.getLogger('absl').warning(
        '`capital-gain` is not a valid tf.function parameter name. '
        'Sanitizing to `capital_gain`.')
    logging.getLogger('tensorflow').warning(
        'Loading a TF2 SavedModel but eager mode seems disabled.')
    logging.getLogger('tensorflow').warning(
        'Tables initialized inside a tf.function  will be re-initialized')
    logging.getLogger('apache_beam.io.tfrecordio').warning(
        "Couldn't find python-snappy so the implementation of ...")
    logging.getLogger('tensorflow').warning('something that matters')
  assert [r.getMessage() for r in caplog.records] == ['something that matters']
  with warnings.catch_warnings(record=True) as shown:
    warnings.warn_explicit('`tf.keras.backend.set_learning_phase` is '
                           'deprecated', UserWarning, 'backend.py', 452,
                           module='keras.src.backend')
  assert not shown
