"""Preprocessing on real data: counts, vocabularies, statistics, rejects."""

import collections
import csv
import glob
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from pipeline import errors
from pipeline import runrecord
from preprocessing import run as run_lib
from preprocessing import schema
from tests.conftest import example_config


def read_transformed(config, split):
  """All transformed records of a split, as {feature: numpy array}."""
  spec = tft.TFTransformOutput(config.rundir.transform).transformed_feature_spec()
  files = sorted(glob.glob(config.rundir.data_pattern(split)))
  assert files, f'no {split} files in {config.run_dir}'
  ds = tf.data.TFRecordDataset(files, compression_type='GZIP').batch(100000)
  columns = collections.defaultdict(list)
  for batch in ds:
    parsed = tf.io.parse_example(batch, spec)
    for name, value in parsed.items():
      if isinstance(value, tf.SparseTensor):
        value = tf.RaggedTensor.from_sparse(value).to_list()
      else:
        value = value.numpy().tolist()
      columns[name].extend(value)
  return columns


def raw_examples(config, csv_path, header=False):
  """Raw CSV rows -> serialized raw tf.Examples (features + label index)."""
  columns = config.data.columns
  label_index = {v: i for i, v in enumerate(config.label.values or [])}
  with open(csv_path, newline='') as f:
    reader = csv.reader(f)
    if header:
      columns = next(reader)
    rows = [dict(zip(columns, r)) for r in reader if r]
  examples = []
  for row in rows:
    feature = {}
    for f in config.features:
      text = row[f.name].strip()
      if text in config.data.missing:
        continue
      if f.type == 'integer':
        feature[f.name] = tf.train.Feature(
            int64_list=tf.train.Int64List(value=[int(float(text))]))
      elif f.type == 'float':
        feature[f.name] = tf.train.Feature(
            float_list=tf.train.FloatList(value=[float(text)]))
      else:
        feature[f.name] = tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[text.encode()]))
    if config.label.values:
      feature[config.label.name] = tf.train.Feature(
          int64_list=tf.train.Int64List(
              value=[label_index[row[config.label.name].strip()]]))
    examples.append(tf.train.Example(
        features=tf.train.Features(feature=feature)).SerializeToString())
  return rows, examples


def transform_in_tf(config, examples):
  """Applies the saved transform graph in TensorFlow to raw tf.Examples."""
  tft_output = tft.TFTransformOutput(config.rundir.transform)
  spec = schema.raw_feature_spec(config)
  if not config.label.values:
    spec.pop(config.label.name)
  parsed = tf.io.parse_example(tf.constant(examples), spec)
  layer = tft_output.transform_features_layer()
  out = layer(parsed)
  result = {}
  for name, value in out.items():
    if isinstance(value, tf.SparseTensor):
      result[name] = tf.RaggedTensor.from_sparse(value).to_list()
    else:
      result[name] = value.numpy().tolist()
  return result


def row_multiset(columns, names):
  def key(v):
    if isinstance(v, list):
      return tuple(key(x) for x in v)
    return round(v, 4) if isinstance(v, float) else v
  n = len(columns[names[0]])
  return collections.Counter(
      tuple(key(columns[name][i]) for name in names) for i in range(n))


# --- Census ------------------------------------------------------------------

def test_census_counts_and_no_rejects(census_run):
  summary = runrecord.read_json(census_run.rundir.preprocess_summary)
  assert summary['splits']['train'] == {'read': 32561, 'written': 32561,
                                        'rejected': 0}
  assert summary['splits']['eval'] == {'read': 16278, 'written': 16278,
                                       'rejected': 0}
  assert run_lib.read_rejects(census_run) == []
  assert len(read_transformed(census_run, 'train')['age']) == 32561
  assert len(read_transformed(census_run, 'eval')['age']) == 16278


def test_census_education_vocabulary(census_run, census_data):
  with open(census_data['train']) as f:
    expected = {line.split(',')[3].strip() for line in f if line.strip()}
  assert len(expected) == 16
  tft_output = tft.TFTransformOutput(census_run.rundir.transform)
  vocab = [v.decode() if isinstance(v, bytes) else v
           for v in tft_output.vocabulary_by_name('education')]
  assert sorted(vocab) == sorted(expected)
  domain = tft_output.transformed_metadata.schema
  education = [f for f in domain.feature if f.name == 'education'][0]
  assert education.int_domain.max == 16  # 16 values + 1 OOV bucket


