"""Preprocessing without shared data: synthetic data, TFRecord input, runners,
atomic outputs, user modules."""

import glob
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf
import tensorflow_transform as tft

from pipeline import runrecord, synthetic
from preprocessing import run as run_lib
from tests.conftest import ROOT, example_config, free_port, wait_for_port
from tests.test_preprocess import read_transformed, row_multiset


def _records(config):
  """The multiset of transformed rows, per split (map order aside)."""
  out = {}
  for split in ('train', 'eval'):
    columns = read_transformed(config, split)
    out[split] = row_multiset(columns, sorted(columns))
  return out


def _asset_digests(config):
  assets = os.path.join(config.rundir.transform, 'transform_fn', 'assets')
  return {name: hashlib.md5(open(os.path.join(assets, name), 'rb').read())
          .hexdigest() for name in sorted(os.listdir(assets))}


def _preprocess_command(run_dir, synthetic_csv, *beam_flags):
  """`estpipe preprocess` of the synthetic example, as a subprocess argv."""
  return [sys.executable, '-m', 'pipeline.cli', 'preprocess',
          os.path.join(ROOT, 'examples', 'synthetic.yaml'),
          '--set', f'run_dir={run_dir}',
          '--set', f'data.train={synthetic_csv}/data-*.csv', *beam_flags]


def test_generate_data_is_deterministic(tmp_path):
  a = synthetic.write_csv(str(tmp_path / 'a'), 3000, seed=1, shards=2)
  b = synthetic.write_csv(str(tmp_path / 'b'), 3000, seed=1, shards=2)
  c = synthetic.write_csv(str(tmp_path / 'c'), 3000, seed=2, shards=2)
  read = lambda paths: [open(p, 'rb').read() for p in paths]
  assert read(a) == read(b)
  assert read(a) != read(c)
  rows = sum(len(x.splitlines()) - 1 for x in read(a))
  assert rows == 3000


def test_synthetic_text_and_counts(synthetic_run):
  summary = runrecord.read_json(synthetic_run.rundir.preprocess_summary)
  splits = summary['splits']
  assert splits['train']['written'] + splits['eval']['written'] == 5000
  # The finished stage leaves no staging folder, not even an empty root.
  assert not os.path.exists(synthetic_run.rundir.path('.staging'))
  assert splits['train']['rejected'] + splits['eval']['rejected'] == 0
  train = read_transformed(synthetic_run, 'train')
  # tf-idf: ids and weights per row, aligned, every row has tokens.
  assert all(len(ids) == len(w) > 0 for ids, w in
             zip(train['notes'], train['notes_weights']))
  vocab = tft.TFTransformOutput(
      synthetic_run.rundir.transform).vocabulary_by_name('notes')
  assert b'senior' in vocab and b'intern' in vocab
  assert len(vocab) == 25  # 15 neutral + 5 positive + 5 negative words
  assert set(train['label']) == {0, 1}


@pytest.mark.slow
def test_multiprocessing_runner_gives_the_same_records(synthetic_run,
                                                       synthetic_csv,
                                                       tmp_path):
  """Workers in other processes import everything from the packages."""
  run_dir = tmp_path / 'mp'
  proc = subprocess.run(
      _preprocess_command(run_dir, synthetic_csv,
                          '--direct_running_mode=multi_processing',
                          '--direct_num_workers=2'),
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = example_config('synthetic', run_dir,
                          f'data.train={synthetic_csv}/data-*.csv')
  assert _records(config) == _records(synthetic_run)
  assert _asset_digests(config) == _asset_digests(synthetic_run)


def _to_example(row):
  feature = {}
  for name, value in row.items():
    if value == '':
      continue
    if name == 'age':
      feature[name] = tf.train.Feature(
          int64_list=tf.train.Int64List(value=[int(value)]))
    elif name in ('hours_per_week', 'capital_gain'):
      feature[name] = tf.train.Feature(
          float_list=tf.train.FloatList(value=[float(value)]))
    else:
      feature[name] = tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[value.encode()]))
  return tf.train.Example(features=tf.train.Features(feature=feature))


def test_tfrecord_input_with_rejects(synthetic_csv, tmp_path):
  import csv  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'raw.tfrecord.gz')
  rows = list(csv.DictReader(open(glob.glob(f'{synthetic_csv}/*.csv')[0])))
  bad_type = _to_example(rows[0])
  bad_type.features.feature['age'].Clear()
  bad_type.features.feature['age'].bytes_list.value.append(b'old')
  with tf.io.TFRecordWriter(path, 'GZIP') as w:
    for row in rows:
      w.write(_to_example(row).SerializeToString())
    w.write(b'\xff\xff\xff not a proto')
    w.write(bad_type.SerializeToString())
  config = example_config('synthetic', tmp_path / 'run', f'data.train={path}',
                          'data.format=tfrecord', 'data.header=false')
  summary = run_lib.preprocess(config)
  splits = summary['splits']
  assert splits['train']['written'] + splits['eval']['written'] == 5000
  rejects = sorted(run_lib.read_rejects(config), key=lambda r: r['record'])
  assert [r['record'] for r in rejects] == [5001, 5002]
  assert rejects[0]['reason'] == 'not a serialized tf.Example'
  assert rejects[1]['reason'] == "field 'age': expected an integer, got 'old'"
  assert rejects[1]['raw'].startswith('base64:')


