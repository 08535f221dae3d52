"""Missing values and number types at serving, on a real pipeline export.

A small regression run (synthetic rows) where `age` (integer, no default)
is never missing in training, `hours` (float, no default) sometimes is,
`gain` (float, default 0) sometimes is, and `workclass` (string) sometimes
is. So `age` is required at serving and the others are filled as in
preprocessing. The export is served in process: REST through `rest.answer`
(no sockets), gRPC on a free port.
"""

import base64
import json
import logging

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

# pylint: disable=g-import-not-at-top,redefined-outer-name
import grpc
from tensorflow.core.example import example_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.apis import regression_pb2

from pipeline import runrecord
from pipeline import signatures
from serving import codec
from serving import export as export_lib
from serving import grpc_service, rest
from serving.server import ModelServer, ServerOptions
from serving.versions import ModelConfig

RAW = signatures.RAW_SIGNATURE
ROWS = 600
CONFIG = """\
name: values
run_dir: {run_dir}
data:
  train: {data}
  header: true
  eval_fraction: 0.2
  missing: ["", "?"]
features:
  - {{name: age, type: integer, transform: z_score}}
  - {{name: hours, type: float, transform: z_score}}
  - {{name: gain, type: float, transform: log, default: 0}}
  - {{name: workclass, type: string, transform: vocabulary}}
label:
  name: y
  task: regression
model:
  type: linear
train:
  steps: 10
  batch_size: 32
"""


def _write_rows(path):
  rng = np.random.RandomState(0)
  with open(path, 'w') as f:
    f.write('age,hours,gain,workclass,y\n')
    for i in range(ROWS):
      age = rng.randint(18, 80)
      hours = '' if i % 10 == 3 else f'{rng.uniform(10, 60):.1f}'
      gain = '' if i % 7 == 2 else str(rng.randint(0, 5000))
      workclass = '?' if i % 9 == 4 else rng.choice(['private', 'public'])
      f.write(f'{age},{hours},{gain},{workclass},{age / 10:.2f}\n')


@pytest.fixture(scope='module')
def run(tmp_path_factory, caplog_module):
  """(config, export path, preprocessing's log) of the trained run."""
  from pipeline.config import load_config
  from preprocessing import run as preprocess_run
  from tests.serving_helpers import train_briefly
  work = tmp_path_factory.mktemp('values_run')
  data = str(work / 'rows.csv')
  _write_rows(data)
  config_path = work / 'values.yaml'
  config_path.write_text(CONFIG.format(run_dir=work / 'run', data=data))
  config = load_config(str(config_path))
  with caplog_module() as records:
    preprocess_run.preprocess(config)
  estimator = train_briefly(config, steps=10)
  return config, export_lib.export_saved_model(config, estimator), records


@pytest.fixture(scope='module')
def caplog_module():
  """A context manager collecting the 'estpipe' logger's messages."""
  import contextlib

  class _Collect(logging.Handler):

    def __init__(self):
      super().__init__(logging.DEBUG)
      self.messages = []

    def emit(self, record):
      self.messages.append(record.getMessage())

  @contextlib.contextmanager
  def collect():
    handler = _Collect()
    logger = logging.getLogger('estpipe')
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
      yield handler.messages
    finally:
      logger.removeHandler(handler)
      logger.setLevel(old_level)
  return collect


@pytest.fixture(scope='module')
def server(run):
  config, path, _ = run
  del path
  srv = ModelServer(ServerOptions(
      models=[ModelConfig('m', config.rundir.export)], grpc_port=0,
      rest_port=None, poll_wait_seconds=0),
                    (grpc_service.start,)).start()
  yield srv
  srv.stop(grace=5)


@pytest.fixture(scope='module')
def stub(server):
  with grpc.insecure_channel(f'127.0.0.1:{server.grpc_port}') as channel:
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope='module')
def loaded(run):
  return tf.saved_model.load(run[1])


def _post(server, verb, body):
  return rest.answer(server, 'POST', f'/v1/models/m:{verb}',
                     json.dumps(body).encode())


def _example(values):
  """A serialized tf.Example; numbers typed by the Python type given."""
  example = example_pb2.Example()
  for name, value in values.items():
    feature = example.features.feature[name]
    if isinstance(value, str):
      feature.bytes_list.value.append(value.encode())
    elif isinstance(value, float):
      feature.float_list.value.append(value)
    else:
      feature.int64_list.value.append(value)
  return example.SerializeToString()


FULL = {'age': 40, 'hours': 38.5, 'gain': 120.0, 'workclass': 'private'}


def _by_examples(loaded, rows):
  """Predictions through the tf.Example parser: what preprocessing saw
  (a feature left out of an Example is a missing CSV field)."""
  serialized = [_example({k: v for k, v in row.items() if v is not None})
                for row in rows]
  out = loaded.signatures['predict'](examples=tf.constant(serialized))
  return out[signatures.PREDICTIONS].numpy().reshape(-1)


