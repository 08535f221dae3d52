"""The pipeline config: one YAML file that every stage reads.

This module is the only place where the config is parsed and validated. Each
section is a dataclass; `load_config` turns YAML (plus `--set` overrides) into
a `Config`, rejecting unknown keys, wrong types and inconsistent settings
before any work starts, with the key path in the message.
"""

import dataclasses
import os
import typing
from typing import Any, List, Optional, Union

import yaml

from pipeline import fs
from pipeline.errors import ConfigError
from pipeline.rundir import RunDir


FEATURE_TYPES = ('integer', 'float', 'string', 'text')
TRANSFORMS = ('z_score', 'scale_0_1', 'bucketize', 'log', 'vocabulary', 'hash',
              'text', 'identity')
NUMERIC_TRANSFORMS = ('z_score', 'scale_0_1', 'bucketize', 'log')
# The feature types each transform works on (preprocessing/transform_fn.py):
# numeric transforms cast to float; vocabularies need strings or integers
# (tft.compute_and_apply_vocabulary rejects floats), and so do hash buckets
# (a float's text is not a stable category); text goes with text only.
TRANSFORM_TYPES = {
    'z_score': ('integer', 'float'),
    'scale_0_1': ('integer', 'float'),
    'bucketize': ('integer', 'float'),
    'log': ('integer', 'float'),
    'vocabulary': ('string', 'integer'),
    'hash': ('string', 'integer'),
    'text': ('text',),
    'identity': ('integer', 'float', 'string'),
}
TEXT_OUTPUTS = ('vocabulary', 'bag_of_words', 'tfidf')
TASKS = ('binary', 'multiclass', 'regression')
COMPUTED_DEFAULTS = ('mean', 'most_frequent')
MODEL_TYPES = ('baseline', 'linear', 'dnn', 'wide_deep', 'custom', 'keras')
KERAS_STYLES = ('sequential', 'functional', 'subclassed')
# How `estpipe train` trains: the Estimator, or natively in Keras.
TRAINERS = ('estimator', 'keras_fit', 'custom_loop')
NATIVE_TRAINERS = ('keras_fit', 'custom_loop')
DISTRIBUTIONS = ('none', 'mirrored', 'multi_worker_mirrored',
                 'parameter_server')
OPTIMIZERS = ('adam', 'adagrad', 'ftrl', 'sgd', 'rmsprop')
LR_SCHEDULES = {'exponential': ('decay_steps', 'decay_rate', 'staircase'),
                'cosine': ('decay_steps', 'alpha'),
                'piecewise': ('boundaries', 'values')}
EARLY_STOPPING_KEYS = ('metric', 'mode', 'max_steps_without_improvement',
                       'min_steps', 'check_every_secs')
# One line per key of the dict-valued settings, for docs/config.md.
EARLY_STOPPING_DOCS = {
    'metric': 'Required. The eval metric to watch, e.g. `loss` or `auc`.',
    'mode': '`min` (default) or `max`: which way is better.',
    'max_steps_without_improvement': 'Required. Stop after this many steps '
                                     'without a better value.',
    'min_steps': 'Never stop before this step (default 0).',
    'check_every_secs': 'Seconds between checks (default 10).',
}
LR_SCHEDULE_DOCS = {
    'decay_steps': 'Steps per decay period (exponential, cosine).',
    'decay_rate': 'Factor per period (exponential).',
    'staircase': 'Decay in whole periods (exponential; default false).',
    'alpha': 'The final factor (cosine; default 0).',
    'boundaries': 'Steps where the factor changes (piecewise).',
    'values': 'Factors of the learning rate, one more than boundaries '
              '(piecewise).',
}


def _field(doc, default=None, factory=None):
  """A config key with its one-line description (docs/config.md is made
  from these: `python -m pipeline.config_docs`)."""
  if factory is not None:
    return dataclasses.field(default_factory=factory, metadata={'doc': doc})
  return dataclasses.field(default=default, metadata={'doc': doc})


