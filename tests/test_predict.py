"""`estpipe predict`: Beam batch prediction over raw Census rows."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

# pylint: disable=g-import-not-at-top,redefined-outer-name
from pipeline import cli
from serving import predict
from serving import raw_examples
from tests import serving_helpers

BAD_LINE = '39,State-gov,not-a-number,Bachelors'


@pytest.fixture(scope='module')
def census_export(census_run, tmp_path_factory):
  return serving_helpers.trained_export(census_run, tmp_path_factory)


def _serving_answers(config, path, rows):
  """The exported predict signature called in process: {line: probs}."""
  parser = raw_examples.row_parser(config)
  loaded = tf.saved_model.load(path)
  answers = {}
  for start in range(0, len(rows), 2048):
    chunk = rows[start:start + 2048]
    out = loaded.signatures['predict'](examples=tf.constant(
        [raw_examples.to_example(parser, v) for _, v in chunk]))
    for (line, _), probs in zip(chunk, out['probabilities'].numpy()):
      answers[line] = probs
  return answers


def test_predict_census_eval_matches_serving(census_export, tmp_path, capsys):
  config, path = census_export
  source = config.data.eval_patterns[0]
  data = str(tmp_path / 'eval.csv')
  shutil.copy(source, data)
  with open(data, 'a') as f:
    f.write(BAD_LINE + '\n')
  output = str(tmp_path / 'out' / 'predictions.jsonl')
  code = cli.main(['predict', config.source, '--set',
                   f'run_dir={config.run_dir}', '--input', data,
                   '--output', output])
  out = capsys.readouterr()
  assert code == 0, out.err
  summary = json.loads(out.out)
  _, good = serving_helpers.census_eval_rows(config)
  assert summary['read'] == len(good) + 1
  assert summary['rejected'] == 1
  with open(output) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == len(good) == summary['written']
  lines = {int(r['key'].rsplit(':', 1)[1]): r for r in records}
  assert len(lines) == len(records), 'keys are unique'
  assert all(r['key'].startswith(data + ':') for r in records)
  expected = _serving_answers(config, path, good)
  assert set(lines) == set(expected)
  np.testing.assert_allclose(
      [lines[n]['probabilities'] for n in sorted(expected)],
      [expected[n] for n in sorted(expected)], rtol=1e-6, atol=1e-7)
  assert {r['classes'] for r in records} <= set(config.label.vocabulary)
  with open(predict.rejects_path(output)) as f:
    rejects = [json.loads(line) for line in f]
  assert len(rejects) == 1
  assert rejects[0]['raw'] == BAD_LINE
  assert rejects[0]['line'] == len(good) + 1
  assert 'expected 15 columns' in rejects[0]['reason']
  assert sorted(os.listdir(os.path.dirname(output))) == [
      'predictions.jsonl', 'predictions.jsonl.rejects.jsonl']


def test_predict_csv_output_multi_processing(census_export, tmp_path, capsys):
  """Workers in other processes: everything they run is importable."""
  config, path = census_export
  data = str(tmp_path / 'head.csv')
  with open(config.data.eval_patterns[0]) as src, open(data, 'w') as dst:
    dst.writelines(line for _, line in zip(range(300), src))
  output = str(tmp_path / 'predictions.csv')
  code = cli.main(['predict', config.source, '--set',
                   f'run_dir={config.run_dir}', '--input', data,
                   '--output', output, '--direct_running_mode',
                   'multi_processing', '--direct_num_workers', '2'])
  assert code == 0, capsys.readouterr().err
  with open(output, newline='') as f:
    table = list(csv.DictReader(f))
  assert len(table) == 300
  _, good = serving_helpers.census_eval_rows(config, limit=300)
  expected = _serving_answers(config, path, good)
  got = {int(r['key'].rsplit(':', 1)[1]): float(r['probabilities_1'])
         for r in table}
  np.testing.assert_allclose([got[n] for n in sorted(expected)],
                             [expected[n][1] for n in sorted(expected)],
                             rtol=1e-6, atol=1e-7)


def test_predict_rejects_too_many_bad_rows(census_export, tmp_path, capsys):
  config, _ = census_export
  data = str(tmp_path / 'bad.csv')
  with open(config.data.eval_patterns[0]) as src, open(data, 'w') as dst:
    dst.writelines(line for _, line in zip(range(20), src))
    dst.write(BAD_LINE + '\n')
  output = str(tmp_path / 'predictions.jsonl')
  code = cli.main(['predict', config.source, '--set',
                   f'run_dir={config.run_dir}', '--input', data,
                   '--output', output])
  assert code == 1
  assert '1 of 21 rows rejected' in capsys.readouterr().err
  assert not os.path.exists(output)
  assert os.path.exists(predict.rejects_path(output))


def test_failed_job_leaves_nothing_beside_the_output(census_export, tmp_path):
  """A job that fails midway leaves no output and no Beam temp folders."""
  config, path = census_export
  # Beam reads a .gz name compressed: this plain text fails in the job.
  data = str(tmp_path / 'eval.csv.gz')
  with open(config.data.eval_patterns[0]) as src, open(data, 'w') as dst:
    dst.writelines(line for _, line in zip(range(20), src))
  out_dir = tmp_path / 'out'
  out_dir.mkdir()
  with pytest.raises(Exception) as failure:
    predict.predict(config, path, data, str(out_dir / 'predictions.jsonl'))
  assert 'ParseRaw' in str(failure.value), 'failed midway, in the job'
  assert os.listdir(out_dir) == []


@pytest.mark.slow
def test_predict_on_a_job_service_matches_the_direct_runner(
    census_export, job_service, tmp_path, capsys):
  """Workers of an external pool: the same predictions and rejects."""
  config, _ = census_export
  data = str(tmp_path / 'head.csv')
  with open(config.data.eval_patterns[0]) as src, open(data, 'w') as dst:
    dst.writelines(line for _, line in zip(range(200), src))
    dst.write(BAD_LINE + '\n')
  outputs = {}
  for name, flags in (('direct', []), ('portable', job_service)):
    outputs[name] = str(tmp_path / name / 'predictions.jsonl')
    code = cli.main(['predict', config.source, '--set',
                     f'run_dir={config.run_dir}', '--input', data,
                     '--output', outputs[name], *flags])
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads(out.out)
  assert summary['runner'] == 'PortableRunner'
  assert (summary['read'], summary['rejected']) == (201, 1)
  direct, portable = (_by_key(outputs[name]) for name in outputs)
  assert set(direct) == set(portable) and len(direct) == 200
  for key, record in direct.items():
    # RunInference batches differ between runners: floats to rounding.
    assert record['classes'] == portable[key]['classes']
    np.testing.assert_allclose(record['probabilities'],
                               portable[key]['probabilities'], rtol=1e-5)
  with open(predict.rejects_path(outputs['direct'])) as f, open(
      predict.rejects_path(outputs['portable'])) as g:
    assert f.read() == g.read()


def _by_key(path):
  with open(path) as f:
    return {r['key']: r for r in map(json.loads, f)}


# --- predict.key_column: a key column of the data carried to the output ----

def _key_config(tmp_path, rows, key_column='id'):
  """A config over the tiny classifier's features (x, c) and a CSV."""
  import yaml  # pylint: disable=g-import-not-at-top
  data = tmp_path / 'rows.csv'
  data.write_text('id,x,c,label\n' + ''.join(f'{r}\n' for r in rows))
  tree = {'run_dir': str(tmp_path / 'run'),
          'data': {'train': str(data), 'header': True},
          'features': [{'name': 'x', 'type': 'float'},
                       {'name': 'c', 'type': 'string'}],
          'label': {'name': 'label', 'values': ['no', 'yes']},
          'preprocessing': {'max_reject_fraction': 0.5},
          'predict': {'key_column': key_column}}
  path = tmp_path / 'config.yaml'
  path.write_text(yaml.safe_dump(tree))
  return str(path), str(data)


