"""Distributed and interrupted training, in real separate processes.

Clusters are launched by the product's own code (estimators/cluster.py,
what `estpipe cluster` runs): tasks on 127.0.0.1 ports, ps tasks stopped
once the chief and the evaluator are done.
"""

import collections
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from estimators import cluster
from estimators import train as train_lib
from pipeline import runrecord
from tests.conftest import ROOT
from tests.test_training import cli_env, derive, majority_accuracy, write_yaml

pytestmark = pytest.mark.slow


def checkpoint_steps(model_dir):
  steps = []
  for path in tf.io.gfile.glob(os.path.join(model_dir, 'model.ckpt-*.index')):
    steps.append(int(re.search(r'ckpt-(\d+)\.index$', path).group(1)))
  return sorted(steps)


def exported_models(config):
  return tf.io.gfile.glob(os.path.join(config.rundir.export, '*',
                                       'saved_model.pb'))


def run_cluster(config_path, workers, ps, timeout=300):
  """Runs `estpipe train` as a chief, workers, ps and an evaluator.

  Launched by the product's cluster code (estimators/cluster.py). Returns
  {task name: (returncode, log text)} for the tasks that exit by
  themselves; ps tasks are stopped once the others are done.
  """
  logs = collections.defaultdict(str)

  def collect(name, line):
    logs[name] += line
  outcome = cluster.run(cluster.train_command(config_path), workers, ps,
                        on_line=collect, env=cli_env(), timeout=timeout)
  return {name: (code, logs[name])
          for name, code in outcome.returncodes.items()
          if not name.startswith('ps')}


def assert_ran(results):
  for name, (code, log) in results.items():
    assert code == 0, f'{name} exited with {code}:\n{log[-3000:]}'


def trained_steps(log):
  return [int(s) for s in re.findall(r'INFO step (\d+) loss', log)]


@pytest.fixture
def census_majority(census_run):
  return majority_accuracy(census_run)


def cluster_config(census_run, tmp_path, distribution, steps):
  config = derive(
      census_run, tmp_path / 'run', model__type='wide_deep',
      train__distribution=distribution, train__steps=steps,
      train__save_checkpoints_steps=100,
      # The evaluator reads checkpoints as they come: keep all of them so
      # none is deleted under it.
      train__keep_checkpoint_max=20, train__eval_throttle_secs=1)
  config.export.exporters = ['final']
  return config, write_yaml(config, tmp_path / 'config.yaml')


def assert_cluster_outcome(config, results, steps, majority):
  assert_ran(results)
  # The chief wrote the checkpoint of the final step and the metrics.
  assert checkpoint_steps(config.rundir.model)[-1] >= steps
  record = runrecord.read_json(config.rundir.metrics)
  assert record['global_step'] >= steps
  assert record['metrics']['accuracy'] > majority + 0.04
  # The evaluator exported a SavedModel.
  assert exported_models(config), os.listdir(config.run_dir)
  assert 'exported' in results['evaluator0'][1]


def test_parameter_server_cluster(census_run, census_majority, tmp_path):
  steps = 600
  config, path = cluster_config(census_run, tmp_path, 'parameter_server',
                                steps)
  results = run_cluster(path, workers=1, ps=1)
  assert_cluster_outcome(config, results, steps, census_majority)
  # Asynchronous training: both the chief and the worker took steps.
  assert trained_steps(results['chief0'][1])
  assert trained_steps(results['worker0'][1])


def test_multi_worker_mirrored_cluster(census_run, census_majority, tmp_path):
  steps = 200
  config, path = cluster_config(census_run, tmp_path,
                                'multi_worker_mirrored', steps)
  results = run_cluster(path, workers=1, ps=0)
  assert_cluster_outcome(config, results, steps, census_majority)
  # Synchronous training: the worker reached the final step with the chief.
  assert max(trained_steps(results['worker0'][1])) >= steps


def test_mirrored_on_two_cpu_devices(census_run, census_majority, tmp_path):
  config = derive(census_run, tmp_path / 'run', model__type='wide_deep',
                  train__distribution='mirrored', train__num_devices=2,
                  train__steps=200)
  path = write_yaml(config, tmp_path / 'config.yaml')
  result = subprocess.run(
      [sys.executable, '-m', 'pipeline.cli', 'train', path], cwd=ROOT,
      env=cli_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  record = runrecord.read_json(config.rundir.metrics)
  assert record['global_step'] == 200
  assert record['metrics']['accuracy'] > census_majority + 0.04
  # The graph really placed replicas on the second logical CPU.
  with open(os.path.join(config.rundir.model, 'graph.pbtxt')) as f:
    assert 'device:CPU:1' in f.read()


def test_sigkill_then_rerun_finishes_at_the_configured_step(
    census_run, census_majority, tmp_path):
  steps = 3000
  config = derive(census_run, tmp_path / 'run', model__type='linear',
                  train__steps=steps, train__save_checkpoints_steps=100,
                  train__eval_throttle_secs=30)
  path = write_yaml(config, tmp_path / 'config.yaml')
  command = [sys.executable, '-m', 'pipeline.cli', 'train', path]
  with open(tmp_path / 'first.log', 'w') as log:
    proc = subprocess.Popen(command, cwd=ROOT, env=cli_env(), stdout=log,
                            stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if any(s >= 200 for s in checkpoint_steps(config.rundir.model)):
        break
      time.sleep(0.1)
    assert proc.poll() is None, 'training ended before it could be killed'
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = tf.train.latest_checkpoint(config.rundir.model)
  assert killed_at is not None
  killed_step = int(killed_at.rsplit('-', 1)[1])
  assert killed_step < steps
  assert not os.path.exists(config.rundir.metrics)

  second = subprocess.run(command, cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  # It resumed from the checkpoint instead of starting over.
  assert trained_steps(second.stderr)[0] > killed_step
  record = runrecord.read_json(config.rundir.metrics)
  assert record['global_step'] == steps
  # The final model loads and evaluates cleanly.
  result = train_lib.evaluate(config)
  assert result['global_step'] == steps
  assert result['metrics']['accuracy'] > census_majority + 0.04
