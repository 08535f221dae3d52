"""The README's main job: generate-data, then `estpipe run`, on a fresh run
directory, through the installed command line."""

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def estpipe(*args, timeout=900):
  proc = subprocess.run([sys.executable, '-m', 'pipeline.cli', *args],
                        capture_output=True, text=True, timeout=timeout,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.mark.slow
def test_generate_data_then_run_every_stage(tmp_path):
  data = tmp_path / 'data'
  run_dir = tmp_path / 'run'
  estpipe('generate-data', '--rows', '4000', '--out', str(data))
  sets = ['--set', f'data.train={data}/data-*.csv', '--set',
          f'run_dir={run_dir}', '--set', 'train.steps=300']
  proc = estpipe('run', os.path.join(ROOT, 'examples', 'synthetic.yaml'),
                 *sets)
  # Progress is reported stage by stage.
  for words in ('=== preprocess', 'analysis done', 'train split written',
                '=== train', '=== export'):
    assert words in proc.stderr, words

  stages = [json.loads(line) for line in open(run_dir / 'history.jsonl')]
  succeeded = [s['stage'] for s in stages if s['status'] == 'succeeded']
  assert succeeded[:2] == ['preprocess', 'train']

  summary = json.load(open(run_dir / 'preprocess.json'))
  written = sum(s['written'] for s in summary['splits'].values())
  assert written == 4000

  metrics = json.load(open(run_dir / 'metrics.json'))
  assert metrics['global_step'] >= 300
  labels = [line.rstrip('\n').split(',')[-1]
            for line in open(glob.glob(f'{data}/*.csv')[0])][1:]
  majority = max(labels.count('yes'), labels.count('no')) / len(labels)
  assert metrics['metrics']['accuracy'] > majority + 0.02

  versions = [d for d in os.listdir(run_dir / 'export') if d.isdigit()]
  assert versions
  assert os.path.exists(run_dir / 'export' / versions[0] / 'saved_model.pb')

  # The run checked the export against the Estimator on raw rows (no skew).
  record = json.load(open(run_dir / 'run.json'))
  statuses = {s['name']: s['status'] for s in record['stages']}
  assert statuses['verify-export'] == 'succeeded', statuses