@dataclasses.dataclass
class DataConfig:
  """Raw inputs: where they are and how to read them."""
  train: Union[str, List[str]] = _field(
      'Required. The training data: a path or glob (local, gs://, ...), or '
      'a list of them.')
  eval: Optional[Union[str, List[str]]] = _field(
      'The eval data, as `train`; without it, `eval_fraction` of the '
      'training rows (chosen by a hash of the row) are the eval split.')
  format: str = _field('`csv` or `tfrecord` (gzip or plain tf.Examples).',
                       'csv')
  eval_fraction: float = _field(
      'Share of the training rows held out for eval when `eval` is not set, '
      'in (0, 1).', 0.2)
  header: bool = _field('CSV files start with a header line of column '
                        'names.', False)
  columns: Optional[List[str]] = _field(
      'The CSV column names, in order (required without `header`).')
  delimiter: str = _field('The CSV field separator (one character).', ',')
  missing: List[str] = _field(
      'Field values that mean "missing" (filled by a feature\'s `default`).',
      factory=lambda: ['', '?', 'NA'])

  def validate(self, path):
    if not self.train:
      raise ConfigError(f'{path}.train', 'required: a path or glob of the '
                        'training data')
    if self.format not in ('csv', 'tfrecord'):
      raise ConfigError(f'{path}.format',
                        f'expected csv or tfrecord, got {self.format!r}')
    if not 0.0 < self.eval_fraction < 1.0:
      raise ConfigError(f'{path}.eval_fraction',
                        f'expected a number in (0, 1), got {self.eval_fraction}')
    if self.format == 'csv' and not self.header and not self.columns:
      raise ConfigError(f'{path}.columns', 'CSV without a header needs the '
                        'column names (or set header: true)')
    if len(self.delimiter) != 1:
      raise ConfigError(f'{path}.delimiter',
                        f'expected one character, got {self.delimiter!r}')

  @property
  def train_patterns(self):
    return _as_list(self.train)

  @property
  def eval_patterns(self):
    return _as_list(self.eval)


def transforms_for(feature_type):
  """The transforms that work on a feature of this type."""
  return [t for t in TRANSFORMS if feature_type in TRANSFORM_TYPES[t]]


@dataclasses.dataclass
class FeatureConfig:
  """One raw column and how tf.Transform turns it into a model input."""
  name: str = _field('Required. The raw column (and model input) name.')
  type: str = _field('Required. The raw type: integer, float, string or '
                     'text.')
  transform: str = _field(
      'z_score, scale_0_1, log, bucketize, vocabulary, hash, text or '
      'identity; which types each takes is in the table below.', 'identity')
  default: Optional[Union[float, str]] = _field(
      'Fill for a missing value: a constant, `mean` (numeric) or '
      '`most_frequent`; unset: 0 or "".')
  buckets: Optional[int] = _field('Required for bucketize (quantile '
                                  'buckets) and hash (hash buckets), >= 2.')
  top_k: Optional[int] = _field('vocabulary, text: keep only the k most '
                                'frequent values.')
  oov_buckets: int = _field('vocabulary, text: ids for values outside the '
                            'vocabulary.', 1)
  frequency_threshold: Optional[int] = _field(
      'vocabulary, text: keep only values seen at least this often.')
  text_output: str = _field('text: `vocabulary` (token ids in order), '
                            '`bag_of_words` or `tfidf`.', 'bag_of_words')
  ngrams: int = _field('text: n-grams up to this length (bag_of_words, '
                       'tfidf).', 1)

  def validate(self, path):
    if not self.name:
      raise ConfigError(f'{path}.name', 'required')
    if self.type not in FEATURE_TYPES:
      raise ConfigError(f'{path}.type',
                        f'expected one of {", ".join(FEATURE_TYPES)}, '
                        f'got {self.type!r}')
    if self.transform not in TRANSFORMS:
      raise ConfigError(f'{path}.transform',
                        f'unknown transform {self.transform!r}; expected one '
                        f'of {", ".join(TRANSFORMS)}')
    numeric = self.type in ('integer', 'float')
    allowed = TRANSFORM_TYPES[self.transform]
    if self.type not in allowed:
      if self.type == 'text':
        hint = 'type text goes with transform text, and only with it'
      else:
        hint = (f'use one of {", ".join(transforms_for(self.type))} for a '
                f'{self.type} feature')
      needs = ' or '.join(allowed)
      raise ConfigError(f'{path}.transform', f'{self.transform} needs '
                        f'{"an" if needs[0] in "aeiou" else "a"} {needs} '
                        f'feature, {self.name} is {self.type} ({hint})')
    if self.transform in ('bucketize', 'hash'):
      if not isinstance(self.buckets, int) or self.buckets < 2:
        raise ConfigError(f'{path}.buckets', f'{self.transform} needs '
                          'buckets: an integer >= 2')
    if self.text_output not in TEXT_OUTPUTS:
      raise ConfigError(f'{path}.text_output', f'expected one of '
                        f'{", ".join(TEXT_OUTPUTS)}, got {self.text_output!r}')
    if self.ngrams < 1:
      raise ConfigError(f'{path}.ngrams', 'expected an integer >= 1')
    if isinstance(self.default, str) and numeric:
      if self.default not in COMPUTED_DEFAULTS:
        raise ConfigError(f'{path}.default', f'expected a number, mean or '
                          f'most_frequent, got {self.default!r}')
    if self.default == 'mean' and not numeric:
      raise ConfigError(f'{path}.default', 'mean needs a numeric feature')

  @property
  def is_numeric(self):
    return self.type in ('integer', 'float')


