"""`estpipe train`, `cluster`, `evaluate`, `export` and `verify-export`.

These commands wire the trainer to the serving stage's export library
(serving/export.py, serving/verify.py): training hands the exporters to
`train.train`, and export and verify get the Estimator from here, so neither
package imports the other back. TensorFlow is imported when a command runs,
so `estpipe --help` stays fast.
"""

import json
import logging
import os

from estimators import cluster
from estimators import vertex
from pipeline import fs
from pipeline import quiet
from pipeline import rundir
from pipeline import runrecord
from pipeline.args import (add_config_args, add_export_choice, chosen_export,
                           config_from_args, register_stage)
from pipeline.errors import TaskFailed, UserError

log = logging.getLogger('estpipe')

# What the model depends on besides preprocessing's outputs (features and
# label reach training through them) and the user's model module.
TRAIN_SECTIONS = ('model', 'train')


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

  _register_cluster(subparsers)

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

  parser = subparsers.add_parser(
      'export', help='export a checkpoint as a SavedModel for TF Serving',
      description='Export the latest checkpoint of RUN_DIR/model (or '
      '--checkpoint) to RUN_DIR/export/<version>, with the tf.Transform '
      'graph inside: clients send raw features.')
  add_config_args(parser)
  parser.add_argument('--checkpoint', default=None,
                      help='checkpoint path prefix (default: the latest)')
  parser.set_defaults(func=_export)

  parser = subparsers.add_parser(
      'verify-export', help='training/serving skew check of an export',
      description='Feed the raw eval rows through the exported signatures '
      'and check that every prediction equals the Estimator\'s on the '
      'transformed rows (to 1e-5). Exits 1 at the first differing row.')
  add_config_args(parser)
  add_export_choice(parser)
  parser.add_argument('--max_rows', type=int, default=None,
                      help='check only the first N eval rows')
  parser.set_defaults(func=_verify)

  _register_stages()


def _register_stages():
  """The runners `estpipe run` chains, with what lets it skip them."""
  register_stage('train', run_train, sections=TRAIN_SECTIONS,
                 inputs=_from_stages('model_inputs'),
                 complete=_from_stages('trained'),
                 reset=_from_stages('start_afresh'))
  register_stage('evaluate', run_evaluate, complete=_from_stages('evaluated'))
  # An export of the latest checkpoint is current whatever else changed:
  # the training exporters usually wrote it already.
  register_stage('export', run_export, sections=('export',),
                 complete=_from_stages('exported'),
                 current=_from_stages('export_is_current'))
  register_stage('verify-export', run_verify,
                 complete=_from_stages('verified'))


def _from_stages(name):
  """estimators/stages.py's `name`, imported when called (it loads TF)."""
  def check(arg):
    from estimators import stages  # pylint: disable=g-import-not-at-top
    return getattr(stages, name)(arg)
  return check




def _train(args):
  return run_train(config_from_args(args), args.extra, args.verbose)


def run_train(config, beam_args=(), verbose=False):
  """The train stage: train_and_evaluate with the serving stage's exporters."""
  del beam_args  # training runs no Beam job
  from estimators import runconfig  # pylint: disable=g-import-not-at-top
  from estimators import train  # pylint: disable=g-import-not-at-top
  from serving import export  # pylint: disable=g-import-not-at-top
  quiet.quiet_tensorflow(verbose)
  chief = runconfig.task_type() in (None, 'chief')
  if chief:
    # A killed run leaves this line without an end: the record shows it.
    runrecord.append_history(config.run_dir, 'train', 'started')
  try:
    if config.train.trainer == 'estimator':
      record = train.train(config, export.make_exporters(config))
    else:
      record = _train_native(config)
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
      'trainer': config.train.trainer,
      'metrics': _headline(record['metrics'])})
  log.info('trained to step %d: %s (%s)', record['global_step'],
           _format(_headline(record['metrics'])),
           config.rundir.metrics)
  return 0


def _train_native(config):
  """train.trainer keras_fit: estimators/native.py, exported with the
  serving stage's native export (serving/keras_export.py)."""
  from estimators import native  # pylint: disable=g-import-not-at-top
  from serving import keras_export  # pylint: disable=g-import-not-at-top

  def export_fn(config, model, checkpoint, step, metrics):
    return keras_export.export_keras_model(
        config, model.model, lambda f: model(f, training=False), checkpoint,
        step, exporter='final', metrics=metrics)

  return native.train(config, export_fn)


