"""What the Estimator trainer (train.py) and the native Keras trainer
(native.py) share: the step target and the metrics.json record.

Nothing here touches the Estimator API, so native training can import it.
"""

import math

import numpy as np

from estimators import inputs
from pipeline import runrecord
from pipeline.errors import UserError

METRICS_FILE = 'metrics.json'


def train_steps(config):
  """max_steps from train.steps, or train.epochs over the training split."""
  if config.train.steps:
    return config.train.steps
  if not config.train.epochs:
    raise UserError('set train.steps or train.epochs')
  count = train_example_count(config)
  return max(1, math.ceil(config.train.epochs * count /
                          config.train.batch_size))


def train_example_count(config):
  try:
    summary = runrecord.read_json(config.rundir.preprocess_summary)
    return int(summary['splits']['train']['written'])
  except (OSError, KeyError, TypeError, ValueError):
    return inputs.count_examples(inputs.data_files(config, 'train'))


def write_metrics(config, metrics, checkpoint):
  """RUN_DIR/metrics.json: the final eval metrics of `checkpoint`."""
  record = {'model_type': config.model.type, 'task': config.label.task,
            'global_step': int(metrics['global_step']),
            'checkpoint': checkpoint, 'metrics': to_json(metrics)}
  if config.train.trainer != 'estimator':
    record['trainer'] = config.train.trainer
  runrecord.write_json(config.rundir.metrics, record)
  return record


def to_json(metrics):
  return {k: (v.item() if isinstance(v, np.generic) else v)
          for k, v in metrics.items()
          if isinstance(v, (int, float, np.generic))}
