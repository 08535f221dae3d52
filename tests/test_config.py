"""Config errors name the offending key, before any work starts."""

import os
import subprocess
import sys

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import EXAMPLES

SYNTHETIC = os.path.join(EXAMPLES, 'synthetic.yaml')


def _write(tmp_path, tree):
  path = tmp_path / 'config.yaml'
  path.write_text(yaml.safe_dump(tree))
  return str(path)


@pytest.fixture
def base(synthetic_csv):
  with open(SYNTHETIC) as f:
    tree = yaml.safe_load(f)
  tree['data']['train'] = os.path.join(synthetic_csv, 'data-*.csv')
  return tree


@pytest.mark.parametrize('mutate, key, words', [
    (lambda t: t.update(trian={}), 'trian', 'unknown key'),
    (lambda t: t['data'].update(eval_fraction='a lot'), 'data.eval_fraction',
     'expected a number'),
    (lambda t: t['data'].update(eval_fraction=1.5), 'data.eval_fraction',
     'in (0, 1)'),
    (lambda t: t['features'][0].update(transform='zscore'),
     'features[0].transform', "unknown transform 'zscore'"),
    (lambda t: t['features'][0].update(name='agee'), 'features[0].name',
     "'agee' is not a column of the data"),
    (lambda t: t['features'][1].update(buckets='eight'),
     'features[1].buckets', 'expected an integer'),
    (lambda t: t['features'][3].update(transform='z_score'),
     'features[3].transform', 'needs an integer or float feature'),
    (lambda t: t['features'][0].update(colour='red'), 'features[0].colour',
     'unknown key'),
    (lambda t: t['label'].update(task='ranking'), 'label.task',
     "got 'ranking'"),
    (lambda t: t['label'].update(values=['yes']), 'label.values',
     'at least two'),
    (lambda t: t['label'].update(name='outcome'), 'label.name',
     "'outcome' is not a column"),
    (lambda t: t.pop('run_dir'), 'run_dir', 'required'),
    (lambda t: t['model'].update(type='forest'), 'model.type',
     "got 'forest'"),
    (lambda t: t['train'].update(distribution='magic'), 'train.distribution',
     "got 'magic'"),
    (lambda t: t['model'].update(crosses=[['education', 'nope']]),
     'model.crosses[0]', "'nope' is not a feature"),
])
def test_config_errors_name_the_key(base, tmp_path, mutate, key, words):
  mutate(base)
  with pytest.raises(ConfigError) as e:
    load_config(_write(tmp_path, base))
  assert e.value.path == key
  assert str(e.value).startswith(f'{key}: ')
  assert words in str(e.value)


def test_set_overrides(base, tmp_path):
  path = _write(tmp_path, base)
  config = load_config(path, ['train.steps=7', 'features.age.transform=log',
                              'run_dir=relative/run'])
  assert config.train.steps == 7
  assert config.feature('age').transform == 'log'
  # Override paths are relative to the current directory, file paths to the
  # file's folder.
  assert config.run_dir == os.path.join(os.getcwd(), 'relative', 'run')
  with pytest.raises(ConfigError) as e:
    load_config(path, ['features.nope.transform=log'])
  assert e.value.path == 'features.nope'
  with pytest.raises(ConfigError) as e:
    load_config(path, ['train.steps=many'])
  assert e.value.path == 'train.steps'


def test_relative_paths_follow_the_config_file(base, tmp_path):
  base['run_dir'] = 'out/run'
  config = load_config(_write(tmp_path, base))
  assert config.run_dir == str(tmp_path / 'out' / 'run')


def test_cli_reports_config_error_without_traceback(base, tmp_path):
  base['features'][0]['transform'] = 'zscore'
  path = _write(tmp_path, base)
  proc = subprocess.run(
      [sys.executable, '-m', 'pipeline.cli', 'preprocess', path],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "config error: features[0].transform: unknown transform 'zscore'" \
      in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'runs').exists()