@dataclasses.dataclass
class LabelConfig:
  """The prediction target: a column, or an expression over columns."""
  name: str = _field('Required. The label column, or the name of the '
                     'derived label (`expression`).')
  task: str = _field('binary, multiclass or regression.', 'binary')
  values: Optional[List[str]] = _field(
      'The class names in class-index order (classification without an '
      '`expression`); other values are rejected.')
  expression: Optional[str] = _field(
      'A derived binary or regression label over raw numeric columns, e.g. '
      '`tips > 0.2 * fare`.')

  def validate(self, path):
    if not self.name:
      raise ConfigError(f'{path}.name', 'required')
    if self.task not in TASKS:
      raise ConfigError(f'{path}.task', f'expected one of {", ".join(TASKS)},'
                        f' got {self.task!r}')
    if self.task != 'regression' and not self.expression:
      if not self.values or len(self.values) < 2:
        raise ConfigError(f'{path}.values', f'a {self.task} label needs its '
                          'values (at least two), or an expression')
    if self.task == 'binary' and self.values and len(self.values) != 2:
      raise ConfigError(f'{path}.values', 'a binary label has exactly two '
                        f'values, got {len(self.values)}')
    if self.expression and self.task == 'multiclass':
      raise ConfigError(f'{path}.expression', 'expressions make binary or '
                        'regression labels')

  @property
  def n_classes(self):
    if self.task == 'regression':
      return None
    return 2 if self.expression else len(self.values)

  @property
  def vocabulary(self):
    """Class names, in class-index order."""
    if self.task == 'regression':
      return None
    if self.expression:
      return ['false', 'true']
    return [str(v) for v in self.values]


@dataclasses.dataclass
class PreprocessingConfig:
  """How tf.Transform runs (the Beam job)."""
  module: Optional[str] = _field(
      'A Python file whose `preprocessing_fn` replaces the generated one.')
  max_reject_fraction: float = _field(
      'The run (and `estpipe predict`) fails when more of the rows than this '
      'are rejected, in [0, 1].', 0.01)
  batch_size: int = _field('Rows per Arrow record batch: larger batches '
                           'mean fewer TensorFlow calls.', 5000)

  def validate(self, path):
    if not 0.0 <= self.max_reject_fraction <= 1.0:
      raise ConfigError(f'{path}.max_reject_fraction',
                        'expected a number in [0, 1]')
    if self.batch_size < 1:
      raise ConfigError(f'{path}.batch_size', 'expected an integer >= 1')
    if self.module and not os.path.exists(self.module):
      raise ConfigError(f'{path}.module', f'no such file: {self.module}')


