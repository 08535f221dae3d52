"""TF Serving's warmup file, replayed by the model server before a version
serves (serving/warmup.py), on the tiny models of serving/tiny_models.py.
Writing it at export, from eval rows, is tested in tests/test_export.py."""

import logging
import os
import shutil

import pytest

tf = pytest.importorskip('tensorflow')

# pylint: disable=g-import-not-at-top,redefined-outer-name
from tensorflow_serving.apis import prediction_log_pb2

from serving import warmup
from serving.models import ServableVersion
from serving.versions import ModelConfig, ModelManager

ROWS = [(0.2, b'a'), (0.9, b'b'), (0.5, b'zzz')]


def _examples():
  examples = []
  for x, c in ROWS:
    example = tf.train.Example()
    example.features.feature['x'].float_list.value.append(x)
    example.features.feature['c'].bytes_list.value.append(c)
    examples.append(example)
  return examples


def _with_warmup(source, target):
  """A copy of an export with a warmup file for each of its signatures."""
  shutil.copytree(source, target)
  servable = ServableVersion('m', 1, str(target))
  logs = warmup.requests_for_signatures(
      servable.signature_defs, _examples(),
      [{'x': x, 'c': c} for x, c in ROWS])
  warmup.write(os.path.join(target, warmup.WARMUP_FILE), logs)
  return logs


def test_requests_cover_every_signature_kind(exports, tmp_path):
  logs = _with_warmup(exports['classifier'], tmp_path / '1')
  kinds = {log.WhichOneof('log_type'): [] for log in logs}
  for log in logs:
    kind = log.WhichOneof('log_type')
    kinds[kind].append(getattr(log, kind).request.model_spec.signature_name)
  assert sorted(kinds['classify_log']) == ['classification',
                                           'serving_default']
  assert sorted(kinds['predict_log']) == ['predict', 'raw:predict']
  # The file is TF Serving's: TFRecords of PredictionLog.
  records = list(tf.compat.v1.io.tf_record_iterator(
      str(tmp_path / '1' / warmup.WARMUP_FILE)))
  assert [prediction_log_pb2.PredictionLog.FromString(r) for r in records
          ] == logs


def test_versions_serve_only_after_warmup(exports, tmp_path, caplog):
  """The manager replays the file while loading: the replay is logged, and
  counted, before the version is served."""
  caplog.set_level(logging.INFO, logger='estpipe')
  logs = _with_warmup(exports['regressor'], tmp_path / 'reg' / '1')
  manager = ModelManager([ModelConfig('reg', str(tmp_path / 'reg'))],
                         poll_wait_seconds=0)
  manager.start()
  servable = manager.resolve('reg')
  assert servable.warmup_requests == len(logs) == 4
  messages = [r.getMessage() for r in caplog.records]
  replayed = [i for i, m in enumerate(messages)
              if m.startswith('warmup of reg version 1: 4 requests replayed')]
  serving = messages.index('serving reg version 1')
  assert replayed and replayed[0] < serving, messages


def test_export_without_warmup_file_loads(exports, tmp_path):
  shutil.copytree(exports['classifier'], tmp_path / 'cls' / '1')
  manager = ModelManager([ModelConfig('cls', str(tmp_path / 'cls'))],
                         poll_wait_seconds=0)
  manager.start()
  assert manager.resolve('cls').warmup_requests == 0


def test_warmup_can_be_turned_off(exports, tmp_path):
  """--enable_model_warmup=false: the file is not read at all."""
  _with_warmup(exports['classifier'], tmp_path / 'cls' / '1')
  (tmp_path / 'cls' / '1' / warmup.WARMUP_FILE).write_bytes(b'corrupt')
  manager = ModelManager([ModelConfig('cls', str(tmp_path / 'cls'))],
                         poll_wait_seconds=0, warmup=False)
  manager.start()
  assert manager.resolve('cls').warmup_requests == 0


@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'bad_request'])
def test_corrupt_warmup_file_fails_the_load_like_tf_serving(
    exports, tmp_path, damage):
  """As TF Serving: a warmup file that cannot be replayed fails the
  version's load, with an error naming the file; the version before it
  keeps serving."""
  base = tmp_path / 'cls'
  shutil.copytree(exports['classifier'], base / '1')
  _with_warmup(exports['classifier'], base / '2')
  path = base / '2' / warmup.WARMUP_FILE
  if damage == 'garbage':
    path.write_bytes(b'this is no TFRecord file')
  elif damage == 'truncated':
    path.write_bytes(path.read_bytes()[:-7])
  else:
    bad = prediction_log_pb2.PredictionLog()
    bad.predict_log.request.model_spec.signature_name = 'raw:predict'
    bad.predict_log.request.inputs['x'].CopyFrom(tf.make_tensor_proto(['a']))
    warmup.write(str(path), [bad])
  manager = ModelManager([ModelConfig('cls', str(base))], poll_wait_seconds=0)
  manager.start()
  assert manager.resolve('cls').version == 1
  status = dict(manager.statuses('cls'))[2]
  assert status.state == 'END'
  assert 'tf_serving_warmup_requests' in status.error, status.error
