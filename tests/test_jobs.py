"""Jobs that run without estpipe: detached on a Beam job service with an
external worker pool, `estpipe jobs`, and the offline Dataflow job build."""

import json
import os
import subprocess
import time

import pytest
from apache_beam.portability.api import beam_runner_api_pb2

from pipeline import cli
from pipeline import runrecord
from tests.conftest import ROOT, example_config
from tests.test_preprocess_synthetic import _preprocess_command, _records


def _jobs(capsys, *args):
  """`estpipe jobs ...` in process: (exit code, stdout lines)."""
  code = cli.main(['jobs', *args])
  out = capsys.readouterr()
  return code, out.out.splitlines(), out.err


def _detach(run_dirs, synthetic_csv, job_service):
  """Submits preprocessing jobs (at once) with --detach; their ids."""
  procs = [subprocess.Popen(
      _preprocess_command(run_dir, synthetic_csv, *job_service, '--detach'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
           for run_dir in run_dirs]
  ids = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    job_id = out.splitlines()[-1]
    assert job_id.startswith('job-') and ' ' not in job_id, out
    ids.append(job_id)
  return ids


def _wait_for(condition, seconds, what):
  deadline = time.time() + seconds
  while not condition():
    assert time.time() < deadline, f'timed out waiting for {what}'
    time.sleep(1)


def _statuses(config):
  with open(config.rundir.history) as f:
    return [json.loads(line)['status'] for line in f]


@pytest.mark.slow
def test_detached_jobs_publish_or_cancel(synthetic_run, synthetic_csv,
                                         job_service, tmp_path, capsys):
  endpoint = [a for a in job_service if a.startswith('--job_endpoint')][0]
  done = example_config('synthetic', tmp_path / 'done',
                        f'data.train={synthetic_csv}/data-*.csv')
  cancelled = example_config('synthetic', tmp_path / 'cancelled',
                             f'data.train={synthetic_csv}/data-*.csv')
  first, second = _detach([done.run_dir, cancelled.run_dir], synthetic_csv,
                          job_service)
  # The client has gone; the jobs go on in the worker pool.
  code, lines, err = _jobs(capsys, 'cancel', second, endpoint)
  assert code == 0 and lines[-1] == 'CANCELLED', err
  assert _jobs(capsys, 'status', second, endpoint)[1][-1] == 'CANCELLED'
  code, lines, _ = _jobs(capsys, 'list', endpoint)
  assert {line.split()[0] for line in lines} >= {first, second}

  def state():
    code, lines, err = _jobs(capsys, 'status', first, endpoint)
    assert code == 0, err
    assert lines[-1] in ('STARTING', 'RUNNING', 'DONE'), lines
    return lines[-1]
  _wait_for(lambda: state() == 'DONE', 300, 'the detached job')
  code, lines, _ = _jobs(capsys, 'logs', first, endpoint)
  assert code == 0 and lines[-1] == 'state: DONE', lines
  summary = runrecord.read_json(done.rundir.preprocess_summary)
  assert summary['runner'] == 'PortableRunner'
  assert _records(done) == _records(synthetic_run)
  assert _statuses(done) == ['submitted', 'succeeded']
  assert not os.path.exists(done.rundir.staging)
  # Beam's Python job service only marks a job CANCELLED and lets it run
  # on: the job's publishing step sees the cancellation.
  _wait_for(lambda: _statuses(cancelled)[-1] == 'cancelled', 300,
            'the cancelled job to stop')
  assert sorted(os.listdir(cancelled.run_dir)) == ['history.jsonl']


def test_jobs_against_a_dead_endpoint_fail_fast(capsys):
  from tests.conftest import free_port  # pylint: disable=g-import-not-at-top
  address = f'127.0.0.1:{free_port()}'
  start = time.time()
  code, _, err = _jobs(capsys, 'status', 'job-1', '--job_endpoint', address)
  assert time.time() - start < 10
  assert code == 1
  assert err.startswith('estpipe: error: nothing answers at ' + address)


def _dataflow_flags(out):
  return ['--runner=DataflowRunner', f'--template_location={out}/job.json',
          f'--temp_location={out}/tmp', f'--staging_location={out}/staging',
          '--no_auth', '--dataflow_endpoint=http://localhost:1',
          '--project', 'p', '--region', 'r', '--setup_file=./setup.py']


@pytest.mark.slow
def test_offline_dataflow_job_build(synthetic_csv, tmp_path):
  out = tmp_path / 'dataflow'  # estpipe creates the local folders
  start = time.time()
  proc = subprocess.run(
      _preprocess_command(tmp_path / 'run', synthetic_csv,
                          *_dataflow_flags(out)),
      capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert time.time() - start < 60
  assert f'written to {out}/job.json' in proc.stdout
  request = json.loads((out / 'job.json').read_text())
  assert request['type'] == 'JOB_TYPE_BATCH'
  assert (out / 'staging' / 'workflow.tar.gz').exists()  # the package
  graph = beam_runner_api_pb2.Pipeline()
  graph.ParseFromString((out / 'staging' / 'pipeline.pb').read_bytes())
  names = {t.unique_name for t in graph.components.transforms.values()}
  assert {'Analyze', 'TransformTrain', 'TransformEval', 'Publish'} <= names
  assert not os.path.exists(tmp_path / 'run' / '.staging')


@pytest.mark.parametrize('flags, message', [
    (['--runner=DataflowRunner', '--project=p', '--region=r',
      '--temp_location=/tmp/x', '--setup_file=./setup.py'],
     '--temp_location=/tmp/x: Dataflow needs a gs:// location'),
    (['--runner=DataflowRunner', '--project=p', '--region=r',
      '--temp_location=gs://b/t'],
     'add --setup_file=./setup.py'),
    (['--detach'], '--detach needs a runner'),
    (['--runner=PortableRunner'], 'needs --job_endpoint'),
])
def test_runner_options_are_checked_first(synthetic_csv, tmp_path, capsys,
                                          flags, message):
  argv = _preprocess_command(tmp_path / 'run', synthetic_csv, *flags)[3:]
  assert cli.main(argv) == 1
  assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'run')