def _predictions(answer):
  """A regressor's predictions from a predict answer (one output, so
  the values themselves, or objects naming them)."""
  if isinstance(answer, dict):
    answer = answer[signatures.PREDICTIONS]
  elif answer and isinstance(answer[0], dict):
    answer = [row[signatures.PREDICTIONS] for row in answer]
  return np.asarray(answer, dtype=float).reshape(-1)


def _status(call):
  with pytest.raises(grpc.RpcError) as error:
    call()
  return error.value.code(), error.value.details()


# --- preprocessing: missing counts and the warning --------------------------

def test_preprocessing_counts_missing_values_and_warns_without_default(run):
  config, _, messages = run
  summary = runrecord.read_json(config.rundir.preprocess_summary)
  missing = summary['train_missing']
  assert missing['age'] == 0
  assert missing['hours'] > 0 and missing['gain'] > 0
  assert missing['workclass'] > 0
  train = summary['splits']['train']
  share = 100.0 * missing['hours'] / (train['read'] - train['rejected'])
  warnings = [m for m in messages if 'no default' in m]
  assert warnings == [f"feature 'hours': {share:.1f}% of training rows "
                      'missing and no default; filled with 0 (set '
                      'features.hours.default)'], messages


def test_export_metadata_names_the_required_features(run):
  _, path, _ = run
  assert export_lib.read_metadata(path)['required_features'] == ['age']


def test_runs_without_missing_counts_require_nothing(run):
  from preprocessing import schema
  config, _, _ = run
  assert schema.required_features(config, None) == []
  assert schema.required_features(config, {'age': 0, 'hours': 3}) == ['age']


# --- 1. raw:predict fills missing values as preprocessing does ---------------

def test_raw_predict_fills_absent_null_and_missing_tokens(server, loaded):
  rows = [FULL, dict(FULL, hours=None), dict(FULL, workclass=None),
          dict(FULL, hours=None, gain=None, workclass=None)]
  expected = _by_examples(loaded, rows)
  sent = [FULL,
          {k: v for k, v in FULL.items() if k != 'hours'},       # absent
          dict(FULL, workclass='?'),                             # token
          dict(FULL, hours=None, gain=None, workclass=None)]     # null
  status, body = _post(server, 'predict', {'signature_name': RAW,
                                           'instances': sent})
  assert status == 200, body
  got = _predictions(body['predictions'])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

  # Columnar: an input left out, and nulls inside a column.
  status, body = _post(server, 'predict', {'signature_name': RAW, 'inputs': {
      'age': [40, 40], 'gain': [120.0, None],
      'workclass': ['private', None]}})
  assert status == 200, body
  expected = _by_examples(loaded, [dict(FULL, hours=None),
                                   dict(FULL, hours=None, gain=None,
                                        workclass=None)])
  got = _predictions(body['outputs'])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_grpc_raw_predict_fills_an_absent_input(stub, loaded):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = 'm'
  request.model_spec.signature_name = RAW
  request.inputs['age'].CopyFrom(tf.make_tensor_proto([40.0], tf.float64))
  request.inputs['gain'].CopyFrom(tf.make_tensor_proto([120.0], tf.float64))
  request.inputs['workclass'].CopyFrom(tf.make_tensor_proto([b'private']))
  response = stub.Predict(request, timeout=60)
  got = tf.make_ndarray(response.outputs[signatures.PREDICTIONS]).reshape(-1)
  np.testing.assert_allclose(
      got, _by_examples(loaded, [dict(FULL, hours=None)]), rtol=1e-5,
      atol=1e-6)


# --- 2. a feature never missing in training is required ----------------------

def test_a_required_feature_is_a_400_on_every_rest_path(server):
  without_age = {k: v for k, v in FULL.items() if k != 'age'}
  bodies = {
      'raw row, absent': ('predict', {'signature_name': RAW,
                                      'instances': [FULL, without_age]}),
      'raw row, null': ('predict', {'signature_name': RAW,
                                    'instances': [dict(FULL, age=None)]}),
      'raw columnar, absent': ('predict', {'signature_name': RAW, 'inputs': {
          k: [v] for k, v in without_age.items()}}),
      'raw columnar, null': ('predict', {'signature_name': RAW, 'inputs': {
          **{k: [v] for k, v in FULL.items()}, 'age': [None]}}),
      'regress, absent': ('regress', {'examples': [without_age]}),
      'regress, null': ('regress', {'examples': [dict(FULL, age=None)]}),
      'predict, b64 Example': ('predict', {'instances': [{'b64': (
          base64.b64encode(_example(without_age)).decode())}]}),
  }
  for what, (verb, body) in bodies.items():
    status, answer = _post(server, verb, body)
    assert status == 400, (what, answer)
    assert "raw feature 'age' is required" in answer['error'], (what, answer)
  # Features with a default, or missing in training, stay optional.
  status, answer = _post(server, 'regress', {'examples': [
      {'age': 40}, dict(FULL, hours=None, gain=None)]})
  assert status == 200, answer


