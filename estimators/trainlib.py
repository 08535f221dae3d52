"""What the Estimator trainer (train.py, hooks.py) and the native Keras
trainer (native.py) share: the step target, the progress lines and the
metrics.json record.

Nothing here touches the Estimator API, so native training can import it.
"""

import logging
import math
import time

import numpy as np

from estimators import inputs
from pipeline import runrecord
from pipeline.errors import UserError

METRICS_FILE = 'metrics.json'
# Eval metrics shown in progress lines, when the model reports them.
_PROGRESS_METRICS = ('accuracy', 'auc', 'rmse', 'mae', 'average_loss', 'loss')

log = logging.getLogger('estpipe')


class ProgressLines:
  """Step, loss, examples/sec and each new eval result (once): the progress
  lines of both trainers.

  Examples/sec counts this process's steps times the global batch size.
  """

  def __init__(self, every_n_steps, batch_size):
    self._every = every_n_steps
    self._batch_size = batch_size
    self._steps = 0
    self._last = None
    self._eval_shown = None

  def count_step(self):
    """Counts one of this process's steps; whether it gets a line."""
    self._steps += 1
    return self._steps == 1 or self._steps % self._every == 0

  def log_step(self, step, loss, evals):
    """The line of global step `step`; `evals`: (step, metrics) or None."""
    now = time.time()
    rate = ''
    if self._last is not None:
      steps, then = self._steps - self._last[0], self._last[1]
      rate = f' examples/sec {steps * self._batch_size / (now - then):.0f}'
    self._last = (self._steps, now)
    log.info('step %d loss %.4f%s%s', step, loss, rate, self.eval_text(evals))

  def eval_text(self, evals):
    """The newest eval result, once: on the first line after it appears."""
    if not evals or evals[0] == self._eval_shown:
      return ''
    step, values = evals
    self._eval_shown = step
    shown = [f'{k} {values[k]:.4f}' for k in _PROGRESS_METRICS if k in values]
    return f' | eval@{step}: ' + ', '.join(shown) if shown else ''


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
