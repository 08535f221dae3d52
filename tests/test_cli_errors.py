"""What a new user hits first: one `estpipe: error:` line, never a traceback."""

import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import EXAMPLES, ROOT


def _estpipe(*argv, timeout=120):
  env = dict(os.environ, PYTHONPATH=ROOT)
  try:
    return subprocess.run([sys.executable, '-m', 'pipeline.cli', *argv],
                          capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f'estpipe {" ".join(argv)} still running after {timeout} s: '
                f'{e.stderr}')


def _one_error_line(proc):
  assert proc.returncode == 1, proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('estpipe: error: ')]
  assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr
  return errors[0]


def _unwritable(tmp_path):
  """A run_dir this process may not create (root ignores file modes)."""
  if os.getuid() != 0:
    parent = tmp_path / 'read-only'
    parent.mkdir()
    parent.chmod(0o500)
    return str(parent / 'run')
  path = '/sys/estpipe-unwritable-run'
  try:
    os.makedirs(path)
  except PermissionError:
    return path
  os.rmdir(path)
  pytest.skip('no unwritable folder for root here')


@pytest.mark.parametrize('command', ['preprocess', 'train', 'run'])
def test_unwritable_run_dir_is_one_line_naming_it(command, synthetic_csv,
                                                  tmp_path):
  run_dir = _unwritable(tmp_path)
  proc = _estpipe(command, os.path.join(EXAMPLES, 'synthetic.yaml'),
                  '--set', f'run_dir={run_dir}',
                  '--set', f'data.train={synthetic_csv}/data-*.csv')
  line = _one_error_line(proc)
  assert line.startswith(f'estpipe: error: cannot access {run_dir}'), line


@pytest.fixture
def port_in_use():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    s.listen()
    yield s.getsockname()[1]


@pytest.mark.parametrize('what, flags', [
    ('gRPC', lambda port: ['--port', str(port), '--rest_api_port', '0']),
    ('REST', lambda port: ['--port', '0', '--rest_api_port', str(port)]),
])
def test_serve_on_a_port_in_use_is_one_line_naming_it(what, flags,
                                                      port_in_use, tmp_path):
  base = tmp_path / 'models'
  base.mkdir()
  proc = _estpipe('serve', '--model_base_path', str(base), '--model_name',
                  'm', '--file_system_poll_wait_seconds', '0',
                  *flags(port_in_use), timeout=60)
  line = _one_error_line(proc)
  assert f'{what} port {port_in_use} on 127.0.0.1 is already in use' in line


def test_serve_bind_error_after_the_check_names_the_port():
  from serving import commands  # pylint: disable=g-import-not-at-top
  ports = [('gRPC', '127.0.0.1', 8500), ('REST', '127.0.0.1', 8501)]
  grpc_error = RuntimeError('Failed to bind to address 127.0.0.1:8500; set '
                            'GRPC_VERBOSITY=debug environment variable to '
                            'see detailed error message.')
  assert commands._bind_error(grpc_error, ports) == (  # pylint: disable=protected-access
      'cannot start the server: gRPC port 8500 on 127.0.0.1 is not available '
      '(Failed to bind to address 127.0.0.1:8500)')
  rest_error = OSError(98, "error while attempting to bind on address "
                       "('127.0.0.1', 8501): address already in use")
  assert 'REST port 8501' in commands._bind_error(rest_error, ports)  # pylint: disable=protected-access


# --- a run that succeeds with rejects says where they are -----------------

_SPLITS = {'train': {'read': 100, 'written': 97, 'rejected': 3},
           'eval': {'read': 50, 'written': 49, 'rejected': 1}}


def test_preprocess_log_names_the_rejects(caplog):
  from preprocessing import run  # pylint: disable=g-import-not-at-top
  caplog.set_level('INFO', logger='estpipe')
  run._log_summary({'splits': _SPLITS, 'wall_seconds': 1.0,  # pylint: disable=protected-access
                    'runner': 'DirectRunner',
                    'rejects_path': '/r/rejects'}, '/r/rejects')
  assert '4 of 150 rows rejected (reasons in /r/rejects)' in caplog.text


def test_run_summary_names_the_rejects(tmp_path):
  from pipeline import commands  # pylint: disable=g-import-not-at-top
  from pipeline.rundir import RunDir  # pylint: disable=g-import-not-at-top

  class Config:
    rundir = RunDir(str(tmp_path))
  record = {'stages': [{'name': 'preprocess', 'status': 'skipped',
                        'outputs': {'splits': _SPLITS}},
                       {'name': 'train', 'status': 'succeeded'}]}
  assert commands._rejects(record, Config) == (  # pylint: disable=protected-access
      f'4 of 150 rows rejected (reasons in {tmp_path}/rejects)')
  record['stages'][0]['outputs']['splits'] = {
      'train': {'read': 10, 'written': 10, 'rejected': 0}}
  assert commands._rejects(record, Config) is None  # pylint: disable=protected-access


def test_predict_log_names_the_rejects(synthetic_csv, tmp_path, monkeypatch,
                                       caplog, capsys):
  from pipeline import cli  # pylint: disable=g-import-not-at-top
  from serving import predict  # pylint: disable=g-import-not-at-top
  export = tmp_path / 'export'
  export.mkdir()
  (export / 'saved_model.pb').write_bytes(b'')
  output = str(tmp_path / 'out.jsonl')
  monkeypatch.setattr(predict, 'predict', lambda *a, **k: {
      'read': 20, 'rejected': 2, 'written': 18, 'output': output,
      'rejects': predict.rejects_path(output)})
  code = cli.main(['predict', os.path.join(EXAMPLES, 'synthetic.yaml'),
                   '--set', f'data.train={synthetic_csv}/data-*.csv',
                   '--input', 'in.csv', '--output', output,
                   '--export_path', str(export)])
  assert code == 0, capsys.readouterr().err
  assert (f'2 of 20 rows rejected (reasons in {output}.rejects.jsonl)'
          in caplog.text)
