"""The `preprocess` subcommand and stage."""

import json

from pipeline import args as args_lib
from pipeline.errors import UserError


def register(subparsers):
  parser = subparsers.add_parser(
      'preprocess', help='raw data -> tf.Transform -> TFRecords',
      description='Analyze the training split with tf.Transform and write '
      'transformed TFRecords for every split. Unknown flags are Beam '
      'pipeline options (--runner, --direct_num_workers, ...).')
  args_lib.add_config_args(parser)
  parser.set_defaults(func=_preprocess, accepts_extra=True)
  args_lib.register_stage('preprocess', run_stage)


def run_stage(config, beam_args=(), verbose=False):
  del verbose  # Beam's logs follow the command line's logging setup
  from preprocessing import run  # pylint: disable=g-import-not-at-top
  try:
    summary = run.preprocess(config, beam_args)
  except FileNotFoundError as e:
    raise UserError(str(e))
  print(json.dumps(summary['splits'], sort_keys=True))
  return summary


def _preprocess(args):
  run_stage(args_lib.config_from_args(args), args.extra, args.verbose)