@dataclasses.dataclass
class ModelConfig:
  """Which Estimator to build (see estimators/)."""
  type: str = _field('baseline, linear, dnn, wide_deep, custom or keras.',
                     'wide_deep')
  hidden_units: List[int] = _field('The deep part\'s layer widths.',
                                   factory=lambda: [64, 32])
  embedding_dim: int = _field('Embedding width of the deep part\'s larger '
                              'categorical columns.', 8)
  crosses: List[List[str]] = _field(
      'Feature crosses for the wide part, e.g. `[[education, occupation]]`.',
      factory=list)
  keras_style: str = _field('model.type keras: sequential, functional or '
                            'subclassed.', 'functional')
  module: Optional[str] = _field(
      'A Python file with your `model_fn` (type custom) or '
      '`build_keras_model` (type keras).')
  learning_rate: float = _field('The deep part\'s (and custom and Keras '
                                'models\') learning rate.', 0.01)
  dropout: Optional[float] = _field('Dropout rate of the hidden layers, in '
                                    '[0, 1); unset: none.')
  optimizer: str = _field('The deep part\'s optimizer: adam, adagrad, ftrl, '
                          'sgd or rmsprop.', 'adam')
  linear_optimizer: str = _field(
      'The optimizer of `linear` and the wide part of `wide_deep` (FTRL '
      'suits sparse columns).', 'ftrl')
  linear_learning_rate: float = _field('The learning rate of '
                                       '`linear_optimizer`.', 0.1)
  max_indicator_size: int = _field(
      'Categorical columns up to this many ids are one-hot in the deep '
      'part, larger ones embedded with `embedding_dim`.', 16)
  cross_buckets: int = _field('Hash space of a crossed column (the product '
                              'of the sizes, capped here).', 10000)
  wide_numeric_buckets: bool = _field(
      'The wide part also gets bucketized numeric features.', True)
  string_hash_buckets: int = _field(
      'Hash buckets of string features passed through untransformed '
      '(transform identity).', 1000)

  def validate(self, path):
    if self.type not in MODEL_TYPES:
      raise ConfigError(f'{path}.type', f'expected one of '
                        f'{", ".join(MODEL_TYPES)}, got {self.type!r}')
    if self.keras_style not in KERAS_STYLES:
      raise ConfigError(f'{path}.keras_style', f'expected one of '
                        f'{", ".join(KERAS_STYLES)}, got {self.keras_style!r}')
    if self.module and not os.path.exists(self.module):
      raise ConfigError(f'{path}.module', f'no such file: {self.module}')
    for key in ('optimizer', 'linear_optimizer'):
      if getattr(self, key) not in OPTIMIZERS:
        raise ConfigError(f'{path}.{key}', f'expected one of '
                          f'{", ".join(OPTIMIZERS)}, got '
                          f'{getattr(self, key)!r}')
    if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f'{path}.dropout', 'expected a number in [0, 1)')
    if not self.hidden_units or min(self.hidden_units) < 1:
      raise ConfigError(f'{path}.hidden_units', 'expected a non-empty list '
                        'of positive integers')
    for key in ('embedding_dim', 'cross_buckets', 'string_hash_buckets'):
      if getattr(self, key) < 1:
        raise ConfigError(f'{path}.{key}', 'expected an integer >= 1')
    for i, cross in enumerate(self.crosses):
      if len(cross) < 2:
        raise ConfigError(f'{path}.crosses[{i}]', 'a cross needs at least '
                          'two features')


