"""The `export`, `verify-export` and `predict` subcommands.

Registered by serving/commands.py. TensorFlow and Beam are imported when a
command runs, so `estpipe --help` stays fast.
"""

import json
import logging
import os

from pipeline import fs
from pipeline.cli import UserError, add_config_args, config_from_args

log = logging.getLogger('estpipe')


def _add_export(subparsers):
  parser = subparsers.add_parser(
      'export', help='export a checkpoint as a SavedModel for TF Serving',
      description='Export the latest checkpoint of RUN_DIR/model (or '
      '--checkpoint) to RUN_DIR/export/<version>, with the tf.Transform '
      'graph inside: clients send raw features.')
  add_config_args(parser)
  parser.add_argument('--checkpoint', default=None,
                      help='checkpoint path prefix (default: the latest)')
  parser.set_defaults(func=_export)


def _add_verify(subparsers):
  parser = subparsers.add_parser(
      'verify-export', help='training/serving skew check of an export',
      description='Feed the raw eval rows through the exported signatures '
      'and check that every prediction equals the Estimator\'s on the '
      'transformed rows (to 1e-5). Exits 1 at the first differing row.')
  add_config_args(parser)
  _add_export_choice(parser)
  parser.add_argument('--max_rows', type=int, default=None,
                      help='check only the first N eval rows')
  parser.set_defaults(func=_verify)


def _add_predict(subparsers):
  parser = subparsers.add_parser(
      'predict', help='batch prediction over raw files (Beam)',
      description='Raw CSV or tf.Example records in, one prediction per good '
      'row out (JSON lines or CSV, keyed by file:line), rejected rows in '
      'OUTPUT.rejects.jsonl. Unknown flags are Beam pipeline options '
      '(--runner, --direct_running_mode, ...).')
  add_config_args(parser)
  parser.add_argument('--input', required=True,
                      help='raw input file or glob, laid out as data.*')
  parser.add_argument('--output', required=True,
                      help='predictions file (.csv for CSV, else JSON lines)')
  parser.add_argument('--format', dest='data_format', default=None,
                      choices=('csv', 'tfrecord'),
                      help='input format (default: data.format)')
  parser.add_argument('--output_format', default=None,
                      choices=('jsonl', 'csv'),
                      help='default: from the --output extension')
  _add_export_choice(parser)
  parser.set_defaults(func=_predict, accepts_extra=True)


def _add_export_choice(parser):
  group = parser.add_mutually_exclusive_group()
  group.add_argument('--version', type=int, default=None,
                     help='export version under RUN_DIR/export (default: the '
                     'newest)')
  group.add_argument('--export_path', default=None,
                     help='a SavedModel folder anywhere')


def _chosen_export(config, args):
  from serving import export  # pylint: disable=g-import-not-at-top
  if args.export_path:
    if not fs.exists(os.path.join(args.export_path, 'saved_model.pb')):
      raise UserError(f'{args.export_path} is not a SavedModel folder')
    return fs.abspath(args.export_path)
  try:
    return export.version_dir(config, args.version)
  except FileNotFoundError as e:
    raise UserError(f'{e}: run `estpipe train` or `estpipe export` first')


def _export(args):
  from pipeline import runrecord  # pylint: disable=g-import-not-at-top
  from serving import export  # pylint: disable=g-import-not-at-top
  config = config_from_args(args)
  try:
    path = export.export_checkpoint(config, args.checkpoint)
  except (FileNotFoundError, ValueError) as e:
    runrecord.append_history(config.run_dir, 'export', 'failed',
                             {'error': str(e)})
    raise UserError(str(e))
  runrecord.append_history(config.run_dir, 'export', 'succeeded',
                           {'path': path})
  print(path)


def _verify(args):
  from pipeline import runrecord  # pylint: disable=g-import-not-at-top
  from serving import verify  # pylint: disable=g-import-not-at-top
  config = config_from_args(args)
  path = _chosen_export(config, args)
  try:
    summary = verify.verify_export(config, path, max_rows=args.max_rows)
  except (verify.SkewError, ValueError, FileNotFoundError) as e:
    runrecord.append_history(config.run_dir, 'verify-export', 'failed',
                             {'export': path, 'error': str(e)})
    raise UserError(str(e))
  runrecord.append_history(config.run_dir, 'verify-export', 'succeeded',
                           summary)
  print(json.dumps(summary, indent=2, sort_keys=True))


def _predict(args):
  from serving import predict  # pylint: disable=g-import-not-at-top
  config = config_from_args(args)
  path = _chosen_export(config, args)
  if '://' not in args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  try:
    summary = predict.predict(
        config, path, args.input, args.output, data_format=args.data_format,
        output_format=args.output_format, beam_args=args.extra)
  except (predict.TooManyRejects, FileNotFoundError, ValueError) as e:
    raise UserError(str(e))
  print(json.dumps(summary, indent=2, sort_keys=True))


# In --help order.
COMMANDS = [_add_export, _add_verify, _add_predict]
