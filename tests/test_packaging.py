"""setup.py installs the four packages and works as Beam's --setup_file."""

import subprocess
import sys
import tarfile

from tests.conftest import ROOT


def test_setup_file_builds_an_sdist_with_every_package(tmp_path):
  # Beam stages a --setup_file by running `setup.py sdist` and installs the
  # result on each worker.
  proc = subprocess.run(
      [sys.executable, 'setup.py', '-q', 'sdist', '--dist-dir',
       str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  (sdist,) = tmp_path.glob('estpipe-*.tar.gz')
  names = tarfile.open(sdist).getnames()
  for module in ('pipeline/config.py', 'pipeline/cli.py',
                 'preprocessing/beam_pipeline.py', 'preprocessing/rows.py',
                 'estimators/__init__.py', 'serving/__init__.py'):
    assert any(n.endswith(module) for n in names), module


def test_console_script_is_installed():
  proc = subprocess.run(['estpipe', '--help'], capture_output=True,
                        text=True, timeout=120,
                        env={'PATH': f'{sys.prefix}/bin'})
  assert proc.returncode == 0, proc.stderr
  for command in ('preprocess', 'generate-data', 'run'):
    assert command in proc.stdout
