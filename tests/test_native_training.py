"""train.trainer keras_fit: native Keras training next to the Estimators.

Small synthetic runs and few steps: functional, Sequential and subclassed
models learn above the majority baseline, a regression trains, the export
passes the skew check and is served, the saved model reloads in every
format, a SIGKILLed run resumes, and the native modules never touch
tf.estimator.
"""

import ast
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import KERAS_BUILDER, ROOT, example_config, preprocessed
from tests.serving_helpers import copy_preprocessed

tf = pytest.importorskip('tensorflow')

# pylint: disable=g-import-not-at-top,redefined-outer-name

NATIVE_MODULES = ('estimators/native.py', 'estimators/trainlib.py',
                  'serving/keras_export.py')
STEPS = 60


def _native(config, run_dir, **train):
  settings = dict(trainer='keras_fit', steps=STEPS, batch_size=64,
                  save_checkpoints_steps=30, log_step_count_steps=30,
                  save_summary_steps=20)
  settings.update(train)
  config = copy_preprocessed(config, run_dir)
  return dataclasses.replace(
      config, model=dataclasses.replace(config.model, type='keras'),
      train=dataclasses.replace(config.train, **settings))


def _style(config, style, **model):
  return dataclasses.replace(config, model=dataclasses.replace(
      config.model, keras_style=style, **model))


def _scalar_yaml(tmp_path_factory, name, label):
  """A synthetic config without the text feature (Sequential models read
  scalar features only), preprocessed on 1,500 rows."""
  from pipeline import synthetic
  data = tmp_path_factory.mktemp(f'{name}_data')
  synthetic.write_csv(str(data), 1500, seed=1)
  with open(os.path.join(ROOT, 'examples', 'synthetic.yaml')) as f:
    tree = yaml.safe_load(f)
  tree['features'] = [f for f in tree['features']
                      if f['name'] not in ('notes', label['name'])]
  tree['label'] = label
  tree['model']['crosses'] = []
  tree['data']['train'] = f'{data}/data-*.csv'
  # Rows without the label (hours_per_week is sometimes missing) are rejects.
  tree.setdefault('preprocessing', {})['max_reject_fraction'] = 0.2
  run_dir = tmp_path_factory.mktemp(name)
  tree['run_dir'] = str(run_dir)
  path = run_dir / 'config.yaml'
  path.write_text(yaml.safe_dump(tree))
  return preprocessed(load_config(str(path)))


@pytest.fixture(scope='module')
def scalar_run(tmp_path_factory):
  return _scalar_yaml(tmp_path_factory, 'scalar_binary',
                      {'name': 'label', 'task': 'binary',
                       'values': ['no', 'yes']})


@pytest.fixture(scope='module')
def regression_run(tmp_path_factory):
  return _scalar_yaml(tmp_path_factory, 'scalar_regression',
                      {'name': 'hours_per_week', 'task': 'regression'})


def _train(config):
  from estimators import commands
  assert commands.run_train(config) == 0
  with open(config.rundir.metrics) as f:
    return json.load(f)


def _majority(config):
  """Accuracy of always answering the eval split's majority class."""
  from estimators import inputs
  import tensorflow_transform as tft
  tft_output = tft.TFTransformOutput(config.rundir.transform)
  data = inputs.make_dataset(config, inputs.data_files(config, 'eval'),
                             tft_output.transformed_feature_spec(), False,
                             'index', batch_size=1024)
  labels = np.concatenate([label.numpy() for _, label in data])
  return max(np.mean(labels), 1 - np.mean(labels))


@pytest.fixture(scope='module')
def functional(synthetic_run, tmp_path_factory):
  config = _native(synthetic_run, tmp_path_factory.mktemp('functional'))
  return config, _train(config)