def test_killed_run_leaves_nothing_a_later_stage_would_use(synthetic_csv,
                                                           tmp_path):
  run_dir = tmp_path / 'run'
  proc = subprocess.Popen(_preprocess_command(run_dir, synthetic_csv),
                          cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not glob.glob(str(run_dir / '.staging' / '*' / 'tmp')):
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.05)
  time.sleep(1.0)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  config = example_config('synthetic', run_dir,
                          f'data.train={synthetic_csv}/data-*.csv')
  assert not config.rundir.is_preprocessed()
  assert not os.path.exists(config.rundir.path('data'))
  assert not os.path.exists(config.rundir.transform)
  # Running again completes, and the leftovers do not get in the way:
  # the killed run's staging folder is removed (its owner is gone).
  run_lib.preprocess(config)
  assert config.rundir.is_preprocessed()
  assert len(read_transformed(config, 'train')['age']) > 3500
  assert not os.path.exists(config.rundir.staging), os.listdir(
      config.rundir.staging)


def test_stale_staging_of_dead_processes_is_removed(tmp_path):
  run_dir = str(tmp_path / 'run')
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  folders = {}
  for name, pid, extra in (('dead', dead.pid, {}),
                           ('live', os.getpid(), {}),
                           ('detached', dead.pid, {'detached': True}),
                           ('elsewhere', dead.pid, {'host': 'other-host'})):
    path = runrecord.new_staging(run_dir, 'preprocess',
                                 detached=bool(extra.get('detached')))
    owner = runrecord.read_json(os.path.join(path, 'OWNER'))
    owner.update(pid=pid, **extra)
    runrecord.write_json(os.path.join(path, 'OWNER'), owner)
    folders[name] = path
  # Another process's live run in the same run dir keeps its folder.
  sleeper = subprocess.Popen([sys.executable, '-c',
                              'import time; time.sleep(60)'])
  try:
    runrecord.write_json(os.path.join(folders['live'], 'OWNER'), {
        'host': runrecord.socket.gethostname(), 'pid': sleeper.pid})
    legacy = os.path.join(run_dir, '.staging', 'preprocess-legacy')
    os.makedirs(legacy)  # no owner recorded: left alone
    new = runrecord.new_staging(run_dir, 'preprocess')
    left = set(os.listdir(os.path.join(run_dir, '.staging')))
  finally:
    sleeper.kill()
    sleeper.wait()
  assert os.path.basename(folders['dead']) not in left
  assert {os.path.basename(p) for p in (folders['live'], folders['detached'],
                                        folders['elsewhere'], legacy, new)
         } <= left
  # Once the live run's process is gone, its folder goes too.
  runrecord.new_staging(run_dir, 'preprocess')
  assert os.path.basename(folders['live']) not in os.listdir(
      os.path.join(run_dir, '.staging'))


_USER_MODULE = '''
import tensorflow as tf
import tensorflow_transform as tft
from preprocessing.transform_fn import fill_missing


def preprocessing_fn(inputs, config):
  age = fill_missing(inputs['age'], config.feature('age'))
  hours = fill_missing(inputs['hours_per_week'],
                       config.feature('hours_per_week'))
  return {
      'age_x_hours': tft.scale_to_z_score(
          tf.cast(age, tf.float32) * hours),
      'label': tf.squeeze(tf.sparse.to_dense(inputs['label']), 1),
  }
'''


def test_user_module_replaces_preprocessing_fn(synthetic_csv, tmp_path):
  module = tmp_path / 'my_transform.py'
  module.write_text(_USER_MODULE)
  config = example_config('synthetic', tmp_path / 'run',
                          f'data.train={synthetic_csv}/data-*.csv',
                          f'preprocessing.module={module}')
  run_lib.preprocess(config)
  train = read_transformed(config, 'train')
  assert sorted(train) == ['age_x_hours', 'label']
  mean = sum(train['age_x_hours']) / len(train['age_x_hours'])
  assert abs(mean) < 1e-3


