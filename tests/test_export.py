"""SavedModel exports: layout, signatures, raw vs tf.Example, skew check.

A Census wide & deep model, a synthetic linear regressor and synthetic Keras
models (a functional classifier, a subclassed regressor) are trained for a
few steps on copies of the session's preprocessed runs and exported.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

# pylint: disable=g-import-not-at-top,redefined-outer-name
from pipeline import cli
from pipeline import rundir
from pipeline import signatures
from estimators import train
from serving import export
from serving import raw_examples
from serving import verify
from tests import serving_helpers
from tests.conftest import example_config, preprocessed


@pytest.fixture(scope='module')
def census_export(census_run, tmp_path_factory):
  return serving_helpers.trained_export(census_run, tmp_path_factory)


@pytest.fixture(scope='module')
def regression_export(synthetic_csv, tmp_path_factory):
  """A linear regressor on the synthetic data (label: an expression)."""
  run_dir = tmp_path_factory.mktemp('regression_run')
  config = preprocessed(example_config(
      'synthetic', run_dir, f'data.train={synthetic_csv}/data-*.csv',
      'label.name=target', 'label.task=regression', 'label.values=null',
      'label.expression=age + capital_gain / 1000', 'model.type=linear'))
  estimator = serving_helpers.train_briefly(config)
  return config, export.export_saved_model(config, estimator)


def _keras(config, style):
  return {'model': dataclasses.replace(config.model, type='keras',
                                       keras_style=style)}


@pytest.fixture(scope='module')
def keras_classifier_export(synthetic_run, tmp_path_factory):
  """A functional Keras binary classifier (model_to_estimator)."""
  return serving_helpers.trained_export(
      synthetic_run, tmp_path_factory, name='keras_classifier',
      **_keras(synthetic_run, 'functional'))


@pytest.fixture(scope='module')
def keras_regressor_export(regression_export, tmp_path_factory):
  """A subclassed Keras regressor (Saver checkpoints) on the regression run."""
  config, _ = regression_export
  return serving_helpers.trained_export(
      config, tmp_path_factory, name='keras_regressor',
      **_keras(config, 'subclassed'))


@pytest.fixture(scope='module')
def census_loaded(census_export):
  return tf.saved_model.load(census_export[1])


def _signature_names(path):
  return set(tf.saved_model.load(path).signatures)


def test_export_is_an_integer_version_with_metadata(census_export):
  config, path = census_export
  assert os.path.dirname(path) == config.rundir.export
  assert os.path.basename(path).isdigit()
  assert rundir.list_versions(config.rundir.export) == [int(
      os.path.basename(path))]
  meta = export.read_metadata(path)
  assert meta['exporter'] == 'manual'
  assert meta['global_step'] == serving_helpers.TRAIN_STEPS
  assert meta['checkpoint'] == tf.train.latest_checkpoint(config.rundir.model)
  # What the model server types JSON values by.
  assert meta['raw_features'] == {f.name: f.type for f in config.features}
  assert meta['raw_features']['capital-gain'] == 'integer'
  assert meta['raw_features']['age'] == 'float'
  # Staging leftovers would be half-written exports; the empty root goes too.
  assert not os.path.exists(config.rundir.path('.staging'))



def test_export_carries_tf_serving_warmup_requests(census_export):
  """TF Serving's warmup file, from eval rows: one request per signature
  clients use, each of which the model server replays without error."""
  from tensorflow_serving.apis import prediction_log_pb2
  from serving import warmup
  from serving.models import ServableVersion
  _, path = census_export
  records = list(tf.compat.v1.io.tf_record_iterator(
      os.path.join(path, 'assets.extra', 'tf_serving_warmup_requests')))
  logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in records]
  by_signature = {}
  for log in logs:
    kind = log.WhichOneof('log_type')
    request = getattr(log, kind).request
    by_signature[request.model_spec.signature_name] = (kind, request)
  assert by_signature['classification'][0] == 'classify_log'
  assert by_signature['serving_default'][0] == 'classify_log'
  assert by_signature['predict'][0] == 'predict_log'
  kind, raw = by_signature[signatures.RAW_SIGNATURE]
  assert kind == 'predict_log'
  assert {'age', 'workclass'} <= set(raw.inputs)
  examples = by_signature['classification'][1].input.example_list.examples
  assert len(examples) == export.WARMUP_ROWS
  servable = ServableVersion('census', 1, path)
  assert warmup.replay(servable) == len(logs)


def test_classifier_signatures(census_loaded):
  names = set(census_loaded.signatures)
  assert {'serving_default', 'classification', 'predict',
          signatures.RAW_SIGNATURE} <= names
  raw = census_loaded.signatures[signatures.RAW_SIGNATURE]
  inputs = raw.structured_input_signature[1]
  assert inputs['age'].dtype == tf.float64
  assert inputs['workclass'].dtype == tf.string
  assert 'income' not in inputs


def test_regressor_signatures_and_skew_check(regression_export):
  config, path = regression_export
  names = _signature_names(path)
  assert {'serving_default', 'regression', 'predict',
          signatures.RAW_SIGNATURE} <= names
  assert 'classification' not in names
  summary = verify.verify_export(config, train.predict_transformed, path,
                                 max_rows=300)
  assert summary['rows'] == 300
  assert 'outputs' in summary['max_abs_diff']['regression']
  assert max(summary['max_abs_diff']['raw:predict'].values()) <= 1e-5


def test_raw_and_example_signatures_agree(census_export, census_loaded):
  config, _ = census_export
  parser, rows = serving_helpers.census_eval_rows(config, limit=200)
  values = [v for _, v in rows]
  # A row with every feature missing but the required ones (numbers never
  # missing in training, without a default): the transform fills the rest.
  required = export.exported_required_features(census_export[1])
  assert 'age' in required and 'workclass' not in required
  values.append([v if c.name in required else None
                 for c, v in zip(parser.columns, values[0])])
  assert any(None in v for v in values[:-1]), 'Census eval has "?" values'
  loaded = census_loaded
  by_example = loaded.signatures['predict'](examples=tf.constant(
      [raw_examples.to_example(parser, v) for v in values]))
  by_raw = loaded.signatures[signatures.RAW_SIGNATURE](
      **raw_examples.raw_tensors(
          parser, [raw_examples.to_raw_instance(parser, v) for v in values]))
  classify = loaded.signatures['classification'](inputs=tf.constant(
      [raw_examples.to_example(parser, v) for v in values]))
  np.testing.assert_allclose(by_raw['probabilities'].numpy(),
                             by_example['probabilities'].numpy(), atol=1e-6)
  np.testing.assert_allclose(classify['scores'].numpy(),
                             by_example['probabilities'].numpy(), atol=1e-6)
  assert [c.decode() for c in classify['classes'][0].numpy()] == \
      config.label.vocabulary
  # Missing markers on the raw signature: '' or a data.missing token, NaN.
  one = raw_examples.to_raw_instance(parser, values[0])
  question = dict(one, workclass='?')
  empty = dict(one, workclass='')
  out = loaded.signatures[signatures.RAW_SIGNATURE](
      **raw_examples.raw_tensors(parser, [question, empty]))[
          'probabilities'].numpy()
  np.testing.assert_allclose(out[0], out[1], atol=1e-7)
  # Without a required feature, every signature refuses the row.
  empty_row = raw_examples.to_example(parser, [None] * len(parser.columns))
  with pytest.raises(tf.errors.InvalidArgumentError, match='is required'):
    loaded.signatures['predict'](examples=tf.constant([empty_row]))


def _synthetic_examples(config, limit=200):
  """Serialized raw tf.Examples of the first good eval rows."""
  parser = raw_examples.row_parser(config)
  rows, _ = verify.read_eval_rows(config, parser, max_rows=limit)
  return tf.constant([raw_examples.to_example(parser, r.values)
                      for r in rows])


def test_keras_classifier_has_the_canned_signatures(keras_classifier_export):
  """A Keras export answers :classify like its predict signature."""
  config, path = keras_classifier_export
  loaded = tf.saved_model.load(path)
  assert {'serving_default', 'classification', 'regression', 'predict',
          signatures.RAW_SIGNATURE} <= set(loaded.signatures)
  examples = _synthetic_examples(config)
  predicted = loaded.signatures['predict'](examples=examples)
  classified = loaded.signatures['classification'](inputs=examples)
  by_default = loaded.signatures['serving_default'](inputs=examples)
  regressed = loaded.signatures['regression'](inputs=examples)
  probabilities = predicted['probabilities'].numpy()
  assert probabilities.shape == (len(examples), 2)
  assert np.ptp(probabilities[:, 1]) > 0, 'a constant model proves little'
  np.testing.assert_allclose(classified['scores'].numpy(), probabilities,
                             atol=1e-6)
  np.testing.assert_allclose(by_default['scores'].numpy(), probabilities,
                             atol=1e-6)
  np.testing.assert_allclose(regressed['outputs'].numpy().reshape(-1),
                             probabilities[:, 1], atol=1e-6)
  # Scores with the configured class names, as canned classifiers answer.
  classes = classified['classes'].numpy().astype(str)
  assert (classes == np.array(config.label.vocabulary)).all()
  np.testing.assert_allclose(predicted['logistic'].numpy().reshape(-1),
                             probabilities[:, 1], atol=1e-6)
  chosen = predicted['classes'].numpy().astype(str).reshape(-1)
  assert list(chosen) == [config.label.vocabulary[i] for i in
                          probabilities.argmax(axis=1)]


def test_keras_regressor_has_the_canned_signatures(keras_regressor_export):
  config, path = keras_regressor_export
  loaded = tf.saved_model.load(path)
  names = set(loaded.signatures)
  assert {'serving_default', 'regression', 'predict',
          signatures.RAW_SIGNATURE} <= names
  assert 'classification' not in names
  examples = _synthetic_examples(config)
  predicted = loaded.signatures['predict'](examples=examples)
  regressed = loaded.signatures['regression'](inputs=examples)
  by_default = loaded.signatures['serving_default'](inputs=examples)
  values = predicted['predictions'].numpy().reshape(-1)
  assert np.ptp(values) > 0
  np.testing.assert_allclose(regressed['outputs'].numpy().reshape(-1), values,
                             atol=1e-6)
  np.testing.assert_allclose(by_default['outputs'].numpy().reshape(-1),
                             values, atol=1e-6)


def test_keras_output_as_canned_predictions():
  """Multiclass, a Keras output name kept, and the predict-only fallback."""
  from estimators import heads
  from estimators import models
  from pipeline.config import LabelConfig

  def config(task, values):
    return types.SimpleNamespace(label=LabelConfig('y', task, values))

  multiclass = config('multiclass', ['a', 'b', 'c'])
  probabilities = tf.constant([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
  predictions = models._keras_predictions(  # pylint: disable=protected-access
      multiclass, {'probabilities': probabilities})
  outputs = heads.export_outputs('multiclass', predictions)
  assert set(outputs) == {'serving_default', 'classification', 'predict'}
  assert list(predictions['classes'].numpy().astype(str).ravel()) == [
      'b', 'a']
  classify = outputs['classification']
  np.testing.assert_allclose(classify.scores.numpy(), probabilities.numpy())
  assert (classify.classes.numpy().astype(str) == ['a', 'b', 'c']).all()
  # A subclassed model's output is named output_1: the name stays.
  binary = models._keras_predictions(  # pylint: disable=protected-access
      config('binary', ['no', 'yes']), {'output_1': tf.constant([[0.9],
                                                                  [0.2]])})
  assert {'output_1', 'logistic', 'probabilities', 'classes'} <= set(binary)
  np.testing.assert_allclose(binary['probabilities'].numpy(),
                             [[0.1, 0.9], [0.8, 0.2]], atol=1e-7)
  assert list(binary['classes'].numpy().astype(str).ravel()) == ['yes', 'no']
  # Several outputs, or a shape the task does not make: predict only.
  assert models._keras_predictions(  # pylint: disable=protected-access
      multiclass, {'p': probabilities, 'q': probabilities}) is None
  assert models._keras_predictions(  # pylint: disable=protected-access
      multiclass, {'p': tf.constant([[0.5, 0.5]])}) is None


@pytest.mark.parametrize('which', ['classifier', 'regressor'])
def test_verify_export_passes_for_keras(which, synthetic_csv, request,
                                        capsys):
  """`estpipe verify-export` checks every signature of a Keras export."""
  config, _ = request.getfixturevalue(f'keras_{which}_export')
  overrides = [f'run_dir={config.run_dir}', 'model.type=keras',
               f'model.keras_style={config.model.keras_style}',
               f'data.train={synthetic_csv}/data-*.csv']
  if which == 'regressor':
    overrides += ['label.name=target', 'label.task=regression',
                  'label.values=null',
                  'label.expression=age + capital_gain / 1000']
  args = [a for o in overrides for a in ('--set', o)]
  code = cli.main(['verify-export', config.source, *args,
                   '--max_rows', '300'])
  out = capsys.readouterr()
  assert code == 0, out.err
  checked = set(json.loads(out.out)['max_abs_diff'])
  expected = {'serving_default', 'predict', 'raw:predict', 'regression'}
  if which == 'classifier':
    expected.add('classification')
  assert checked == expected


def _saved_model_cli(*args):
  binary = os.path.join(os.path.dirname(sys.executable), 'saved_model_cli')
  result = subprocess.run([binary, *args], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def test_saved_model_cli_show_and_run(census_export):
  config, path = census_export
  shown = _saved_model_cli('show', '--dir', path, '--all')
  for name in ('serving_default', 'classification', 'predict', 'raw:predict'):
    assert f"signature_def['{name}']" in shown
  parser, rows = serving_helpers.census_eval_rows(config, limit=1)
  instance = raw_examples.to_raw_instance(parser, rows[0][1])
  exprs = ';'.join(f'{k}=[{json.dumps(v)}]' for k, v in instance.items())
  ran = _saved_model_cli('run', '--dir', path, '--tag_set', 'serve',
                         '--signature_def', signatures.RAW_SIGNATURE,
                         '--input_exprs', exprs)
  assert 'probabilities' in ran


def _estpipe(*args):
  binary = os.path.join(os.path.dirname(sys.executable), 'estpipe')
  return subprocess.run([binary, *args], capture_output=True, text=True,
                        timeout=300, check=False)


def test_export_command(census_export, tmp_path, capsys):
  """`estpipe export` on a copy of a trained run: new versions, no traces."""
  config, _ = census_export
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  shutil.copytree(config.rundir.path('transform'), run_dir / 'transform')
  shutil.copy(config.rundir.preprocess_summary, run_dir)
  args = [config.source, '--set', f'run_dir={run_dir}']
  # No checkpoint yet: exit 1 with a one-line error (cli.main returns the
  # exit status; anything but a UserError would raise), nothing written.
  assert cli.main(['export', *args]) == 1
  err = capsys.readouterr().err
  assert (f'estpipe: error: no checkpoint in {run_dir / "model"}: run '
          '`estpipe train` first\n') in err
  assert 'Traceback' not in err
  assert not (run_dir / 'export').exists()

  shutil.copytree(config.rundir.model, run_dir / 'model')
  checkpoint = tf.train.latest_checkpoint(str(run_dir / 'model'))
  assert checkpoint.startswith(str(run_dir)), 'the copy, not the shared run'
  done = _estpipe('export', *args)
  assert done.returncode == 0, done.stderr[-2000:]
  first = done.stdout.strip()
  assert os.path.dirname(first) == str(run_dir / 'export')
  assert os.path.isfile(os.path.join(first, 'saved_model.pb'))
  assert export.read_metadata(first)['checkpoint'] == checkpoint
  # Exporting again (in process: TensorFlow is loaded) makes a newer version.
  assert cli.main(['export', *args]) == 0, capsys.readouterr().err
  second = capsys.readouterr().out.strip()
  assert int(os.path.basename(second)) > int(os.path.basename(first))
  assert rundir.list_versions(str(run_dir / 'export')) == [
      int(os.path.basename(p)) for p in (first, second)]
  assert sorted(os.listdir(run_dir)) == [
      'export', 'history.jsonl', 'model', 'preprocess.json', 'transform']
  history = [json.loads(line) for line in open(run_dir / 'history.jsonl')]
  assert [(h['stage'], h['status']) for h in history] == [
      ('export', 'started'), ('export', 'failed'),
      ('export', 'started'), ('export', 'succeeded'),
      ('export', 'started'), ('export', 'succeeded')]


def test_verify_export_passes(census_export, capsys):
  config, _ = census_export
  code = cli.main(['verify-export', config.source, '--set',
                   f'run_dir={config.run_dir}', '--max_rows', '500'])
  out = capsys.readouterr()
  assert code == 0, out.err
  summary = json.loads(out.out)
  assert summary['rows'] == 500
  assert set(summary['max_abs_diff']) >= {'predict', 'raw:predict',
                                           'classification'}
  history = [json.loads(line) for line in open(config.rundir.history)]
  assert history[-1]['stage'] == 'verify-export'
  assert history[-1]['status'] == 'succeeded'


def test_verify_export_names_first_row_of_a_wrong_transform(
    census_export, tmp_path, capsys):
  """An export built with a stale vocabulary fails at the first row using it."""
  config, good_path = census_export
  tampered = serving_helpers.copy_preprocessed(config, tmp_path / 'tampered')
  vocab = os.path.join(tampered.rundir.transform, 'transform_fn', 'assets',
                       'workclass')
  with open(vocab) as f:
    words = f.read().splitlines()
  words[0], words[1] = words[1], words[0]
  with open(vocab, 'w') as f:
    f.write('\n'.join(words) + '\n')
  from estimators import train
  estimator = train.build_estimator(tampered, warm_start=False)
  checkpoint = export.read_metadata(good_path)['checkpoint']
  bad_path = export.export_saved_model(tampered, estimator, checkpoint)
  # Move the bad export into the real run as its newest version.
  target = os.path.join(config.rundir.export, '9' * 10)
  shutil.move(bad_path, target)
  try:
    parser, rows = serving_helpers.census_eval_rows(config, limit=300)
    column = [c.name for c in parser.columns].index('workclass')
    swapped = {words[0].encode(), words[1].encode()}
    first = next(i for i, (_, v) in enumerate(rows) if v[column] in swapped)
    code = cli.main(['verify-export', config.source, '--set',
                     f'run_dir={config.run_dir}', '--max_rows', '300'])
    err = capsys.readouterr().err
    assert code == 1
    assert f'training/serving skew at eval row {first} ' in err
    assert f'adult.eval.csv:{rows[first][0]})' in err
  finally:
    shutil.rmtree(target, ignore_errors=True)


def test_exporters_in_train_and_evaluate(census_run, tmp_path):
  """latest (keep 1), best and final exporters wired into training."""
  import dataclasses
  from estimators import train
  config = serving_helpers.copy_preprocessed(
      census_run, tmp_path / 'run',
      train=dataclasses.replace(census_run.train, steps=40,
                                save_checkpoints_steps=20, eval_steps=5,
                                eval_throttle_secs=0),
      export=dataclasses.replace(census_run.export,
                                 exporters=['latest', 'best', 'final'],
                                 keep=1))
  train.train(config, export.make_exporters(config))
  names = os.listdir(config.rundir.export)
  assert names and all(n.isdigit() for n in names), names
  by_exporter = {}
  for version in rundir.list_versions(config.rundir.export):
    meta = export.read_metadata(os.path.join(config.rundir.export,
                                             str(version)))
    by_exporter.setdefault(meta['exporter'], []).append(meta)
  assert len(by_exporter['latest']) == 1
  assert by_exporter['latest'][0]['global_step'] == 40
  assert [m['global_step'] for m in by_exporter['final']] == [40]
  assert 1 <= len(by_exporter['best']) and 'loss' in by_exporter['best'][
      -1]['metrics']
  newest = rundir.version_dir(config.rundir.export)
  assert signatures.RAW_SIGNATURE in _signature_names(newest)
