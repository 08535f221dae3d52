"""`estpipe run`: the run record, skipping what is done, redoing what changed,
failing stages and incompatible models, on small synthetic data.

The tests share one run directory and follow each other in file order, as a
user's successive runs would; each asserts the state it starts from.
"""

import json
import os
import pathlib

import pytest

from pipeline import cli
from pipeline import runs
from pipeline import synthetic
from tests.conftest import EXAMPLES

CONFIG = os.path.join(EXAMPLES, 'synthetic.yaml')
STAGES = ['preprocess', 'train', 'evaluate', 'export', 'verify-export']


class RunFolder(type(pathlib.Path())):
  """The module's run directory, which knows the overrides that name it."""

  def estpipe(self, command, *args):
    """One estpipe command (in process) on this run directory: exit code."""
    return cli.main([command, CONFIG, '--set', f'run_dir={self}',
                     '--set', f'data.train={self.parent}/data/data-*.csv',
                     '--set', 'train.steps=40', *args])


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A run directory after one complete `estpipe run`."""
  work = tmp_path_factory.mktemp('estpipe_run')
  synthetic.write_csv(str(work / 'data'), 2000, seed=1)
  path = RunFolder(work / 'run')
  assert path.estpipe('run') == 0
  return path


def record(run_dir):
  with open(run_dir / 'run.json') as f:
    return json.load(f)


def statuses(run_dir):
  return {s['name']: s['status'] for s in record(run_dir)['stages']}


def versions(run_dir):
  return sorted(int(v) for v in os.listdir(run_dir / 'export') if v.isdigit())


@pytest.mark.slow
def test_a_run_records_config_inputs_stages_metrics_and_export(run_dir):
  rec = record(run_dir)
  assert rec['status'] == 'succeeded'
  assert [s['name'] for s in rec['stages']] == STAGES
  stages = {s['name']: s for s in rec['stages']}
  # Training exported its final checkpoint: no second export of it.
  assert stages['export']['status'] == 'skipped'
  assert 'exported already' in stages['export']['reason']
  for name in ('preprocess', 'train', 'evaluate', 'verify-export'):
    stage = stages[name]
    assert stage['status'] == 'succeeded', stage
    assert stage['duration_s'] >= 0 and stage['start'] <= stage['end']
    assert os.path.getsize(stage['log']) > 0
    assert stage['log'] == str(run_dir / 'logs' / f'{name}.log')
  assert stages['train']['outputs']['global_step'] == 40
  assert rec['config']['train']['steps'] == 40  # as resolved, after --set
  (data,) = rec['inputs']
  assert data['size'] == os.path.getsize(data['path']) and data['sha256']
  assert rec['libraries']['tensorflow'].startswith('2.15')
  assert rec['runner']['runner'] == 'DirectRunner'
  assert 0.0 <= rec['metrics']['accuracy'] <= 1.0
  assert versions(run_dir) == [rec['export_version']]


@pytest.mark.slow
def test_a_rerun_skips_every_stage_and_exports_nothing(run_dir, caplog):
  before = versions(run_dir)
  assert run_dir.estpipe('run') == 0
  assert set(statuses(run_dir).values()) == {'skipped'}
  assert '=== train: skipped (unchanged; outputs complete)' in caplog.text
  assert versions(run_dir) == before


@pytest.mark.slow
def test_a_failing_stage_stops_the_run_and_keeps_earlier_outputs(
    run_dir, tmp_path, capsys):
  checkpoint = record(run_dir)['stages'][1]['outputs']['checkpoint']
  before = versions(run_dir)
  empty = tmp_path / 'no-model'
  empty.mkdir()
  assert run_dir.estpipe('run',
                 '--set', f'train.warm_start_from={empty}') == 1
  err = capsys.readouterr().err.strip()
  log = run_dir / 'logs' / 'train.log'
  assert err == (f'estpipe: error: stage train failed: train.warm_start_from:'
                 f' no checkpoint in {empty} (log: {log})')
  assert 'Traceback' in log.read_text()
  rec = record(run_dir)
  assert rec['status'] == 'failed' and rec['failed_stage'] == 'train'
  assert statuses(run_dir)['train'] == 'failed'
  assert statuses(run_dir)['preprocess'] == 'skipped'
  assert (run_dir / 'preprocess.json').exists()
  assert os.path.exists(checkpoint + '.index')
  assert versions(run_dir) == before


@pytest.mark.slow
def test_another_model_type_is_a_clear_error_until_forced(run_dir, capsys):
  old_versions = versions(run_dir)
  assert run_dir.estpipe('train', '--set', 'model.type=dnn') == 1
  err = capsys.readouterr().err
  assert 'model.type: wide_deep -> dnn' in err
  assert '--force train' in err and 'Traceback' not in err
  assert run_dir.estpipe('run', '--set', 'model.type=dnn') == 1
  err = capsys.readouterr().err
  assert err.startswith('estpipe: error: stage train failed: ')
  assert 'model.type: wide_deep -> dnn' in err and err.count('\n') == 1

  assert run_dir.estpipe('run', '--set', 'model.type=dnn',
                 '--force', 'train') == 0
  stages = {s['name']: s for s in record(run_dir)['stages']}
  assert stages['train']['started_afresh']
  assert stages['preprocess']['status'] == 'skipped'
  with open(run_dir / 'metrics.json') as f:
    assert json.load(f)['model_type'] == 'dnn'
  # The new model's export is the newest version; the old ones stay.
  assert versions(run_dir)[:-1] == old_versions
  assert record(run_dir)['export_version'] == versions(run_dir)[-1]
  assert stages['verify-export']['status'] == 'succeeded'


@pytest.mark.slow
def test_a_changed_transform_redoes_preprocessing_and_every_later_stage(
    run_dir):
  before = versions(run_dir)
  assert run_dir.estpipe('run', '--set', 'features.age.transform=log') == 0
  assert statuses(run_dir) == {
      'preprocess': 'succeeded', 'train': 'succeeded',
      'evaluate': 'succeeded', 'export': 'skipped',
      'verify-export': 'succeeded'}
  train = record(run_dir)['stages'][1]
  # The model of the old transform is not resumed: training starts afresh.
  assert train['started_afresh'] and train['outputs']['global_step'] == 40
  assert versions(run_dir)[-1] > before[-1]


# --- the decisions alone (no TensorFlow, no data) -------------------------------

def _stage(current=None):
  return runs.Stage('train', run=None, sections=('train',), current=current)


def test_skip_only_what_is_unchanged_complete_and_done():
  done = {'status': 'succeeded', 'fingerprint': 'f1'}
  outputs = {'checkpoint': 'model.ckpt-40'}
  skip = runs.skip_reason
  assert skip(_stage(), outputs, 'f1', done, False, False) == (
      'unchanged; outputs complete')
  assert skip(_stage(), outputs, 'f2', done, False, False) is None  # changed
  assert skip(_stage(), None, 'f1', done, False, False) is None  # incomplete
  assert skip(_stage(), outputs, 'f1', dict(done, status='failed'), False,
              False) is None
  assert skip(_stage(), outputs, 'f1', None, False, False) is None
  assert skip(_stage(), outputs, 'f1', done, True, False) is None  # forced
  assert skip(_stage(), outputs, 'f1', done, False, True) is None  # upstream
  # Outputs current by themselves survive upstream work, not --force.
  current = _stage(current=lambda o: 'exported already')
  assert skip(current, outputs, 'f2', None, False, True) == 'exported already'
  assert skip(current, outputs, 'f1', done, True, False) is None


def test_a_model_starts_afresh_when_forced_or_its_inputs_changed():
  previous = {'upstream': 'p1'}
  assert runs.must_start_afresh(True, previous, 'p1')
  assert runs.must_start_afresh(False, previous, 'p2')
  assert not runs.must_start_afresh(False, previous, 'p1')
  assert not runs.must_start_afresh(False, None, 'p1')  # unknown: resume


def test_stages_a_failed_run_did_not_reach_keep_their_record(tmp_path):
  trained = {'name': 'train', 'status': 'succeeded', 'fingerprint': 'f1',
             'upstream': 'p1'}
  record = {'stages': [
      {'name': 'preprocess', 'status': 'failed', 'fingerprint': 'p2'},
      {'name': 'train', 'status': 'pending', 'previous': trained},
      {'name': 'evaluate', 'status': 'pending'}]}
  (tmp_path / 'run.json').write_text(json.dumps(record))
  previous = runs.previous_stages(str(tmp_path / 'run.json'))
  assert previous == {'preprocess': record['stages'][0], 'train': trained}
  (tmp_path / 'run.json').write_text('{"stages": [')  # unreadable: no record
  assert runs.previous_stages(str(tmp_path / 'run.json')) == {}