@pytest.mark.slow
def test_portable_runner_job_submission(synthetic_run, synthetic_csv,
                                        tmp_path):
  """The job is submitted to a Beam job service, as to a cluster's."""
  port = free_port()
  service = subprocess.Popen(
      [sys.executable, '-m',
       'apache_beam.runners.portability.local_job_service_main',
       '--port', str(port)],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    wait_for_port(port, service)
    run_dir = tmp_path / 'portable'
    proc = subprocess.run(
        _preprocess_command(run_dir, synthetic_csv, '--runner=PortableRunner',
                            f'--job_endpoint=localhost:{port}',
                            '--environment_type=LOOPBACK'),
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
  finally:
    service.kill()
    service.wait()
  config = example_config('synthetic', run_dir,
                          f'data.train={synthetic_csv}/data-*.csv')
  summary = runrecord.read_json(config.rundir.preprocess_summary)
  assert summary['runner'] == 'PortableRunner'
  assert _records(config) == _records(synthetic_run)


def test_gzip_csv_input(synthetic_run, synthetic_csv, tmp_path):
  import gzip  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  (src,) = glob.glob(f'{synthetic_csv}/data-*.csv')
  dst = tmp_path / 'data.csv.gz'
  with open(src, 'rb') as f, gzip.open(dst, 'wb') as g:
    shutil.copyfileobj(f, g)
  config = example_config('synthetic', tmp_path / 'run', f'data.train={dst}')
  run_lib.preprocess(config)
  assert _records(config) == _records(synthetic_run)


def test_most_frequent_default_outside_a_vocabulary(synthetic_csv, tmp_path):
  """A hashed feature's missing values get the hash of the mode."""
  import collections as col  # pylint: disable=g-import-not-at-top
  from tests.test_preprocess import raw_examples, transform_in_tf  # pylint: disable=g-import-not-at-top
  config = example_config('synthetic', tmp_path / 'run',
                          f'data.train={synthetic_csv}/data-*.csv',
                          'features.occupation.transform=hash',
                          'features.occupation.buckets=1000')
  run_lib.preprocess(config)
  (path,) = glob.glob(f'{synthetic_csv}/data-*.csv')
  rows, examples = raw_examples(config, path, header=True)
  out = transform_in_tf(config, examples)
  from preprocessing.rows import is_eval_row  # pylint: disable=g-import-not-at-top
  lines = open(path).read().splitlines()[1:]
  assert len(lines) == len(rows)
  # The mode of the training split (the eval rows are not analyzed).
  train = [r['occupation'] for r, line in zip(rows, lines)
           if r['occupation'] and not is_eval_row(line, 0.2)]
  counts = col.Counter(train).most_common(2)
  assert counts[0][1] > counts[1][1]  # a clear mode
  mode = counts[0][0]
  expected = tf.strings.to_hash_bucket_fast([mode], 1000).numpy()[0]
  missing = [i for i, r in enumerate(rows) if not r['occupation']]
  assert len(missing) > 100
  assert {out['occupation'][i] for i in missing} == {expected}


def test_every_valid_type_transform_pair_transforms(tmp_path):
  """Each pair the config check lets through runs in tf.Transform."""
  import tensorflow_transform.beam as tft_beam  # pylint: disable=g-import-not-at-top
  from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils  # pylint: disable=g-import-not-at-top
  from pipeline.config import FeatureConfig, TRANSFORM_TYPES  # pylint: disable=g-import-not-at-top
  from preprocessing import transform_fn  # pylint: disable=g-import-not-at-top
  dtypes = {'integer': tf.int64, 'float': tf.float32, 'string': tf.string,
            'text': tf.string}
  values = {'integer': [1, 2, 3, 2], 'float': [0.5, 1.5, 2.5, 1.5],
            'string': ['a', 'b', 'a', 'c'],
            'text': ['a b', 'b c d', 'a', 'd d']}
  features = [FeatureConfig(name=f'{kind}_{transform}', type=kind,
                            transform=transform, buckets=2)
              for transform, kinds in TRANSFORM_TYPES.items()
              for kind in kinds]
  spec = {f.name: tf.io.FixedLenFeature([], dtypes[f.type]) for f in features}
  rows = [{f.name: values[f.type][i] for f in features} for i in range(4)]

  def preprocessing_fn(inputs):
    outputs = {}
    for feature in features:
      outputs.update(transform_fn.transform_feature(feature,
                                                    inputs[feature.name]))
    return outputs

  metadata = dataset_metadata.DatasetMetadata(
      schema_utils.schema_from_feature_spec(spec))
  with tft_beam.Context(temp_dir=str(tmp_path)):
    (transformed, _), _ = ((rows, metadata) |
                           tft_beam.AnalyzeAndTransformDataset(
                               preprocessing_fn))
  assert len(transformed) == 4
  assert {f.name for f in features} <= set(transformed[0])
