"""The run directory: every path a stage reads or writes, in one place.

Stages talk only through these files, so each stage can run alone, on
another machine or under another runner:

  preprocess.json           preprocessing summary; written last, it marks the
                            stage complete
  transform/                tf.Transform output (tft.TFTransformOutput)
  data/SPLIT-*.tfrecord.gz  transformed tf.Examples
  rejects/rejects-*.jsonl   rejected raw rows with reasons
  model/                    the Estimator's model_dir
  model/estpipe_model.json  what shaped the model (config it was started with)
  metrics.json              final evaluation metrics
  evaluation.json           `estpipe evaluate`'s metrics
  export/<version>/         SavedModels in TensorFlow Serving's layout
  history.jsonl             one line per stage start, success or failure
  run.json                  `estpipe run`'s record: config, inputs, stages
  logs/STAGE.log            each stage's log under `estpipe run`
  .staging/                 work in progress, never read by another stage;
                            .staging/STAGE-ID/CANCELLED: that job was cancelled
                            .staging/STAGE-ID/OWNER: the host and pid that
                            staged it (a dead owner's folder is removed)
"""

import os

from pipeline import fs
from pipeline.errors import UserError


class RunDir:
  """The paths of one run directory (local or remote, see pipeline/fs.py)."""

  def __init__(self, root):
    self.root = root

  def path(self, *parts):
    return os.path.join(self.root, *parts)

  @property
  def preprocess_summary(self):
    return self.path('preprocess.json')

  @property
  def transform(self):
    return self.path('transform')

  @property
  def data(self):
    return self.path('data')

  def data_pattern(self, split):
    return self.path('data', f'{split}-*.tfrecord.gz')

  @property
  def rejects(self):
    return self.path('rejects')

  @property
  def rejects_pattern(self):
    return self.path('rejects', '*.jsonl')

  @property
  def model(self):
    return self.path('model')

  @property
  def model_record(self):
    return self.path('model', 'estpipe_model.json')

  @property
  def metrics(self):
    return self.path('metrics.json')

  @property
  def evaluation(self):
    return self.path('evaluation.json')

  @property
  def export(self):
    return self.path('export')

  def version(self, number):
    return self.path('export', str(number))

  @property
  def history(self):
    return self.path('history.jsonl')

  @property
  def run_record(self):
    return self.path('run.json')

  def stage_log(self, stage):
    return self.path('logs', f'{stage}.log')

  @property
  def staging(self):
    return self.path('.staging')

  @property
  def cancel_marker(self):
    """In a staging folder: its job was cancelled, publish nothing."""
    return self.path('CANCELLED')

  @property
  def staging_owner(self):
    """In a staging folder: who staged it ({host, pid, ...}, JSON)."""
    return self.path('OWNER')

  # Preprocessing publishes these folders together, then the summary.
  PREPROCESS_OUTPUTS = ('transform', 'data', 'rejects')

  def is_preprocessed(self):
    return fs.exists(self.preprocess_summary)


def require_preprocessed(run_dir):
  """Raises UserError unless preprocessing of `run_dir` completed."""
  layout = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
  if not layout.is_preprocessed():
    raise UserError(f'{layout.root} is not preprocessed (no '
                    'preprocess.json): run `estpipe preprocess` first')
  return layout


def list_versions(base_path):
  """The integer version folders of a TF Serving base path, ascending.

  TF Serving ignores other names (`.staging`, `tmp`), and so does estpipe.
  Works for local and remote base paths alike.
  """
  if not fs.isdir(base_path):
    return []
  return sorted(int(name) for name in fs.listdir(base_path)
                if name.isdigit() and name.isascii()
                and fs.isdir(os.path.join(base_path, name)))


def version_dir(base_path, version=None):
  """The folder of one export version; the newest when version is None.

  FileNotFoundError when there is none (or not that one).
  """
  versions = list_versions(base_path)
  if version is None:
    if not versions:
      raise FileNotFoundError(f'no export under {base_path}')
    version = versions[-1]
  elif version not in versions:
    raise FileNotFoundError(f'no export version {version} under '
                            f'{base_path} (have: {versions})')
  return os.path.join(base_path, str(version))