def test_key_column_keys_each_prediction(exports, tmp_path, capsys):
  rows = ['id-7,0.5,a,yes', 'id-3,0.1,b,no', ',0.2,c,no', 'id-9,0.9,d,yes']
  config_path, data = _key_config(tmp_path, rows)
  output = str(tmp_path / 'out.jsonl')
  code = cli.main(['predict', config_path, '--input', data, '--output',
                   output, '--export_path', exports['classifier']])
  out = capsys.readouterr()
  assert code == 0, out.err
  summary = json.loads(out.out)
  assert (summary['read'], summary['rejected'], summary['written']) == (
      4, 1, 3)
  with open(output) as f:
    keys = sorted(json.loads(line)['key'] for line in f)
  assert keys == ['id-3', 'id-7', 'id-9']
  with open(predict.rejects_path(output)) as f:
    (reject,) = [json.loads(line) for line in f]
  assert reject['reason'] == "key column 'id' is empty"
  assert reject['field'] == 'id' and reject['line'] == 4


def test_key_column_must_be_a_column_of_the_data(tmp_path):
  from pipeline.config import load_config  # pylint: disable=g-import-not-at-top
  from pipeline.errors import ConfigError  # pylint: disable=g-import-not-at-top
  config_path, _ = _key_config(tmp_path, ['a,0.5,a,yes'], key_column='row_id')
  with pytest.raises(ConfigError) as e:
    load_config(config_path)
  assert e.value.path == 'predict.key_column'
  assert "'row_id' is not a column of the data" in str(e.value)


def test_key_column_of_tf_examples():
  from pipeline.config import config_from_dict  # pylint: disable=g-import-not-at-top
  from preprocessing import rows as rows_lib  # pylint: disable=g-import-not-at-top
  config = config_from_dict({
      'run_dir': '/unused', 'data': {'train': 'x', 'format': 'tfrecord'},
      'features': [{'name': 'x', 'type': 'float'}],
      'label': {'name': 'label', 'values': ['no', 'yes']}},
                            check_columns=False)
  parser = raw_examples.row_parser(config, key_column='id')

  def example(**features):
    return tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
        if isinstance(v, bytes) else
        tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
        for k, v in features.items()})).SerializeToString()

  assert parser.parse_example(example(x=1.5, id=b'k1')) == [1.5, 'k1']
  for record in (example(x=1.5), example(x=1.5, id=b' ')):
    with pytest.raises(rows_lib.Reject, match="key column 'id' is empty"):
      parser.parse_example(record)