def test_census_z_scored_age(census_run):
  age = np.array(read_transformed(census_run, 'train')['age'])
  assert abs(age.mean()) < 1e-3
  assert abs(age.std() - 1.0) < 1e-3


def test_census_graph_matches_tfrecords(census_run, census_data):
  """The saved transform graph on raw eval rows == the written TFRecords."""
  _, examples = raw_examples(census_run, census_data['eval'])
  in_tf = transform_in_tf(census_run, examples)
  written = read_transformed(census_run, 'eval')
  names = sorted(written)
  assert sorted(in_tf) == names
  assert row_multiset(in_tf, names) == row_multiset(written, names)


def test_census_missing_fill_with_most_frequent(census_run):
  """`?` in workclass is missing and gets the most frequent value's id."""
  config = census_run
  example = tf.train.Example()
  example.features.feature['age'].float_list.value.append(40.0)
  serialized = example.SerializeToString()
  out = transform_in_tf(config, [serialized])
  vocab = tft.TFTransformOutput(config.rundir.transform).vocabulary_by_name(
      'workclass')
  assert vocab[0] in (b'Private', 'Private')
  assert out['workclass'] == [0]


# --- Taxi --------------------------------------------------------------------

def test_taxi_every_row_survives(taxi_run):
  summary = runrecord.read_json(taxi_run.rundir.preprocess_summary)
  splits = summary['splits']
  assert splits['train']['rejected'] == splits['eval']['rejected'] == 0
  assert splits['train']['read'] + splits['eval']['read'] == 15002
  assert splits['train']['written'] + splits['eval']['written'] == 15002
  # The hash split puts about eval_fraction of the rows in eval.
  assert 0.17 < splits['eval']['written'] / 15002 < 0.23


def test_taxi_missing_values_get_defaults(taxi_run, taxi_data):
  config = taxi_run
  rows, examples = raw_examples(config, taxi_data, header=True)
  out = transform_in_tf(config, examples)
  missing_seconds = [i for i, r in enumerate(rows) if r['trip_seconds'] == '']
  missing_area = [i for i, r in enumerate(rows)
                  if r['pickup_community_area'] == '']
  missing_company = [i for i, r in enumerate(rows) if r['company'] == '']
  assert len(missing_seconds) == 6 and len(missing_area) == 2
  assert len(missing_company) == 5140
  # mean default: a z-scored mean is 0.
  for i in missing_seconds:
    assert abs(out['trip_seconds'][i]) < 1e-4
  # constant default -1, hashed like any value.
  minus_one = tf.strings.to_hash_bucket_fast(['-1'], 100).numpy()[0]
  assert {out['pickup_community_area'][i] for i in missing_area} == {
      minus_one}
  vocab = tft.TFTransformOutput(config.rundir.transform).vocabulary_by_name(
      'company')
  unknown_id = [v.decode() for v in vocab].index('unknown')
  assert unknown_id == 0  # 5,140 filled values make it the most frequent
  assert {out['company'][i] for i in missing_company} == {unknown_id}
  # The label: tips > 0.2 * fare.
  labels = read_transformed(config, 'train')['big_tipper'] + \
      read_transformed(config, 'eval')['big_tipper']
  expected = sum(float(r['tips']) > 0.2 * float(r['fare']) for r in rows)
  assert sum(labels) == expected
  assert 0.15 < expected / len(rows) < 0.3


# --- Rejects -----------------------------------------------------------------

_CORRUPTIONS = [
    # (how to damage a good line, the reason's key words)
    (lambda f: f[:-1], 'expected 15 columns, got 14'),
    (lambda f: f + ['extra'], 'expected 15 columns, got 16'),
    (lambda f: ['forty'] + f[1:], "field 'age': expected a number"),
    (lambda f: f[:2] + ['12x'] + f[3:], "field 'fnlwgt': expected a number"),
    (lambda f: f[:12] + ['lots'] + f[13:], "field 'hours-per-week'"),
    (lambda f: f[:-1] + ['>60K'], "label 'income': '>60K' is not one of"),
    (lambda f: f[:-1] + ['?'], "label 'income' is missing"),
    (lambda f: f[:10] + ['inf'] + f[11:], "field 'capital-gain'"),
]


