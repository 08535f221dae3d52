"""The model server on a real pipeline export (serving/export.py).

Trains the synthetic example for a few steps on a copy of the session's
preprocessed run, exports it the pipeline's way, serves RUN_DIR/export and
checks REST raw-feature predict and classify against the SavedModel called
in process.
"""

import csv
import dataclasses
import glob
import json
import os
import shutil

import numpy as np
import pytest
import requests

tf = pytest.importorskip('tensorflow')
export_lib = pytest.importorskip('serving.export')

# pylint: disable=g-import-not-at-top,redefined-outer-name
from serving.server import ModelServer, ServerOptions
from serving.versions import ModelConfig


@pytest.fixture(scope='module')
def exported_run(synthetic_run, synthetic_csv, tmp_path_factory):
  from estimators import inputs, models, train
  run_dir = tmp_path_factory.mktemp('served_run')
  for name in ('transform', 'data'):
    shutil.copytree(synthetic_run.path(name), run_dir / name)
  shutil.copy(synthetic_run.path('preprocess.json'), run_dir)
  config = dataclasses.replace(
      synthetic_run, run_dir=str(run_dir),
      train=dataclasses.replace(synthetic_run.train, steps=20))
  tft_output = train.load_tft_output(config)
  estimator = train.build_estimator(config, tft_output=tft_output,
                                    warm_start=False)
  estimator.train(inputs.make_input_fn(config, tft_output, 'train', True,
                                       models.label_format(config)),
                  max_steps=20)
  path = export_lib.export_saved_model(config, estimator)
  with open(sorted(glob.glob(os.path.join(synthetic_csv, '*.csv')))[0]) as f:
    rows = [row for _, row in zip(range(4), csv.DictReader(f))]
  return config, path, rows


def _typed(config, row):
  """A CSV row as JSON values of the raw features' types."""
  values = {}
  for feature in config.features:
    text = row[feature.name]
    if feature.type in ('integer', 'float'):
      values[feature.name] = (float(text) if feature.type == 'float'
                              else int(text))
    else:
      values[feature.name] = text
  return values


def test_pipeline_export_answers_like_in_process(exported_run):
  config, path, rows = exported_run
  loaded = tf.saved_model.load(path)
  typed = [_typed(config, row) for row in rows]
  srv = ModelServer(ServerOptions(
      models=[ModelConfig('census', config.export_dir)], grpc_port=None,
      rest_port=0, poll_wait_seconds=0)).start()
  try:
    base = f'http://127.0.0.1:{srv.rest_port}/v1/models/census'
    raw = loaded.signatures[export_lib.RAW_SIGNATURE]
    specs = raw.structured_input_signature[1]
    expected = raw(**{name: tf.constant([row[name] for row in typed],
                                        dtype=spec.dtype)
                      for name, spec in specs.items()})
    response = requests.post(f'{base}:predict', timeout=60, data=json.dumps({
        'signature_name': export_lib.RAW_SIGNATURE, 'instances': typed}))
    assert response.status_code == 200, response.text
    predictions = response.json()['predictions']
    key = 'probabilities'
    np.testing.assert_allclose([p[key] for p in predictions],
                               expected[key].numpy(), rtol=1e-5, atol=1e-7)

    response = requests.post(f'{base}:classify', timeout=60,
                             data=json.dumps({'examples': typed}))
    assert response.status_code == 200, response.text
    scores = [[score for _, score in r] for r in response.json()['results']]
    np.testing.assert_allclose(scores, expected[key].numpy(), rtol=1e-5,
                               atol=1e-7)
    labels = [label for label, _ in response.json()['results'][0]]
    assert labels == list(config.label.vocabulary)
  finally:
    srv.stop(grace=5)
