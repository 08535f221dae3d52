"""Trained and exported runs shared by test_export.py and test_predict.py.

Training is cached per session (keyed by the preprocessed run), so both
test files use one trained Census model.
"""

import dataclasses
import os
import shutil

_CACHE = {}
TRAIN_STEPS = 100


def copy_preprocessed(config, run_dir, **sections):
  """A copy of a preprocessed run (transform, data, marker) in run_dir."""
  os.makedirs(run_dir, exist_ok=True)
  for name in ('transform', 'data'):
    shutil.copytree(config.rundir.path(name), os.path.join(run_dir, name))
  shutil.copy(config.rundir.preprocess_summary, run_dir)
  return dataclasses.replace(config, run_dir=str(run_dir), **sections)


def train_briefly(config, steps=TRAIN_STEPS):
  """Trains the configured Estimator for a few steps; returns it."""
  from estimators import inputs, models, train  # pylint: disable=g-import-not-at-top
  tft_output = train.load_tft_output(config)
  estimator = train.build_estimator(config, tft_output=tft_output,
                                    warm_start=False)
  estimator.train(inputs.make_input_fn(config, tft_output, 'train', True,
                                       models.label_format(config)),
                  max_steps=steps)
  return estimator


def trained_export(preprocessed, tmp_path_factory, name='census', **sections):
  """(config, export path) of a briefly trained, exported copy of a run."""
  key = (preprocessed.run_dir, name)
  if key not in _CACHE:
    from serving import export  # pylint: disable=g-import-not-at-top
    run_dir = tmp_path_factory.mktemp(f'{name}_exported')
    config = copy_preprocessed(preprocessed, run_dir, **sections)
    estimator = train_briefly(config)
    _CACHE[key] = (config, export.export_saved_model(config, estimator))
  return _CACHE[key]


def census_eval_rows(config, limit=None):
  """(line number, typed values) of good Census eval rows, in file order."""
  from preprocessing import rows as rows_lib  # pylint: disable=g-import-not-at-top
  from serving import raw_examples  # pylint: disable=g-import-not-at-top
  parser = raw_examples.row_parser(config)
  found = []
  for number, _, values in parser.read_file(config.data.eval_patterns[0]):
    if not isinstance(values, rows_lib.Reject):
      found.append((number, values))
    if limit and len(found) >= limit:
      break
  return parser, found
