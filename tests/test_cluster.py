"""`estpipe cluster`: a local cluster trains and exports, failures and
signals stop every task, and `--emit vertex` writes the cloud job."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from estimators import cluster
from pipeline import cli
from pipeline import rundir
from pipeline import runrecord
from tests.conftest import EXAMPLES, ROOT
from tests.test_training import cli_env, derive, write_yaml


def started_pids(log):
  """{task: pid} from the launcher's `started TASK (pid N)` lines."""
  return {name: int(pid) for name, pid in
          re.findall(r'started (\w+) \(pid (\d+)\)', log)}


def alive(pid):
  """True for a running process (a zombie waiting to be reaped is not)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def assert_none_alive(pids):
  assert pids
  assert not [pid for pid in pids.values() if alive(pid)], pids


def cluster_args(path, *flags):
  return [sys.executable, '-m', 'pipeline.cli', 'cluster', path, *flags]


def small_config(census_run, tmp_path, **settings):
  # Few steps, a linear model and short evaluations keep the cluster quick.
  settings = dict(dict(
      model__type='linear', train__steps=100, train__eval_steps=20,
      train__save_checkpoints_steps=50, train__log_step_count_steps=50,
      train__eval_throttle_secs=1), **settings)
  config = derive(census_run, tmp_path / 'run', **settings)
  config.export.exporters = ['final']
  return config, write_yaml(config, tmp_path / 'config.yaml')


@pytest.mark.slow
def test_cluster_trains_exports_and_stops_every_task(census_run, tmp_path):
  config, path = small_config(census_run, tmp_path)
  result = subprocess.run(
      cluster_args(path, '--workers', '1', '--ps', '1', '--timeout', '240'),
      cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  pids = started_pids(result.stderr)
  assert set(pids) == {'chief0', 'worker0', 'ps0', 'evaluator0'}
  assert_none_alive(pids)
  # Each task's lines come prefixed with its name.
  assert re.search(r'^\[ps0\] .*runs until stopped', result.stderr, re.M)
  assert re.search(r'^\[worker0\] .*as worker', result.stderr, re.M)
  # Trained to the configured step, and the evaluator exported it.
  assert runrecord.read_json(config.rundir.metrics)['global_step'] >= 100
  assert rundir.list_versions(config.rundir.export)
  assert re.search(r'^\[evaluator0\] .*exported', result.stderr, re.M)


@pytest.mark.slow
def test_a_failing_task_stops_the_cluster(census_run, tmp_path):
  # Passes the config checks, then fails in every task's first step.
  empty = tmp_path / 'no-checkpoints'
  empty.mkdir()
  _, path = small_config(census_run, tmp_path,
                         train__warm_start_from=str(empty))
  began = time.monotonic()
  result = subprocess.run(cluster_args(path, '--workers', '1', '--ps', '1'),
                          cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=240)
  assert result.returncode == 1, result.stderr[-3000:]
  assert time.monotonic() - began < 120
  last = result.stderr.strip().splitlines()[-1]
  assert re.match(r'estpipe: error: (chief|worker|ps|evaluator)0 exited '
                  r'with status 1', last), last
  assert 'Traceback' not in result.stderr
  assert_none_alive(started_pids(result.stderr))


@pytest.mark.slow
def test_sigterm_stops_every_task(census_run, tmp_path):
  _, path = small_config(census_run, tmp_path, train__steps=100000)
  proc = subprocess.Popen(cluster_args(path, '--workers', '1', '--ps', '1'),
                          cwd=ROOT, env=cli_env(), stderr=subprocess.PIPE,
                          text=True)
  seen = ''
  try:
    # Once the ps task serves, it would run forever unless stopped.
    while 'runs until stopped' not in seen:
      line = proc.stderr.readline()
      assert line, seen
      seen += line
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[1]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 128 + signal.SIGTERM, rest[-3000:]
  assert 'interrupted by SIGTERM' in rest
  assert_none_alive(started_pids(seen))


def test_emit_vertex_writes_the_custom_job(tmp_path, caplog):
  out = tmp_path / 'job.json'
  code = cli.main([
      'cluster', os.path.join(EXAMPLES, 'census.yaml'), '--workers', '3',
      '--ps', '2', '--emit', 'vertex', '--out', str(out),
      '--package_uri', 'gs://b/estpipe-0.1.0.tar.gz',
      '--config_uri', 'gs://b/census.yaml', '--set', 'train.steps=100'])
  assert code == 0
  pools = json.loads(out.read_text())['workerPoolSpecs']
  # Vertex's order: chief, workers, ps, evaluator.
  assert [p['replicaCount'] for p in pools] == [1, 3, 2, 1]
  for pool in pools:
    assert pool['machineSpec']['machineType']
    package = pool['pythonPackageSpec']
    assert 'tf-cpu.2-15' in package['executorImageUri']
    assert package['packageUris'] == ['gs://b/estpipe-0.1.0.tar.gz']
    assert package['pythonModule'] == 'pipeline.cli'
    assert package['args'] == [
        'train', '/gcs/b/census.yaml', '--set', 'train.steps=100',
        '--set', 'train.distribution=parameter_server']
  # The example's run_dir and data are local: replicas could not reach them.
  assert 'run_dir is local' in caplog.text


def test_emit_vertex_yaml_without_ps_is_multi_worker(tmp_path):
  out = tmp_path / 'job.yaml'
  assert cli.main([
      'cluster', os.path.join(EXAMPLES, 'census.yaml'), '--workers', '0',
      '--ps', '0', '--emit', 'vertex', '--out', str(out),
      '--package_uri', 'gs://b/e.tar.gz', '--config_uri', 'gs://b/c.yaml',
      '--set', 'run_dir=gs://b/run', '--set', 'data.train=gs://b/t.csv',
      '--set', 'data.eval=gs://b/e.csv']) == 0
  pools = yaml.safe_load(out.read_text())['workerPoolSpecs']
  # Unused pools stay in place, empty, so the evaluator is still the fourth.
  assert pools[1] == {} and pools[2] == {}
  assert pools[3]['replicaCount'] == 1
  assert pools[0]['pythonPackageSpec']['args'][-1] == (
      'train.distribution=multi_worker_mirrored')


@pytest.mark.parametrize('flags, message', [
    (['--ps', '0', '--set', 'train.distribution=parameter_server'],
     'makes a multi_worker_mirrored cluster'),
    (['--workers', '-1'], 'must be 0 or more'),
    (['--emit', 'vertex'], 'needs --package_uri'),
    (['--emit', 'vertex', '--package_uri', '/tmp/e.tar.gz'], 'gs:// path'),
])
def test_bad_cluster_flags_are_one_line_errors(flags, message, capsys):
  assert cli.main(['cluster', os.path.join(EXAMPLES, 'census.yaml'),
                   *flags]) == 1
  err = capsys.readouterr().err
  assert err.startswith('estpipe: error: ') and message in err, err


# The launcher alone, with a stand-in for `estpipe train` (no TensorFlow):
# each task acts by its TF_CONFIG role as the script below says.

FAKE_TASK = '''
import json, os, sys, time
task = json.loads(os.environ['TF_CONFIG'])['task']
role = task['type'] + str(task['index'])
print('hello from', role, flush=True)
exits = json.loads(sys.argv[1])
if role in exits:
  time.sleep(exits[role][1])
  sys.exit(exits[role][0])
time.sleep(3600)  # a ps task, or one told to hang
'''


def fake_command(**exits):
  """role -> (exit status, after seconds); roles not named never exit."""
  return [sys.executable, '-c', FAKE_TASK, json.dumps(exits)]


def run_fake(workers, ps, **kwargs):
  lines = []
  outcome = cluster.run(
      fake_command(**kwargs.pop('exits')), workers, ps,
      on_line=lambda name, line: lines.append(f'[{name}] {line}'), **kwargs)
  return outcome, lines


def test_done_when_chief_and_evaluator_finish_then_ps_is_stopped():
  outcome, lines = run_fake(2, 1, exits={
      'chief0': (0, 0), 'worker0': (0, 0), 'worker1': (0, 0.5),
      'evaluator0': (0, 1)})
  assert outcome.code == 0, outcome
  assert outcome.returncodes == {'chief0': 0, 'worker0': 0, 'worker1': 0,
                                 'ps0': None, 'evaluator0': 0}
  assert sorted(lines) == sorted(
      f'[{name}] hello from {name}\n'
      for name in ('chief0', 'worker0', 'worker1', 'ps0', 'evaluator0'))


def test_the_failing_task_s_status_is_the_outcome():
  outcome, _ = run_fake(1, 1, exits={'chief0': (0, 5), 'worker0': (3, 0)})
  assert (outcome.code, outcome.failed) == (3, 'worker0')
  assert 'worker0 exited with status 3' in outcome.message


def test_a_ps_task_that_exits_is_a_failure():
  outcome, _ = run_fake(0, 1, exits={'ps0': (0, 0)})
  assert (outcome.code, outcome.failed) == (1, 'ps0')


def test_the_evaluator_gets_a_timeout_after_the_chief():
  outcome, _ = run_fake(0, 0, exits={'chief0': (0, 0)},
                        evaluator_timeout=1)
  assert outcome.code == 1
  assert 'evaluator0 did not finish within 1s' in outcome.message


LAUNCHER = '''
import logging, sys
from estimators import cluster
logging.basicConfig(level=logging.INFO)  # the `started TASK (pid N)` lines
cluster.run(sys.argv[1:], 1, 1)
'''


def test_tasks_die_with_a_killed_launcher():
  proc = subprocess.Popen(
      [sys.executable, '-c', LAUNCHER, *fake_command()], cwd=ROOT,
      env=cli_env(), stderr=subprocess.PIPE, text=True)
  seen = ''
  try:
    while seen.count('hello from') < 4:
      line = proc.stderr.readline()
      assert line, seen
      seen += line
    proc.kill()  # SIGKILL: the launcher cannot stop anything itself
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  pids = started_pids(seen)
  deadline = time.monotonic() + 10
  while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
    time.sleep(0.1)
  try:
    assert_none_alive(pids)
  finally:
    for pid in pids.values():  # even when the test fails, leave none
      if alive(pid):
        os.killpg(pid, signal.SIGKILL)
