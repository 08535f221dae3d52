"""The model server on a real pipeline export (serving/export.py).

Trains the synthetic example for a few steps on a copy of the session's
preprocessed run, exports it the pipeline's way, serves RUN_DIR/export and
checks REST raw-feature predict and classify against the SavedModel called
in process, and that `:classify` types JSON numbers by the export's raw
feature kinds (REST and gRPC).
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
from pipeline import signatures
from serving import grpc_service, rest
from serving.server import ModelServer, ServerOptions
from serving.versions import ModelConfig

# What `estpipe serve` opens: the REST and gRPC front ends.
FRONT_ENDS = (grpc_service.start, rest.start)


@pytest.fixture(scope='module')
def exported_run(synthetic_run, synthetic_csv, tmp_path_factory):
  from estimators import inputs, models, train
  run_dir = tmp_path_factory.mktemp('served_run')
  for name in ('transform', 'data'):
    shutil.copytree(synthetic_run.rundir.path(name), run_dir / name)
  shutil.copy(synthetic_run.rundir.preprocess_summary, run_dir)
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


@pytest.fixture(scope='module')
def loaded(exported_run):
  return tf.saved_model.load(exported_run[1])


@pytest.fixture(scope='module')
def server(exported_run, tmp_path_factory):
  """Serves the export as 'census', and as 'legacy' without raw_features."""
  config, path, _ = exported_run
  legacy = tmp_path_factory.mktemp('legacy_export')
  _without_raw_features(path, str(legacy))
  srv = ModelServer(ServerOptions(
      models=[ModelConfig('census', config.rundir.export),
              ModelConfig('legacy', str(legacy))],
      grpc_port=0, rest_port=0, poll_wait_seconds=0), FRONT_ENDS).start()
  yield srv
  srv.stop(grace=5)


def _without_raw_features(path, base):
  """A copy of an export as exports before raw_features in metadata were."""
  target = os.path.join(base, os.path.basename(path))
  shutil.copytree(path, target)
  meta_path = os.path.join(target, export_lib.METADATA_FILE)
  with open(meta_path) as f:
    meta = json.load(f)
  del meta['raw_features']
  with open(meta_path, 'w') as f:
    json.dump(meta, f)


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


def test_pipeline_export_answers_like_in_process(exported_run, loaded,
                                                 server):
  config, _, rows = exported_run
  typed = [_typed(config, row) for row in rows]
  base = f'http://127.0.0.1:{server.rest_port}/v1/models/census'
  raw = loaded.signatures[signatures.RAW_SIGNATURE]
  specs = raw.structured_input_signature[1]
  expected = raw(**{name: tf.constant([row[name] for row in typed],
                                      dtype=spec.dtype)
                    for name, spec in specs.items()})
  response = requests.post(f'{base}:predict', timeout=60, data=json.dumps({
      'signature_name': signatures.RAW_SIGNATURE, 'instances': typed}))
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


def _whole_numbers(config, row):
  """A row as JSON sends it from most clients: numbers without a type.

  Float features are whole numbers (JSON ints) and integer features carry a
  fraction part of zero (JSON floats); returns (as sent, as the export's
  raw feature types).
  """
  sent, typed = {}, {}
  for name, value in _typed(config, row).items():
    kind = config.feature(name).type
    if kind == 'float':
      sent[name], typed[name] = round(value), float(round(value))
    elif kind == 'integer':
      sent[name], typed[name] = float(value), value
    else:
      sent[name] = typed[name] = value
  return sent, typed


def test_classify_types_json_numbers_as_the_export_parses_them(
    exported_run, loaded, server):
  import grpc
  from serving import codec
  from tensorflow_serving.apis import classification_pb2
  from tensorflow_serving.apis import prediction_service_pb2_grpc
  config, path, rows = exported_run
  kinds = export_lib.read_metadata(path)['raw_features']
  assert kinds['age'] == 'integer' and kinds['capital_gain'] == 'float'
  assert kinds['workclass'] == 'string' and kinds['notes'] == 'string'
  assert set(kinds) == {f.name for f in config.features}
  sent, typed = zip(*[_whole_numbers(config, row) for row in rows])
  assert isinstance(sent[0]['capital_gain'], int)
  assert isinstance(sent[0]['age'], float)
  # Values of the right types need no coercion: TF Serving's typing.
  expected = loaded.signatures['classification'](inputs=tf.constant([
      codec.json_to_example(t, 'typed').SerializeToString()
      for t in typed]))['scores'].numpy()
  base = f'http://127.0.0.1:{server.rest_port}/v1/models'
  response = requests.post(f'{base}/census:classify', timeout=60,
                           data=json.dumps({'examples': list(sent)}))
  assert response.status_code == 200, response.text
  scores = [[s for _, s in r] for r in response.json()['results']]
  np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-7)

  for feature, value, kind in (('capital_gain', '1200', 'a float'),
                               ('age', 39.5, 'an integer'),
                               ('workclass', 3, 'a string')):
    bad = [sent[0], dict(sent[1], **{feature: value})]
    response = requests.post(f'{base}/census:classify', timeout=60,
                             data=json.dumps({'examples': bad}))
    assert response.status_code == 400, response.text
    assert response.json()['error'].startswith(
        f"examples[1].{feature}: feature '{feature}' is {kind} feature")

  # Without the metadata: TF Serving's typing, which the parser rejects.
  response = requests.post(f'{base}/legacy:classify', timeout=60,
                           data=json.dumps({'examples': list(sent)}))
  assert response.status_code == 400, response.text
  assert "Data types don't match" in response.json()['error']

  # gRPC Examples typed from the values (int64_list for a float feature).
  request = classification_pb2.ClassificationRequest()
  request.model_spec.name = 'census'
  for values in sent:
    request.input.example_list.examples.add().CopyFrom(
        codec.json_to_example(values, 'sent'))
  assert request.input.example_list.examples[0].features.feature[
      'capital_gain'].WhichOneof('kind') == 'int64_list'
  with grpc.insecure_channel(f'127.0.0.1:{server.grpc_port}') as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    result = stub.Classify(request, timeout=60).result
    np.testing.assert_allclose(
        [[c.score for c in r.classes] for r in result.classifications],
        expected, rtol=1e-6, atol=1e-7)
    request.input.example_list.examples[0].features.feature[
        'age'].bytes_list.value.append(b'39')
    with pytest.raises(grpc.RpcError) as error:
      stub.Classify(request, timeout=60)
  assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert error.value.details().startswith(
      "example_list.examples[0]: feature 'age' is an integer feature")
