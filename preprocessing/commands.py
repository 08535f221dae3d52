"""The `preprocess` subcommand."""

import json


def register(subparsers):
  from pipeline.cli import add_config_args  # pylint: disable=g-import-not-at-top
  parser = subparsers.add_parser(
      'preprocess', help='raw data -> tf.Transform -> TFRecords',
      description='Analyze the training split with tf.Transform and write '
      'transformed TFRecords for every split. Unknown flags are Beam '
      'pipeline options (--runner, --direct_num_workers, ...).')
  add_config_args(parser)
  parser.set_defaults(func=_preprocess, accepts_extra=True)


def _preprocess(args):
  from pipeline.cli import UserError, config_from_args  # pylint: disable=g-import-not-at-top
  from preprocessing import run  # pylint: disable=g-import-not-at-top
  config = config_from_args(args)
  try:
    summary = run.preprocess(config, args.extra)
  except (run.TooManyRejects, FileNotFoundError) as e:
    raise UserError(str(e))
  print(json.dumps(summary['splits'], sort_keys=True))