@dataclasses.dataclass
class TrainConfig:
  """How to train: steps, batch size, RunConfig and distribution."""
  steps: Optional[int] = _field('Global steps to train to; set this or '
                                '`epochs`.')
  epochs: Optional[float] = _field('Passes over the training split, instead '
                                   'of `steps`.')
  batch_size: int = _field('Examples per step (global).', 128)
  eval_steps: Optional[int] = _field('Batches per evaluation; unset: the '
                                     'whole eval split.')
  eval_throttle_secs: int = _field('Seconds at least between evaluations.',
                                   10)
  save_checkpoints_steps: int = _field('Steps between checkpoints (each is '
                                       'evaluated and exported).', 500)
  keep_checkpoint_max: int = _field('Checkpoints kept.', 5)
  log_step_count_steps: int = _field(
      'Steps between progress lines (step, loss, examples/sec, a new eval '
      'result).', 100)
  seed: int = _field('Random seed of the model and the input shuffling.',
                     42)
  distribution: str = _field('none, mirrored, multi_worker_mirrored or '
                             'parameter_server.', 'none')
  num_devices: int = _field('mirrored without GPUs: this many logical '
                            'CPUs.', 2)
  early_stopping: Optional[dict] = _field(
      'Stop when an eval metric stops improving (keys below).')
  learning_rate_schedule: Optional[dict] = _field(
      'exponential, cosine or piecewise decay of the learning rates (keys '
      'below).')
  warm_start_from: Optional[str] = _field(
      'Another run directory (or its model/) to initialize the variables '
      'from.')
  save_summary_steps: int = _field('Steps between TensorBoard summaries.',
                                   100)
  shuffle_buffer: int = _field('Examples in the input shuffle buffer.',
                               10000)
  eval_start_delay_secs: int = _field(
      'Seconds the continuous evaluator waits before its first '
      'evaluation.', 0)
  trainer: str = _field(
      'estimator (tf.estimator.train_and_evaluate), or keras_fit: native '
      'Keras `model.fit` on tf.data, for `model.type: keras` only, exported '
      'with the same signatures (custom_loop: not yet available).',
      'estimator')

  def validate(self, path):
    if self.trainer not in TRAINERS:
      raise ConfigError(f'{path}.trainer', f'expected one of '
                        f'{", ".join(TRAINERS)}, got {self.trainer!r}')
    if self.trainer == 'custom_loop':
      raise ConfigError(f'{path}.trainer', 'custom_loop is not yet '
                        'available: use estimator or keras_fit')
    if self.trainer in NATIVE_TRAINERS and self.distribution != 'none':
      raise ConfigError(f'{path}.trainer', f'{self.trainer} trains on one '
                        'machine: train.distribution must be none (not yet '
                        f'{self.distribution})')
    if self.trainer in NATIVE_TRAINERS and self.warm_start_from:
      raise ConfigError(f'{path}.trainer', f'{self.trainer} does not warm '
                        'start yet: leave out train.warm_start_from')
    if self.distribution not in DISTRIBUTIONS:
      raise ConfigError(f'{path}.distribution', f'expected one of '
                        f'{", ".join(DISTRIBUTIONS)}, got '
                        f'{self.distribution!r}')
    if self.steps is not None and self.steps < 1:
      raise ConfigError(f'{path}.steps', 'expected an integer >= 1')
    if self.epochs is not None and self.epochs <= 0:
      raise ConfigError(f'{path}.epochs', 'expected a number > 0')
    if self.steps is not None and self.epochs is not None:
      raise ConfigError(f'{path}.epochs', 'set train.steps or train.epochs, '
                        'not both')
    for key in ('batch_size', 'save_checkpoints_steps', 'keep_checkpoint_max',
                'log_step_count_steps', 'save_summary_steps',
                'shuffle_buffer', 'num_devices'):
      if getattr(self, key) < 1:
        raise ConfigError(f'{path}.{key}', 'expected an integer >= 1')
    if self.eval_steps is not None and self.eval_steps < 1:
      raise ConfigError(f'{path}.eval_steps', 'expected an integer >= 1 '
                        '(or leave it out to evaluate the whole eval split)')
    if self.early_stopping is not None:
      _validate_early_stopping(self.early_stopping, f'{path}.early_stopping')
    if self.learning_rate_schedule is not None:
      _validate_lr_schedule(self.learning_rate_schedule,
                            f'{path}.learning_rate_schedule')


def _validate_early_stopping(spec, path):
  for key in spec:
    if key not in EARLY_STOPPING_KEYS:
      raise ConfigError(f'{path}.{key}', 'unknown key; expected one of '
                        f'{", ".join(EARLY_STOPPING_KEYS)}')
  if not isinstance(spec.get('metric'), str):
    raise ConfigError(f'{path}.metric', 'required: the eval metric to watch, '
                      'e.g. loss or auc')
  if spec.get('mode', 'min') not in ('min', 'max'):
    raise ConfigError(f'{path}.mode', f'expected min or max, got '
                      f'{spec["mode"]!r}')
  steps = spec.get('max_steps_without_improvement')
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ConfigError(f'{path}.max_steps_without_improvement',
                      'required: an integer >= 1')
  for key in ('min_steps', 'check_every_secs'):
    value = spec.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ConfigError(f'{path}.{key}', 'expected an integer >= 0')


