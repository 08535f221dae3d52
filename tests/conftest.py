"""Shared fixtures: real data where it exists, preprocessed runs per session."""

import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(ROOT, '..', 'shared', 'data'))
EXAMPLES = os.path.join(ROOT, 'examples')

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'slow: multi-process or long tests (run in CI too)')


def _shared(*parts):
  path = os.path.join(SHARED_DATA, *parts)
  if not os.path.exists(path):
    pytest.skip(f'real data not found at {path}: tests on Census and Chicago '
                'taxi need ../shared/data beside the checkout (CI has it)')
  return path


@pytest.fixture(scope='session')
def census_data():
  return {'train': _shared('census', 'adult.train.csv'),
          'eval': _shared('census', 'adult.eval.csv')}


@pytest.fixture(scope='session')
def taxi_data():
  return _shared('taxi', 'data.csv')


def example_config(name, run_dir, *overrides):
  from pipeline.config import load_config  # pylint: disable=g-import-not-at-top
  return load_config(os.path.join(EXAMPLES, f'{name}.yaml'),
                     [f'run_dir={run_dir}', *overrides])


def preprocessed(config):
  from preprocessing import run  # pylint: disable=g-import-not-at-top
  run.preprocess(config)
  return config


@pytest.fixture(scope='session')
def census_run(census_data, tmp_path_factory):
  """Census preprocessed once per session (a Config; see its run_dir)."""
  del census_data
  run_dir = tmp_path_factory.mktemp('census_run')
  return preprocessed(example_config('census', run_dir))


@pytest.fixture(scope='session')
def taxi_run(taxi_data, tmp_path_factory):
  del taxi_data
  run_dir = tmp_path_factory.mktemp('taxi_run')
  return preprocessed(example_config('taxi', run_dir))


@pytest.fixture(scope='session')
def synthetic_csv(tmp_path_factory):
  """5,000 synthetic rows: needs no shared data."""
  from pipeline import synthetic  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp('synthetic_data')
  synthetic.write_csv(str(out), 5000, seed=0)
  return str(out)


@pytest.fixture(scope='session')
def synthetic_run(synthetic_csv, tmp_path_factory):
  run_dir = tmp_path_factory.mktemp('synthetic_run')
  return preprocessed(example_config(
      'synthetic', run_dir, f'data.train={synthetic_csv}/data-*.csv'))


@pytest.fixture
def fresh_copy(tmp_path):
  """Copies a file into the test's tmp dir, so tests can damage it."""
  def copy(path, name=None):
    dst = tmp_path / (name or os.path.basename(path))
    shutil.copy(path, dst)
    return str(dst)
  return copy


# The model server's tiny models (serving/tiny_models.py), trained once for
# test_server.py and test_rest_api.py.

@pytest.fixture(scope='session')
def exports(tmp_path_factory):
  """{'classifier': dir, 'regressor': dir} of finished SavedModels."""
  from serving import tiny_models  # pylint: disable=g-import-not-at-top
  work = tmp_path_factory.mktemp('server_models')
  return {kind: tiny_models.train_and_export(kind, str(work / kind))
          for kind in tiny_models.KINDS}


@pytest.fixture(scope='session')
def model_root(exports, tmp_path_factory):
  """Base paths in TF Serving layout: cls/1, reg/1 and reg/2."""
  root = tmp_path_factory.mktemp('model_root')
  shutil.copytree(exports['classifier'], root / 'cls' / '1')
  shutil.copytree(exports['regressor'], root / 'reg' / '1')
  shutil.copytree(exports['regressor'], root / 'reg' / '2')
  return root


@pytest.fixture(scope='session')
def local(exports):
  """The SavedModels loaded in process: the expected answers."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {kind: tf.saved_model.load(path)
          for kind, path in exports.items()}


# A Beam job service with an external worker pool, as on a cluster: both on
# free 127.0.0.1 ports, started once per session and killed after.

def free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_for_port(port, process, seconds=120):
  import socket  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.time() + seconds
  while time.time() < deadline:
    assert process.poll() is None, f'{process.args} exited'
    with socket.socket() as s:
      if s.connect_ex(('127.0.0.1', port)) == 0:
        return
    time.sleep(0.2)
  raise AssertionError(f'{process.args} did not listen on {port}')


def _start(module, *args):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  # Pool workers start `python` from PATH and import the project from ROOT.
  env = dict(os.environ, PYTHONPATH=ROOT,
             PATH=f'{os.path.dirname(sys.executable)}:{os.environ["PATH"]}')
  return subprocess.Popen([sys.executable, '-m', module, *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)


@pytest.fixture(scope='session')
def job_service():
  """Beam flags for a local job service with an EXTERNAL worker pool."""
  import signal  # pylint: disable=g-import-not-at-top
  job_port, pool_port = free_port(), free_port()
  service = _start('apache_beam.runners.portability.local_job_service_main',
                   '--port', str(job_port))
  pool = _start('apache_beam.runners.worker.worker_pool_main',
                '--service_port', str(pool_port))
  try:
    wait_for_port(job_port, service)
    wait_for_port(pool_port, pool)
    yield ['--runner=PortableRunner', f'--job_endpoint=localhost:{job_port}',
           '--environment_type=EXTERNAL',
           f'--environment_config=localhost:{pool_port}']
  finally:
    for process in (service, pool):  # with the workers they started
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()


# A user module's Keras builder with a custom layer: test_training wraps it
# with model_to_estimator, test_native_training trains it natively.
KERAS_BUILDER = '''
import tensorflow as tf

class Doubler(tf.keras.layers.Layer):
  def call(self, x):
    return 2.0 * x

CUSTOM_OBJECTS = {'Doubler': Doubler}

def build_keras_model(config, columns):
  from estimators import keras_models
  spec = columns.feature_spec
  inputs = keras_models.keras_inputs(
      spec, keras_models.input_names(config, spec))
  net = tf.keras.layers.DenseFeatures(columns.deep)(inputs)
  net = tf.keras.layers.Dense(16, activation='relu')(Doubler()(net))
  out = tf.keras.layers.Dense(1, activation='sigmoid', name='logistic')(net)
  return tf.keras.Model(inputs, out)
'''