def test_missing_input_names_the_pattern(base, tmp_path):
  base['data']['train'] = str(tmp_path / 'nothing-*.csv')
  base['data']['header'] = False
  base['data']['columns'] = ['age', 'hours_per_week', 'capital_gain',
                             'workclass', 'education', 'occupation', 'region',
                             'notes', 'label']
  base['run_dir'] = str(tmp_path / 'run')
  path = _write(tmp_path, base)
  proc = subprocess.run(
      [sys.executable, '-m', 'pipeline.cli', 'preprocess', path],
      capture_output=True, text=True, timeout=180)
  assert proc.returncode == 1, proc.stderr
  assert f'no file matches {tmp_path}/nothing-*.csv' in proc.stderr


def test_float_vocabulary_is_a_config_error_naming_the_feature(base, tmp_path):
  # Used to pass the check and crash in tf.Transform ("expected tf.string or
  # integer but got tf.float32"), naming no feature.
  base['features'][1].update(transform='vocabulary')
  base['features'][1].pop('buckets', None)
  with pytest.raises(ConfigError) as e:
    load_config(_write(tmp_path, base))
  assert e.value.path == 'features[1].transform'
  assert 'hours_per_week is float' in str(e.value)
  assert 'string or integer' in str(e.value)


def _feature_error(feature_type, transform):
  from pipeline.config import FeatureConfig  # pylint: disable=g-import-not-at-top
  feature = FeatureConfig(name='x', type=feature_type, transform=transform,
                          buckets=4)
  try:
    feature.validate('features[2]')
  except ConfigError as e:
    return e
  return None


# What transform_feature (preprocessing/transform_fn.py) can do with each
# raw type; test_every_valid_pair_transforms runs each of these.
WORKS = {
    'integer': {'z_score', 'scale_0_1', 'bucketize', 'log', 'vocabulary',
                'hash', 'identity'},
    'float': {'z_score', 'scale_0_1', 'bucketize', 'log', 'identity'},
    'string': {'vocabulary', 'hash', 'identity'},
    'text': {'text'},
}


@pytest.mark.parametrize('feature_type', sorted(WORKS))
@pytest.mark.parametrize('transform', [
    'z_score', 'scale_0_1', 'bucketize', 'log', 'vocabulary', 'hash', 'text',
    'identity'])
def test_every_type_transform_pair_is_checked(feature_type, transform):
  error = _feature_error(feature_type, transform)
  if transform in WORKS[feature_type]:
    assert error is None, error
  else:
    assert error is not None, f'{feature_type} + {transform} passed'
    assert error.path == 'features[2].transform'
    assert f'x is {feature_type}' in str(error)


def test_config_docs_are_generated_from_the_definitions():
  """docs/config.md is `python -m pipeline.config_docs`'s output, and it
  documents every key with its default (model defaults, dropout, ...)."""
  from pipeline import config_docs  # pylint: disable=g-import-not-at-top
  text = config_docs.generate()
  with open(config_docs.DOC_PATH) as f:
    assert f.read() == text, ('docs/config.md is stale: run '
                              'python -m pipeline.config_docs')
  for row in ('| `model.learning_rate` | number | `0.01` |',
              '| `model.linear_learning_rate` | number | `0.1` |',
              '| `model.hidden_units` | list of integer | `[64, 32]` |',
              '| `model.dropout` |', '| `model.cross_buckets` | integer | '
              '`10000` |', '| `model.string_hash_buckets` | integer | '
              '`1000` |', '| `predict.key_column` |'):
    assert row in text, row


def test_every_config_key_has_a_doc():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from pipeline import config as config_lib  # pylint: disable=g-import-not-at-top
  for cls in (config_lib.Config, config_lib.DataConfig,
              config_lib.FeatureConfig, config_lib.LabelConfig,
              config_lib.PreprocessingConfig, config_lib.ModelConfig,
              config_lib.TrainConfig, config_lib.ExportConfig,
              config_lib.PredictConfig):
    for field in dataclasses.fields(cls):
      if field.name != 'source':
        assert field.metadata.get('doc'), f'{cls.__name__}.{field.name}'
