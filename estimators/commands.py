"""`estpipe train` and `estpipe evaluate`."""

import logging

from pipeline import fs
from pipeline import runrecord
from pipeline.cli import add_config_args, config_from_args

log = logging.getLogger('estpipe')


def register(subparsers):
  parser = subparsers.add_parser(
      'train', help='train and evaluate the configured Estimator',
      description='Trains with tf.estimator.train_and_evaluate into '
      'RUN_DIR/model (resuming from its latest checkpoint) and writes the '
      'final eval metrics to RUN_DIR/metrics.json. In a cluster, TF_CONFIG '
      'says whether this process is the chief, a worker, a ps or the '
      'evaluator.')
  add_config_args(parser)
  parser.set_defaults(func=_train)

  parser = subparsers.add_parser(
      'evaluate', help='evaluate a checkpoint on the eval split',
      description='Evaluates the latest (or a given) checkpoint on the eval '
      'split and writes the metrics as JSON.')
  add_config_args(parser)
  parser.add_argument('--checkpoint', metavar='PATH_OR_STEP',
                      help='a checkpoint path or a global step in '
                      'RUN_DIR/model (default: the latest)')
  parser.add_argument('--slice', dest='slices', action='append', default=[],
                      metavar='FEATURE',
                      help='also report metrics per value of this raw '
                      'categorical feature (repeatable)')
  parser.add_argument('--output', metavar='PATH',
                      help='where to write the metrics JSON (default: '
                      'RUN_DIR/evaluation.json)')
  parser.set_defaults(func=_evaluate)


def _quiet_deprecations(args):
  """tf.estimator warns on every call that it is deprecated: say it once."""
  # Progress lines are INFO; keep them whatever the root logger's level is.
  log.setLevel(logging.INFO)
  if not args.verbose:
    from tensorflow.python.util import deprecation  # pylint: disable=g-import-not-at-top
    deprecation._PRINT_DEPRECATION_WARNINGS = False  # pylint: disable=protected-access


def _train(args):
  from estimators import runconfig  # pylint: disable=g-import-not-at-top
  from estimators import train  # pylint: disable=g-import-not-at-top
  _quiet_deprecations(args)
  config = config_from_args(args)
  chief = runconfig.task_type() in (None, 'chief')
  try:
    record = train.train(config)
  except BaseException as e:
    if chief and not isinstance(e, KeyboardInterrupt):
      runrecord.append_history(config.run_dir, 'train', 'failed',
                               {'error': f'{type(e).__name__}: {e}'})
    raise
  if record is None:
    return 0
  runrecord.append_history(config.run_dir, 'train', 'succeeded', {
      'global_step': record['global_step'],
      'model_type': record['model_type'],
      'metrics': _headline(record['metrics'])})
  log.info('trained to step %d: %s (%s)', record['global_step'],
           _format(_headline(record['metrics'])),
           config.path(train.METRICS_FILE))
  return 0


def _evaluate(args):
  from estimators import train  # pylint: disable=g-import-not-at-top
  _quiet_deprecations(args)
  config = config_from_args(args)
  result = train.evaluate(config, args.checkpoint, args.slices)
  output = args.output or config.path('evaluation.json')
  runrecord.write_json(fs.abspath(output), result)
  runrecord.append_history(config.run_dir, 'evaluate', 'succeeded', {
      'global_step': result['global_step'], 'output': output,
      'metrics': _headline(result['metrics'])})
  log.info('checkpoint %s (step %d): %s', result['checkpoint'],
           result['global_step'], _format(_headline(result['metrics'])))
  for name, values in result.get('slices', {}).items():
    for value, metrics in values.items():
      log.info('  %s=%s: %s', name, value, _format(metrics))
  log.info('wrote %s', output)
  return 0


_HEADLINE = ('accuracy', 'auc', 'precision', 'recall', 'rmse', 'mae',
             'average_loss', 'loss', 'count')


def _headline(metrics):
  return {k: metrics[k] for k in _HEADLINE if k in metrics}


def _format(metrics):
  return ', '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                   for k, v in metrics.items())