def _register_cluster(subparsers):
  parser = subparsers.add_parser(
      'cluster', help='train on a local cluster of processes, or write the '
      'Vertex AI job for one',
      description='Runs `estpipe train CONFIG` as a chief, N workers, M ps '
      'tasks and an evaluator on 127.0.0.1, each with its TF_CONFIG; their '
      'output comes prefixed with the task name. It stops every task when '
      'the chief and the evaluator are done, when one fails (exiting with '
      'its status), or on SIGINT/SIGTERM. --ps 0 trains with '
      'multi_worker_mirrored, --ps M>0 with parameter_server. With --emit '
      'vertex it starts nothing and writes the same cluster as a Vertex AI '
      'CustomJob spec.')
  add_config_args(parser)
  parser.add_argument('--workers', type=int, default=1,
                      help='worker tasks besides the chief (default 1)')
  parser.add_argument('--ps', type=int, default=0,
                      help='parameter-server tasks (default 0)')
  parser.add_argument('--timeout', type=float, default=None,
                      metavar='SECONDS', help='stop the cluster and fail '
                      'after this long (default: no limit)')
  parser.add_argument('--evaluator_timeout', type=float,
                      default=cluster.EVALUATOR_TIMEOUT_SECS,
                      metavar='SECONDS', help='how long the evaluator may '
                      'take after the chief finished (default %(default)s)')
  parser.add_argument('--emit', choices=['vertex'],
                      help='write a cloud job spec instead of running')
  parser.add_argument('--out', default='vertex-job.json',
                      help='--emit: the spec file (.yaml/.yml: YAML, else '
                      'JSON; default %(default)s)')
  parser.add_argument('--package_uri', metavar='GS_PATH',
                      help='--emit: the uploaded sdist, e.g. '
                      'gs://BUCKET/estpipe-0.1.0.tar.gz')
  parser.add_argument('--config_uri', metavar='GS_PATH',
                      help='--emit: where the config was uploaded; replicas '
                      'read it through /gcs/')
  parser.add_argument('--machine_type', default=vertex.MACHINE_TYPE,
                      help='--emit: every pool\'s machine (default '
                      '%(default)s)')
  parser.add_argument('--image', default=vertex.IMAGE,
                      help='--emit: executorImageUri (default %(default)s)')
  parser.set_defaults(func=_cluster)


def _cluster(args):
  config = config_from_args(args)
  cluster.check_counts(args.workers, args.ps)
  distribution = cluster.distribution_for(config, args.ps)
  if args.emit:
    return _emit_vertex(args, config, distribution)
  rundir.require_preprocessed(config.rundir)
  command = cluster.train_command(os.path.abspath(args.config),
                                  args.overrides, distribution, args.verbose)
  log.info('cluster: chief, %d worker(s), %d ps and an evaluator, %s',
           args.workers, args.ps, distribution)
  outcome = cluster.run(command, args.workers, args.ps, timeout=args.timeout,
                        evaluator_timeout=args.evaluator_timeout)
  if outcome.code:
    raise TaskFailed(f'{outcome.message}; stopped every task', outcome.code)
  log.info('cluster done: %s; newest export: %s', outcome.message,
           _newest_export(config))
  return 0


def _newest_export(config):
  versions = rundir.list_versions(config.rundir.export)
  return config.rundir.version(versions[-1]) if versions else 'none'


def _emit_vertex(args, config, distribution):
  if not args.package_uri:
    raise UserError('--emit vertex needs --package_uri gs://.../'
                    'estpipe-VERSION.tar.gz (the uploaded sdist)')
  spec = vertex.emit(config, args.config, args.overrides, distribution,
                     args.workers, args.ps, args.package_uri, args.config_uri,
                     args.image, args.machine_type)
  vertex.write_spec(spec, args.out)
  log.info('wrote %s: submit it with gcloud ai custom-jobs create '
           '--region=REGION --display-name=NAME --config=%s', args.out,
           args.out)
  return 0


def _evaluate(args):
  run_evaluate(config_from_args(args), args.extra, args.verbose,
               args.checkpoint, args.slices, args.output)