def _validate_lr_schedule(spec, path):
  kind = spec.get('type')
  if kind not in LR_SCHEDULES:
    raise ConfigError(f'{path}.type', f'expected one of '
                      f'{", ".join(LR_SCHEDULES)}, got {kind!r}')
  allowed = LR_SCHEDULES[kind]
  for key in spec:
    if key != 'type' and key not in allowed:
      raise ConfigError(f'{path}.{key}', f'unknown key for a {kind} schedule;'
                        f' expected {", ".join(allowed)}')
  if kind == 'piecewise':
    boundaries, values = spec.get('boundaries'), spec.get('values')
    if not isinstance(boundaries, list) or not isinstance(values, list) or (
        len(values) != len(boundaries) + 1):
      raise ConfigError(path, 'a piecewise schedule needs boundaries (steps) '
                        'and values, one more value than boundaries')
  else:
    steps = spec.get('decay_steps')
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
      raise ConfigError(f'{path}.decay_steps', 'required: an integer >= 1')
    if kind == 'exponential' and not isinstance(
        spec.get('decay_rate'), (int, float)):
      raise ConfigError(f'{path}.decay_rate', 'required: a number')


@dataclasses.dataclass
class ExportConfig:
  """Which SavedModels to export (see serving/)."""
  exporters: List[str] = _field(
      'Exporters run after evaluations: `final`, `latest` (keeps `keep`), '
      '`best` (by `best_metric`).', factory=lambda: ['final'])
  keep: int = _field('Exports the `latest` exporter keeps.', 5)
  best_metric: Optional[str] = _field('The eval metric the `best` exporter '
                                      'compares; unset: loss.')
  best_mode: str = _field('min, max, or auto (min for loss/error-like '
                          'names).', 'auto')

  def validate(self, path):
    for i, name in enumerate(self.exporters):
      if name not in ('latest', 'best', 'final'):
        raise ConfigError(f'{path}.exporters[{i}]', 'expected latest, best or'
                          f' final, got {name!r}')
    if len(set(self.exporters)) != len(self.exporters):
      raise ConfigError(f'{path}.exporters', 'each exporter may appear once')
    if self.keep < 1:
      raise ConfigError(f'{path}.keep', 'expected an integer >= 1')
    if self.best_mode not in ('auto', 'min', 'max'):
      raise ConfigError(f'{path}.best_mode', 'expected auto, min or max, got '
                        f'{self.best_mode!r}')


@dataclasses.dataclass
class PredictConfig:
  """Batch prediction (`estpipe predict`, see serving/predict.py)."""
  key_column: Optional[str] = _field(
      'A column of the data whose value keys each prediction (output `key`) '
      'instead of `file:line`; a row with an empty key is rejected.')

  def validate(self, path, columns):
    if self.key_column is None:
      return
    if not self.key_column:
      raise ConfigError(f'{path}.key_column', 'expected a column name')
    if columns is not None and self.key_column not in columns:
      raise ConfigError(f'{path}.key_column', f'{self.key_column!r} is not a '
                        f'column of the data (columns: {", ".join(columns)})')