def _write_corrupted(src, dst, count):
  with open(src) as f:
    good = [line for line in f if line.strip()]
  bad = []
  for i in range(count):
    damage, _ = _CORRUPTIONS[i % len(_CORRUPTIONS)]
    fields = good[i * 97].rstrip('\n').split(',')
    bad.append(','.join(damage(fields)) + '\n')
  with open(dst, 'w') as f:
    step = len(good) // (count + 1)
    for i, line in enumerate(good):
      f.write(line)
      if i % step == step - 1 and bad:
        f.write(bad.pop())
    f.writelines(bad)
  return len(good)


def test_corrupted_census_rejects(census_data, tmp_path):
  train = str(tmp_path / 'train.csv')
  good = _write_corrupted(census_data['train'], train, 37)
  assert good == 32561
  config = example_config('census', tmp_path / 'run', f'data.train={train}')
  summary = run_lib.preprocess(config)
  assert summary['splits']['train'] == {'read': 32561 + 37,
                                        'written': 32561, 'rejected': 37}
  rejects = run_lib.read_rejects(config)
  assert len(rejects) == 37
  reasons = [r['reason'] for r in rejects]
  for _, words in _CORRUPTIONS:
    assert any(words in reason for reason in reasons), words
  with open(train) as f:
    lines = f.read().split('\n')
  for r in rejects:
    assert r['split'] == 'train' and r['file'] == train
    assert lines[r['line'] - 1] == r['raw']  # points at the exact line
  assert len(read_transformed(config, 'train')['age']) == 32561


def test_too_many_rejects_fails_and_keeps_previous_run(census_run,
                                                         census_data,
                                                         tmp_path):
  # An earlier complete run (a copy of the session's Census run).
  run_dir = tmp_path / 'run'
  shutil.copytree(census_run.run_dir, run_dir)
  before = sorted(glob.glob(str(run_dir / 'data' / '*')))
  before_bytes = [open(p, 'rb').read() for p in before]
  train = str(tmp_path / 'train.csv')
  _write_corrupted(census_data['train'], train, 37)
  strict = example_config('census', run_dir, f'data.train={train}',
                          'preprocessing.max_reject_fraction=0.0005')
  with pytest.raises(errors.TooManyRejects) as e:
    run_lib.preprocess(strict)
  assert str(run_dir / 'rejects') in str(e.value)
  assert '37 of 48876 rows rejected' in str(e.value)
  assert len(run_lib.read_rejects(strict)) == 37
  # The earlier complete run is untouched, and still marked complete.
  assert strict.rundir.is_preprocessed()
  assert sorted(glob.glob(str(run_dir / 'data' / '*'))) == before
  assert [open(p, 'rb').read() for p in before] == before_bytes
  assert not os.path.exists(run_dir / '.staging')


def test_failed_first_run_publishes_nothing_but_rejects(synthetic_csv,
                                                         tmp_path):
  (src,) = glob.glob(f'{synthetic_csv}/data-*.csv')
  train = tmp_path / 'train.csv'
  text = open(src).read()
  train.write_text(text + '17,40.0,0,private\n' + 'x,1,2,3,4,5,6,7,yes\n')
  config = example_config('synthetic', tmp_path / 'run',
                          f'data.train={train}',
                          'preprocessing.max_reject_fraction=0.0')
  with pytest.raises(errors.TooManyRejects) as e:
    run_lib.preprocess(config)
  assert '2 of 5002 rows rejected' in str(e.value)
  assert not config.rundir.is_preprocessed()
  assert not os.path.exists(config.rundir.path('data'))
  assert not os.path.exists(config.rundir.transform)
  rejects = sorted(run_lib.read_rejects(config), key=lambda r: r['line'])
  assert [r['line'] for r in rejects] == [5002, 5003]
  assert rejects[0]['reason'] == 'expected 9 columns, got 4'
  assert rejects[1]['reason'] == "field 'age': expected an integer, got 'x'"
  history = [json.loads(l) for l in open(config.rundir.history)]
  assert [h['status'] for h in history] == ['started', 'failed']