def test_functional_trains_exports_and_verifies(functional):
  from estimators import commands
  config, record = functional
  assert record['global_step'] == STEPS
  assert record['trainer'] == 'keras_fit'
  assert set(record['metrics']) >= {'loss', 'accuracy', 'auc', 'precision',
                                    'recall'}
  assert record['metrics']['accuracy'] > _majority(config) + 0.02
  history = [json.loads(line) for line in
             open(os.path.join(config.run_dir, 'history.jsonl'))]
  assert [(h['stage'], h['status']) for h in history[-2:]] == [
      ('train', 'started'), ('train', 'succeeded')]
  assert history[-1]['summary']['trainer'] == 'keras_fit'
  summary = commands.run_verify(config, max_rows=200)
  assert summary['rows'] == 200
  # Run again: finished, so evaluated, not trained or exported again.
  versions = os.listdir(config.rundir.export)
  assert _train(config)['global_step'] == STEPS
  assert os.listdir(config.rundir.export) == versions
  assert {'serving_default', 'classification', 'regression', 'predict',
          'raw:predict'} <= set(summary['max_abs_diff'])


def _summary_steps(log_dir, tag):
  steps = set()
  for name in tf.io.gfile.glob(os.path.join(log_dir, 'events.out.*')):
    for event in tf.compat.v1.train.summary_iterator(name):
      if any(value.tag == tag for value in event.summary.value):
        steps.add(event.step)
  return steps


def test_tensorboard_summaries_every_save_summary_steps(functional):
  """Batch summaries at train.save_summary_steps (only those batches pay
  for the summary ops), epoch summaries of train and eval."""
  config, _ = functional
  train_dir = os.path.join(config.rundir.model, 'train')
  assert _summary_steps(train_dir, 'batch_loss') == {20, 40, 60}
  assert _summary_steps(train_dir, 'epoch_loss') == {0, 1}
  assert _summary_steps(os.path.join(config.rundir.model, 'validation'),
                        'epoch_auc') == {0, 1}


def test_export_follows_the_contract(functional):
  from pipeline import signatures
  from serving import export, warmup
  from tensorflow.core.protobuf import saved_model_pb2
  config, record = functional
  path = os.path.join(config.rundir.export,
                      os.listdir(config.rundir.export)[0])
  meta = export.read_metadata(path)
  assert meta['checkpoint'] == record['checkpoint']
  assert meta['global_step'] == STEPS
  assert set(meta['raw_features']) == {f.name for f in config.features}
  assert 'required_features' in meta
  assert os.path.exists(os.path.join(path, warmup.WARMUP_FILE))
  saved_model = saved_model_pb2.SavedModel()
  with open(os.path.join(path, 'saved_model.pb'), 'rb') as f:
    saved_model.ParseFromString(f.read())
  defs = saved_model.meta_graphs[0].signature_def
  assert defs['classification'].method_name == signatures.CLASSIFY_METHOD
  assert defs['serving_default'].method_name == signatures.CLASSIFY_METHOD
  assert defs['regression'].method_name == signatures.REGRESS_METHOD
  assert defs['predict'].method_name == signatures.PREDICT_METHOD
  assert set(defs['predict'].inputs) == {signatures.EXAMPLES_INPUT}
  assert set(defs['classification'].inputs) == {signatures.CLASSIFY_INPUTS}
  assert set(defs['classification'].outputs) == {'classes', 'scores'}
  assert set(defs['raw:predict'].inputs) == set(meta['raw_features'])
  # Missing values: NaN and '' reach the transform as absent.
  loaded = tf.saved_model.load(path)
  raw = {name: tf.constant([float('nan')] * 2, tf.float64)
         if kind != 'string' else tf.constant(['', 'x'])
         for name, kind in meta['raw_features'].items()
         if name not in meta['required_features']}
  for name in meta['required_features']:
    raw[name] = tf.constant([30.0, 40.0], tf.float64)
  out = loaded.signatures['raw:predict'](**raw)
  assert out['probabilities'].shape == (2, 2)