@dataclasses.dataclass
class Config:
  """The whole pipeline config."""
  run_dir: str = _field('Required. The run directory every stage reads '
                        'and writes (local or remote).')
  data: DataConfig = _field('Required. The raw data.')
  features: List[FeatureConfig] = _field(
      'Required. The model inputs: one item per raw column.')
  label: LabelConfig = _field('Required. The prediction target.')
  name: str = _field('A name for the pipeline.', 'estpipe')
  preprocessing: PreprocessingConfig = _field(
      'The tf.Transform job.', factory=PreprocessingConfig)
  model: ModelConfig = _field('The Estimator.', factory=ModelConfig)
  train: TrainConfig = _field('Training and evaluation.',
                              factory=TrainConfig)
  export: ExportConfig = _field('SavedModel exports.', factory=ExportConfig)
  predict: PredictConfig = _field('Batch prediction (`estpipe predict`).',
                                  factory=PredictConfig)
  # Where the YAML file was; relative paths inside it are resolved from here.
  source: Optional[str] = None

  def validate(self, check_columns=True):
    for key in ('run_dir', 'data', 'features', 'label'):
      if getattr(self, key) in (None, []):
        raise ConfigError(key, 'required')
    self.data.validate('data')
    seen = set()
    for i, feature in enumerate(self.features):
      feature.validate(f'features[{i}]')
      if feature.name in seen:
        raise ConfigError(f'features[{i}].name',
                          f'duplicate feature {feature.name!r}')
      seen.add(feature.name)
    self.label.validate('label')
    if self.label.name in seen:
      raise ConfigError('label.name', f'{self.label.name!r} is also a '
                        'feature name')
    self.preprocessing.validate('preprocessing')
    self.model.validate('model')
    self.train.validate('train')
    if self.train.trainer in NATIVE_TRAINERS and self.model.type != 'keras':
      raise ConfigError('train.trainer', f'{self.train.trainer} trains Keras '
                        'models only (model.type keras, built in or from '
                        f'model.module); model.type is {self.model.type!r}: '
                        'use train.trainer estimator')
    self.export.validate('export')
    columns = self._check_columns() if check_columns else None
    self.predict.validate('predict', columns)
    for i, cross in enumerate(self.model.crosses):
      for name in cross:
        if name not in seen:
          raise ConfigError(f'model.crosses[{i}]',
                            f'{name!r} is not a feature')

  def _check_columns(self):
    """Features and the label must exist in the data's columns; returns
    those columns (None when the data does not name them: TFRecords)."""
    columns = self.raw_columns()
    if columns is None:
      return None
    for i, feature in enumerate(self.features):
      if feature.name not in columns:
        raise ConfigError(f'features[{i}].name', f'{feature.name!r} is not '
                          f'a column of the data (columns: '
                          f'{", ".join(columns)})')
    if self.label.expression:
      for name in label_expression_names(self.label.expression):
        if name not in columns:
          raise ConfigError('label.expression', f'{name!r} is not a column '
                            'of the data')
    elif self.label.name not in columns:
      raise ConfigError('label.name', f'{self.label.name!r} is not a column '
                        f'of the data (columns: {", ".join(columns)})')
    return columns

  def raw_columns(self):
    """The data's column names: from the config, or a CSV header."""
    if self.data.columns:
      return list(self.data.columns)
    if self.data.format == 'csv' and self.data.header:
      return _read_csv_header(self.data)
    return None

  @property
  def feature_names(self):
    return [f.name for f in self.features]

  def feature(self, name):
    for f in self.features:
      if f.name == name:
        return f
    raise KeyError(name)

  @property
  def rundir(self):
    """The run directory's paths (pipeline/rundir.py owns the layout)."""
    return RunDir(self.run_dir)

  def to_dict(self):
    return dataclasses.asdict(self)


def label_expression_names(expression):
  import ast  # pylint: disable=g-import-not-at-top
  try:
    tree = ast.parse(expression, mode='eval')
  except SyntaxError as e:
    raise ConfigError('label.expression', f'not a valid expression: {e.msg}')
  return sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)})


def _as_list(value):
  if value is None:
    return []
  return [value] if isinstance(value, str) else list(value)


def _read_csv_header(data):
  """The first file's header; any file system and compression Beam reads."""
  import csv  # pylint: disable=g-import-not-at-top
  try:
    first = fs.expand_patterns(data.train_patterns[:1], 'data.train')[0]
  except FileNotFoundError as e:
    raise ConfigError('data.train', str(e).split(': ', 1)[-1]) from None
  line = fs.read_first_line(first)
  return [c.strip() for c in next(csv.reader([line],
                                             delimiter=data.delimiter))]


# --- building dataclasses from plain dicts, with key paths in errors --------

_PATH_KEYS = {('run_dir',), ('data', 'train'), ('data', 'eval'),
              ('preprocessing', 'module'), ('model', 'module'),
              ('train', 'warm_start_from')}


def _type_name(tp):
  return getattr(tp, '__name__', str(tp).replace('typing.', ''))