def test_a_required_feature_is_invalid_argument_over_grpc(stub):
  without_age = {k: v for k, v in FULL.items() if k != 'age'}
  predict = predict_pb2.PredictRequest()
  predict.model_spec.name = 'm'
  predict.model_spec.signature_name = 'predict'
  predict.inputs['examples'].CopyFrom(
      tf.make_tensor_proto([_example(without_age)]))
  raw = predict_pb2.PredictRequest()
  raw.model_spec.name = 'm'
  raw.model_spec.signature_name = RAW
  raw.inputs['hours'].CopyFrom(tf.make_tensor_proto([1.0], tf.float64))
  regress = regression_pb2.RegressionRequest()
  regress.model_spec.name = 'm'
  regress.input.example_list.examples.add().ParseFromString(
      _example(without_age))
  for call in (lambda: stub.Predict(predict, timeout=60),
               lambda: stub.Predict(raw, timeout=60),
               lambda: stub.Regress(regress, timeout=60)):
    code, details = _status(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "raw feature 'age' is required" in details


# --- 3. integer features: whole floats everywhere, fractions nowhere ---------

def test_whole_floats_for_integer_features_on_every_path(server, stub,
                                                         loaded):
  expected = _by_examples(loaded, [FULL])
  as_float = _example(dict(FULL, age=40.0))
  fraction = _example(dict(FULL, age=40.5))
  b64 = lambda s: {'b64': base64.b64encode(s).decode()}  # noqa: E731

  status, body = _post(server, 'predict', {'instances': [b64(as_float)]})
  assert status == 200, body
  np.testing.assert_allclose(_predictions(body['predictions']), expected, rtol=1e-5, atol=1e-6)
  status, body = _post(server, 'regress', {'examples': [dict(FULL,
                                                             age=40.0)]})
  assert status == 200, body
  np.testing.assert_allclose(body['results'], expected, rtol=1e-5, atol=1e-6)

  predict = predict_pb2.PredictRequest()
  predict.model_spec.name = 'm'
  predict.model_spec.signature_name = 'predict'
  predict.inputs['examples'].CopyFrom(tf.make_tensor_proto([as_float]))
  response = stub.Predict(predict, timeout=60)
  np.testing.assert_allclose(
      tf.make_ndarray(response.outputs[signatures.PREDICTIONS]).reshape(-1),
      expected, rtol=1e-5, atol=1e-6)
  regress = regression_pb2.RegressionRequest()
  regress.model_spec.name = 'm'
  regress.input.example_list.examples.add().ParseFromString(as_float)
  response = stub.Regress(regress, timeout=60)
  np.testing.assert_allclose([r.value for r in response.result.regressions],
                             expected, rtol=1e-5, atol=1e-6)

  # A fraction is a 400 / INVALID_ARGUMENT naming the feature, everywhere.
  for verb, body in (
      ('predict', {'instances': [b64(fraction)]}),
      ('predict', {'signature_name': 'serving_default', 'instances': [
          b64(fraction)]}),
      ('regress', {'examples': [dict(FULL, age=40.5)]}),
      ('predict', {'signature_name': RAW, 'instances': [
          dict(FULL, age=40.5)]})):
    status, answer = _post(server, verb, body)
    assert status == 400, (verb, body, answer)
    assert "'age'" in answer['error'], answer
  predict.inputs['examples'].CopyFrom(tf.make_tensor_proto([fraction]))
  regress.input.example_list.examples[0].ParseFromString(fraction)
  for call in (lambda: stub.Predict(predict, timeout=60),
               lambda: stub.Regress(regress, timeout=60)):
    code, details = _status(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "feature 'age' is an integer feature" in details


def test_codec_coerces_serialized_examples_only_when_needed(run, server):
  del run
  servable = server.resolve('m')
  signature = servable.signature('predict')
  good = np.array([_example(FULL)], dtype=object)
  assert codec.coerce_serialized(signature, {'examples': good})[
      'examples'] is good
  fixed = codec.coerce_serialized(signature, {'examples': np.array(
      [_example(dict(FULL, age=40.0))], dtype=object)})['examples']
  assert example_pb2.Example.FromString(fixed[0]).features.feature[
      'age'].int64_list.value == [40]


def test_batch_rows_without_a_required_feature_are_rejects(run):
  """`estpipe predict` and verify-export parse rows with the export's
  required features: a row without one is a reject, not a failed batch."""
  from preprocessing import rows as rows_lib
  from serving import raw_examples
  config, path, _ = run
  required = export_lib.exported_required_features(path)
  assert required == ('age',)
  parser = raw_examples.row_parser(config, required)
  index = {name: i for i, name in enumerate(
      ['age', 'hours', 'gain', 'workclass'])}
  assert parser.parse_csv_fields(['40', '', '', '?'], index)[0] == 40
  with pytest.raises(rows_lib.Reject) as reject:
    parser.parse_csv_fields(['', '38.5', '1', 'private'], index)
  assert reject.value.field == 'age'
  assert "field 'age' is missing, and the model requires it" in (
      reject.value.reason)