def run_evaluate(config, beam_args=(), verbose=False, checkpoint=None,
                 slices=(), output=None):
  """The evaluate stage: metrics of a checkpoint (default: the latest)."""
  del beam_args  # evaluation runs no Beam job
  from estimators import train  # pylint: disable=g-import-not-at-top
  quiet.quiet_tensorflow(verbose)
  runrecord.append_history(config.run_dir, 'evaluate', 'started')
  try:
    if config.train.trainer == 'estimator':
      result = train.evaluate(config, checkpoint, slices)
    else:
      result = _evaluate_native(config, checkpoint, slices)
  except Exception as e:
    runrecord.append_history(config.run_dir, 'evaluate', 'failed',
                             {'error': f'{type(e).__name__}: {e}'})
    raise
  output = output or config.rundir.evaluation
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
  return result


def _evaluate_native(config, checkpoint, slices):
  from estimators import native  # pylint: disable=g-import-not-at-top
  if slices:
    raise UserError(f'--slice is not yet available for train.trainer '
                    f'{config.train.trainer}')
  if checkpoint is not None and str(checkpoint).isdigit():
    checkpoint = os.path.join(config.rundir.model, f'ckpt-{checkpoint}')
  return native.evaluate(config, checkpoint)


def _export(args):
  print(run_export(config_from_args(args), verbose=args.verbose,
                   checkpoint=args.checkpoint))


def run_export(config, beam_args=(), verbose=False, checkpoint=None):
  """The export stage: one checkpoint (default: the latest) -> a version."""
  del beam_args  # exporting runs no Beam job
  quiet.quiet_tensorflow(verbose)
  from estimators import train  # pylint: disable=g-import-not-at-top
  from serving import export  # pylint: disable=g-import-not-at-top
  runrecord.append_history(config.run_dir, 'export', 'started')
  try:
    if config.train.trainer == 'estimator':
      path = export.export_checkpoint(
          config, lambda c: train.build_estimator(c, warm_start=False),
          checkpoint)
    else:
      path = _export_native(config, checkpoint)
  except (UserError, FileNotFoundError, ValueError) as e:
    runrecord.append_history(config.run_dir, 'export', 'failed',
                             {'error': str(e)})
    raise UserError(str(e)) from None
  runrecord.append_history(config.run_dir, 'export', 'succeeded',
                           {'path': path})
  return path


def _export_native(config, checkpoint):
  """A natively trained model's weights (default: the final ones) -> a
  version, with serving/keras_export.py."""
  from estimators import native  # pylint: disable=g-import-not-at-top
  from serving import keras_export  # pylint: disable=g-import-not-at-top
  rundir.require_preprocessed(config.rundir)
  model, path = native.restore(config, checkpoint)
  state = native.read_state(config) or {}
  return keras_export.export_keras_model(
      config, model.model, lambda f: model(f, training=False), path,
      state.get('global_step'), exporter='manual')


def _verify(args):
  config = config_from_args(args)
  summary = run_verify(config, args.extra, args.verbose,
                       chosen_export(config, args), args.max_rows)
  print(json.dumps(summary, indent=2, sort_keys=True))


def run_verify(config, beam_args=(), verbose=False, path=None, max_rows=None):
  """The verify-export stage: the skew check of one export (default: newest)."""
  del beam_args  # the check runs in process
  from serving import verify  # pylint: disable=g-import-not-at-top
  quiet.quiet_tensorflow(verbose)
  runrecord.append_history(config.run_dir, 'verify-export', 'started',
                           {'export': path})
  try:
    summary = verify.verify_export(config, _predictions_fn(config), path,
                                   max_rows=max_rows)
  except (verify.SkewError, ValueError, FileNotFoundError) as e:
    runrecord.append_history(config.run_dir, 'verify-export', 'failed',
                             {'export': path, 'error': str(e)})
    raise UserError(str(e))
  runrecord.append_history(config.run_dir, 'verify-export', 'succeeded',
                           summary)
  log.info('export %s verified on %d rows', summary['export'],
           summary['rows'])
  return summary


def _predictions_fn(config):
  """The trainer's predictions on transformed batches, for the skew check."""
  if config.train.trainer == 'estimator':
    from estimators import train  # pylint: disable=g-import-not-at-top
    return train.predict_transformed
  from estimators import native  # pylint: disable=g-import-not-at-top
  return native.predict_transformed


_HEADLINE = ('accuracy', 'auc', 'precision', 'recall', 'rmse', 'mae',
             'average_loss', 'loss', 'count')


def _headline(metrics):
  return {k: metrics[k] for k in _HEADLINE if k in metrics}


def _format(metrics):
  return ', '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                   for k, v in metrics.items())