def _convert(value, tp, path):
  """Checks `value` against the annotation `tp`; builds nested dataclasses."""
  origin = typing.get_origin(tp)
  if origin is Union:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _convert(value, arg, path)
      except ConfigError as e:
        errors.append(e)
    if len(errors) == 1:
      raise errors[0]
    names = ' or '.join(_type_name(a) for a in args if a is not type(None))
    raise ConfigError(path, f'expected {names}, got {value!r}')
  if origin in (list, List):
    (item_type,) = typing.get_args(tp)
    if not isinstance(value, list):
      raise ConfigError(path, f'expected a list, got {value!r}')
    return [_convert(v, item_type, f'{path}[{i}]') for i, v in
            enumerate(value)]
  if dataclasses.is_dataclass(tp):
    return _build(tp, value, path)
  if tp is Any:
    return value
  if tp is dict:
    if not isinstance(value, dict):
      raise ConfigError(path, f'expected a mapping, got {value!r}')
    return value
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(path, f'expected a number, got {value!r}')
    return float(value)
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(path, f'expected an integer, got {value!r}')
    return value
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(path, f'expected true or false, got {value!r}')
    return value
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(path, f'expected a string, got {value!r}')
    return value
  raise TypeError(f'unsupported annotation {tp} at {path}')


def _build(cls, value, path):
  if value is None:
    return cls()
  if not isinstance(value, dict):
    raise ConfigError(path, f'expected a mapping, got {value!r}')
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls) if f.name != 'source'}
  kwargs = {}
  for key, item in value.items():
    key_path = f'{path}.{key}' if path else str(key)
    if key not in fields:
      raise ConfigError(key_path, 'unknown key; expected one of '
                        f'{", ".join(sorted(fields))}')
    kwargs[key] = _convert(item, hints[key], key_path)
  return cls(**kwargs)


def _set_path(tree, dotted, value):
  """Applies one `--set a.b=value` override to the raw YAML tree."""
  parts = dotted.split('.')
  node = tree
  for i, part in enumerate(parts[:-1]):
    key = _index_key(node, part, '.'.join(parts[:i + 1]))
    if isinstance(node, dict) and key not in node:
      node[key] = {}
    node = node[key]
  last = _index_key(node, parts[-1], dotted)
  node[last] = value


def _index_key(node, part, path):
  if isinstance(node, list):
    # features.age.transform: address a list of named items by name.
    for i, item in enumerate(node):
      if isinstance(item, dict) and item.get('name') == part:
        return i
    if part.isdigit() and int(part) < len(node):
      return int(part)
    raise ConfigError(path, f'no list item named {part!r}')
  if not isinstance(node, dict):
    raise ConfigError(path, 'cannot set a key inside a non-mapping value')
  return part


def parse_override(text):
  """'key.path=value' -> (key.path, YAML-typed value)."""
  if '=' not in text:
    raise ConfigError(text, 'a --set override looks like key.path=value')
  key, raw = text.split('=', 1)
  return key.strip(), yaml.safe_load(raw) if raw else ''


def _resolve(base, value):
  if value is None:
    return None
  if isinstance(value, list):
    return [_resolve(base, v) for v in value]
  if '://' in value or os.path.isabs(value):
    return value
  return os.path.normpath(os.path.join(base, value))


def _resolve_paths(tree, base):
  for keys in _PATH_KEYS:
    node = tree
    for key in keys[:-1]:
      node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and isinstance(node.get(keys[-1]), (str, list)):
      node[keys[-1]] = _resolve(base, node[keys[-1]])


def load_config(path, overrides=(), check_columns=True):
  """Reads, overrides and validates a pipeline config.

  Relative paths in the file are taken from the file's folder; relative paths
  in overrides from the current directory, as a shell user expects.
  """
  try:
    with open(path) as f:
      tree = yaml.safe_load(f)
  except FileNotFoundError:
    raise ConfigError('', f'config file not found: {path}')
  except yaml.YAMLError as e:
    raise ConfigError('', f'{path} is not valid YAML: {e}')
  if not isinstance(tree, dict):
    raise ConfigError('', f'{path}: expected a mapping at the top level')
  _resolve_paths(tree, os.path.dirname(os.path.abspath(path)))
  for text in overrides:
    key, value = parse_override(text)
    if tuple(key.split('.')) in _PATH_KEYS:
      value = _resolve(os.getcwd(), value)
    _set_path(tree, key, value)
  config = config_from_dict(tree, check_columns=check_columns)
  config.source = os.path.abspath(path)
  return config


def config_from_dict(tree, check_columns=True):
  config = _build(Config, tree, '')
  config.validate(check_columns=check_columns)
  return config