def test_served_raw_predict_and_classify(functional):
  import requests
  from serving import grpc_service, rest
  from serving.server import ModelServer, ServerOptions
  from serving.versions import ModelConfig
  config, _ = functional
  instances = [{'age': 50, 'hours_per_week': 45.0, 'capital_gain': 1000.0,
                'workclass': 'private', 'education': 'bachelors',
                'occupation': 'tech', 'region': 'region_01',
                'notes': 'senior lead'},
               {'age': 25, 'hours_per_week': float('nan'),
                'capital_gain': 0.0, 'workclass': 'private',
                'education': 'primary', 'occupation': '',
                'region': 'region_02', 'notes': ''}]
  options = ServerOptions(
      models=[ModelConfig('native', config.rundir.export)], grpc_port=0,
      rest_port=0, poll_wait_seconds=0)
  server = ModelServer(options, (grpc_service.start, rest.start)).start()
  try:
    url = f'http://127.0.0.1:{server.rest_port}/v1/models/native'
    body = json.dumps({'signature_name': 'raw:predict',
                       'instances': instances}).replace('NaN', 'null')
    response = requests.post(f'{url}:predict', data=body, timeout=60)
    assert response.status_code == 200, response.text
    predictions = response.json()['predictions']
    assert len(predictions) == 2
    assert predictions[0]['classes'] in (['no'], ['yes'])
    examples = [{k: v for k, v in i.items()
                 if v not in ('',) and v == v} for i in instances]
    response = requests.post(f'{url}:classify',
                             data=json.dumps({'examples': examples}),
                             timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()['results']
    assert [[label for label, _ in r] for r in results] == [['no', 'yes']] * 2
    for (_, no), (_, yes) in results:
      assert abs(no + yes - 1) < 1e-5
  finally:
    server.stop(grace=5)


def test_saved_model_reloads_in_every_format(functional):
  from estimators import keras_models, native
  config, record = functional
  restored, _ = native.restore(config)
  tft_output = __import__('tensorflow_transform').TFTransformOutput(
      config.rundir.transform)
  features, _ = next(iter(native.dataset(config, tft_output, restored,
                                         'eval', False, batch_size=32)))
  expected = restored.model(features).numpy()
  model_dir = config.rundir.model
  objects = keras_models.CUSTOM_OBJECTS

  # Weights, TF checkpoint format (what restore did) and HDF5.
  h5 = native.build_model(config, tft_output)
  h5.model(features)
  h5.model.load_weights(os.path.join(model_dir, native.H5_WEIGHTS))
  np.testing.assert_allclose(h5.model(features).numpy(), expected, rtol=1e-6)
  # Architecture JSON + weights.
  with open(os.path.join(model_dir, native.ARCHITECTURE)) as f:
    rebuilt = tf.keras.models.model_from_json(f.read(),
                                              custom_objects=objects)
  rebuilt.load_weights(record['checkpoint']).expect_partial()
  np.testing.assert_allclose(rebuilt(features).numpy(), expected, rtol=1e-6)
  # The whole model.
  whole = tf.keras.models.load_model(
      os.path.join(model_dir, native.WHOLE_MODEL), custom_objects=objects,
      compile=False)
  np.testing.assert_allclose(whole(features).numpy(), expected, rtol=1e-6)


def test_export_and_evaluate_commands(functional):
  from estimators import commands
  from serving import export
  config, record = functional
  path = commands.run_export(config)
  meta = export.read_metadata(path)
  assert (meta['exporter'], meta['checkpoint'], meta['global_step']) == (
      'manual', record['checkpoint'], STEPS)
  result = commands.run_evaluate(config, checkpoint=str(STEPS))
  assert result['global_step'] == STEPS
  assert result['metrics']['accuracy'] == pytest.approx(
      record['metrics']['accuracy'])


@pytest.mark.parametrize('style', ['subclassed'])
def test_subclassed_trains_and_reloads(synthetic_run, tmp_path, style):
  from estimators import keras_models, native
  config = _style(_native(synthetic_run, tmp_path / 'run'), style)
  record = _train(config)
  assert record['metrics']['accuracy'] > _majority(config) + 0.02
  restored, _ = native.restore(config)
  import tensorflow_transform as tft
  tft_output = tft.TFTransformOutput(config.rundir.transform)
  features, _ = next(iter(native.dataset(config, tft_output, restored,
                                         'eval', False, batch_size=32)))
  expected = restored.model(features).numpy()
  h5 = native.build_model(config, tft_output)
  h5.model(features)
  h5.model.load_weights(os.path.join(config.rundir.model, native.H5_WEIGHTS))
  np.testing.assert_allclose(h5.model(features).numpy(), expected, rtol=1e-6)
  # DeepCrossModel has a config, so its architecture JSON rebuilds it; a
  # subclassed model without get_config has no model.json.
  with open(os.path.join(config.rundir.model, native.ARCHITECTURE)) as f:
    rebuilt = tf.keras.models.model_from_json(
        f.read(), custom_objects=keras_models.CUSTOM_OBJECTS)
  rebuilt(features)
  rebuilt.load_weights(record['checkpoint']).expect_partial()
  np.testing.assert_allclose(rebuilt(features).numpy(), expected, rtol=1e-6)
  whole = tf.keras.models.load_model(
      os.path.join(config.rundir.model, native.WHOLE_MODEL),
      custom_objects=keras_models.CUSTOM_OBJECTS, compile=False)
  np.testing.assert_allclose(whole(features).numpy(), expected, rtol=1e-6)


def test_sequential_trains_above_baseline(scalar_run, tmp_path):
  config = _style(_native(scalar_run, tmp_path / 'run', steps=80),
                  'sequential')
  record = _train(config)
  assert record['metrics']['accuracy'] > _majority(config) + 0.02


def test_regression_trains(regression_run, tmp_path):
  from estimators import commands
  config = _native(regression_run, tmp_path / 'run', steps=80)
  record = _train(config)
  assert set(record['metrics']) >= {'loss', 'rmse', 'mae'}
  assert record['task'] == 'regression'
  summary = commands.run_verify(config, max_rows=100)
  assert set(summary['max_abs_diff']) == {'serving_default', 'regression',
                                          'predict', 'raw:predict'}


USER_MODULE = KERAS_BUILDER


def test_user_module_keras_builder(synthetic_run, tmp_path):
  """A user's build_keras_model (uncompiled, with a custom layer) trains
  with keras_fit, and its architecture reloads with its CUSTOM_OBJECTS."""
  from estimators import native
  module = tmp_path / 'my_model.py'
  module.write_text(USER_MODULE)
  config = _native(synthetic_run, tmp_path / 'run')
  config = dataclasses.replace(config, model=dataclasses.replace(
      config.model, module=str(module)))
  record = _train(config)
  assert record['metrics']['accuracy'] > _majority(config) + 0.02
  with open(os.path.join(config.rundir.model, native.ARCHITECTURE)) as f:
    rebuilt = tf.keras.models.model_from_json(
        f.read(), custom_objects=native.custom_objects_of(config))
  assert any(type(layer).__name__ == 'Doubler' for layer in rebuilt.layers)


@pytest.mark.slow
def test_killed_run_resumes_and_finishes(synthetic_run, tmp_path):
  """SIGKILL mid-training; the rerun resumes from BackupAndRestore's last
  epoch and ends at the configured step."""
  config = copy_preprocessed(synthetic_run, tmp_path / 'run')
  steps, per_epoch = 800, 100
  args = [sys.executable, '-m', 'pipeline.cli', 'train',
          os.path.join(ROOT, 'examples', 'synthetic.yaml'),
          '--set', f'run_dir={config.run_dir}',
          '--set', f'data.train={config.data.train_patterns[0]}',
          '--set', 'model.type=keras', '--set', 'train.trainer=keras_fit',
          '--set', f'train.steps={steps}', '--set', 'train.batch_size=32',
          '--set', f'train.save_checkpoints_steps={per_epoch}',
          '--set', f'train.log_step_count_steps={per_epoch}',
          '--set', 'train.eval_steps=2', '--set', 'export.exporters=[final]']
  env = dict(os.environ, PYTHONPATH=ROOT)
  backup = os.path.join(config.rundir.model, 'backup')
  process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
      if os.path.isdir(backup) and any(
          n.endswith('.index') for _, _, files in os.walk(backup)
          for n in files):
        break
      time.sleep(0.2)
    assert process.poll() is None, 'training finished before the kill'
    process.send_signal(signal.SIGKILL)
    process.wait()
  finally:
    if process.poll() is None:
      process.kill()
  assert not os.path.exists(config.rundir.metrics)
  done = subprocess.run(args, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  steps_logged = [int(m.group(1)) for m in
                  re.finditer(r'\bstep (\d+) loss ', done.stderr)]
  assert steps_logged and steps_logged[0] > per_epoch, steps_logged[:3]
  with open(config.rundir.metrics) as f:
    assert json.load(f)['global_step'] == steps


def test_native_modules_import_no_estimator():
  """The native trainer and export reach tf.estimator neither by import nor
  by attribute (tf.estimator, tf.compat.v1)."""
  banned_imports = ('tensorflow_estimator', 'tensorflow.estimator',
                    'tensorflow.compat', 'tensorflow.python.estimator')
  for relative in NATIVE_MODULES:
    with open(os.path.join(ROOT, relative)) as f:
      source = f.read()
    tree = ast.parse(source)
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or '']
        if node.module == 'tensorflow':
          names += [f'tensorflow.{a.name}' for a in node.names]
      for name in names:
        assert not name.startswith(banned_imports), (relative, name)
        # Estimator-side modules of this project.
        assert name not in ('estimators.train', 'estimators.hooks',
                            'estimators.models', 'estimators.heads',
                            'estimators.runconfig'), (relative, name)
      if isinstance(node, ast.Attribute):
        dotted = ast.unparse(node)
        assert not dotted.startswith(('tf.estimator', 'tf.compat')), (
            relative, dotted)
    assert 'tf.estimator' not in source, relative
    assert 'compat.v1' not in source, relative


def test_callbacks_from_config(synthetic_csv, tmp_path):
  """Early stopping in steps becomes epochs of save_checkpoints_steps; the
  best exporter adds a best-only ModelCheckpoint on its metric."""
  from estimators import native
  config = example_config(
      'synthetic', tmp_path, f'data.train={synthetic_csv}/data-*.csv',
      'model.type=keras', 'train.trainer=keras_fit', 'train.steps=1000',
      'train.save_checkpoints_steps=100',
      'train.early_stopping={metric: auc, mode: max, '
      'max_steps_without_improvement: 250, min_steps: 300}',
      'export.exporters=[best, final]', 'export.best_metric=auc')
  per_epoch = native.steps_per_epoch(config, 1000)
  assert per_epoch == 100
  found = {type(c).__name__: c for c in
           native.callbacks(config, 1000, per_epoch)}
  assert {'StopAtStep', 'Progress', 'BackupAndRestore', 'ModelCheckpoint',
          'TensorBoard', 'EarlyStopping'} <= set(found)
  stop = found['EarlyStopping']
  assert (stop.monitor, stop.patience, stop.start_from_epoch) == (
      'val_auc', 3, 3)
  best = [c for c in native.callbacks(config, 1000, per_epoch)
          if isinstance(c, tf.keras.callbacks.ModelCheckpoint) and
          c.save_best_only]
  assert len(best) == 1 and best[0].monitor == 'val_auc'


@pytest.mark.parametrize('overrides, words', [
    (['train.trainer=keras_fit'], 'trains Keras models only'),
    (['train.trainer=keras_fit', 'model.type=dnn'], "'dnn'"),
    (['train.trainer=keras_fit', 'model.type=custom'], "'custom'"),
    (['train.trainer=custom_loop', 'model.type=keras'], 'not yet available'),
    (['train.trainer=fit'], 'expected one of estimator, keras_fit'),
    (['train.trainer=keras_fit', 'model.type=keras',
      'train.distribution=mirrored'], 'distribution must be none'),
])
def test_config_errors_name_train_trainer(tmp_path, overrides, words):
  with pytest.raises(ConfigError) as e:
    example_config('synthetic', tmp_path, 'data.train=x.csv', *overrides)
  assert 'train.trainer' in str(e.value)
  assert words in str(e.value)
