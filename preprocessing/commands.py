"""The `preprocess` subcommand and stage."""

import json

from pipeline import args as args_lib
from pipeline import fs
from pipeline import runrecord
from pipeline.errors import UserError

# What preprocessing's outputs depend on besides its input files.
SECTIONS = ('data', 'features', 'label', 'preprocessing')


def register(subparsers):
  parser = subparsers.add_parser(
      'preprocess', help='raw data -> tf.Transform -> TFRecords',
      description='Analyze the training split with tf.Transform and write '
      'transformed TFRecords for every split. Unknown flags are Beam '
      'pipeline options (--runner, --direct_num_workers, ...).')
  args_lib.add_config_args(parser)
  parser.set_defaults(func=_preprocess, accepts_extra=True)
  args_lib.register_stage('preprocess', run_stage, sections=SECTIONS,
                          inputs=input_files, complete=outputs, beam=True)


def run_stage(config, beam_args=(), verbose=False):
  del verbose  # Beam's logs follow the command line's logging setup
  from preprocessing import run  # pylint: disable=g-import-not-at-top
  try:
    summary = run.preprocess(config, beam_args)
  except FileNotFoundError as e:
    raise UserError(str(e))
  print(json.dumps(summary['splits'], sort_keys=True))
  return summary


def input_files(config):
  """The raw data files and the user module that preprocessing reads."""
  files = fs.expand_patterns(config.data.train_patterns, 'data.train')
  if config.data.eval_patterns:
    files += fs.expand_patterns(config.data.eval_patterns, 'data.eval')
  if config.preprocessing.module:
    files.append(config.preprocessing.module)
  return files


def outputs(config):
  """The published summary and row counts; None until preprocess.json is."""
  layout = config.rundir
  if not layout.is_preprocessed():
    return None
  summary = runrecord.read_json(layout.preprocess_summary)
  return {'summary': layout.preprocess_summary, 'transform': layout.transform,
          'data': layout.data, 'splits': summary.get('splits')}


def _preprocess(args):
  run_stage(args_lib.config_from_args(args), args.extra, args.verbose)
