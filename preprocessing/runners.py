"""Where a Beam job goes: checks before submitting, and where it went.

estpipe waits for its jobs unless told otherwise. `--detach` submits a job
to a job service (or Dataflow) and returns its id; a Dataflow job build
(`--template_location`) writes the job request and returns. The checks here
fail in seconds and name the flag, where Beam would hang (a job service that
does not answer, a cloud bucket it tries to create for a local temp folder)
or fail minutes later (staging setup.py without the `build` package, local
paths that remote workers cannot read).
"""

import dataclasses
import importlib.util
import logging
import os
import urllib.parse

from apache_beam.options.pipeline_options import GoogleCloudOptions
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import PortableOptions
from apache_beam.options.pipeline_options import SetupOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.options.pipeline_options import WorkerOptions

from pipeline import fs
from pipeline.errors import UserError
from preprocessing import jobs

_log = logging.getLogger('estpipe')

# Runners that hand the job to a Beam job service (PortableRunner's
# subclasses start theirs from a jar when no --job_endpoint is given).
_JOB_SERVICE_RUNNERS = ('PortableRunner', 'FlinkRunner', 'SparkRunner')
_DATAFLOW_RUNNERS = ('DataflowRunner', 'TestDataflowRunner')


class EstpipeOptions(PipelineOptions):
  """estpipe's own pipeline option: it travels with the job to its service,
  so `estpipe jobs cancel` finds the job's staging folder."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--estpipe_staging', default=None,
                        help='(set by estpipe) the staging folder of the job')


def pipeline_options(beam_args):
  """Beam options from the command line, with estpipe's defaults."""
  args = list(beam_args)
  if not any(a.startswith('--pickle_library') for a in args):
    # cloudpickle pickles the job's many tf.Transform DoFns faster than
    # dill (about 1 s of a 15 s Census job) and works on every runner.
    args.append('--pickle_library=cloudpickle')
  return PipelineOptions(args)


def with_staging(options, staging):
  """The job carries its staging folder (`estpipe jobs` shows it)."""
  options.view_as(EstpipeOptions).estpipe_staging = staging
  return options


def runner_name(options):
  runner = options.view_as(StandardOptions).runner or 'DirectRunner'
  return runner if isinstance(runner, str) else type(runner).__name__


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a checked job goes, and whether estpipe waits for it."""
  runner: str
  kind: str  # local | job_service | dataflow | dataflow_build
  waits: bool


def check(options, detach, paths=()):
  """The job's Target; UserError when the options cannot work.

  `paths` ({what: path}) are the files the workers read and write.
  """
  runner = runner_name(options)
  if runner in _DATAFLOW_RUNNERS:
    return _check_dataflow(options, detach, paths)
  if runner in _JOB_SERVICE_RUNNERS:
    _check_job_service(options, runner, detach)
    return Target(runner, 'job_service', waits=not detach)
  if detach:
    raise UserError(f'--detach needs a runner that runs the job without '
                    f'estpipe (a job service: --runner=PortableRunner '
                    f'--job_endpoint=HOST:PORT, or Dataflow), not {runner}')
  return Target(runner, 'local', waits=True)


def _check_job_service(options, runner, detach):
  portable = options.view_as(PortableOptions)
  endpoint = portable.job_endpoint
  if runner == 'PortableRunner' and not endpoint:
    raise UserError('--runner=PortableRunner needs --job_endpoint=HOST:PORT '
                    '(a Beam job service)')
  if endpoint and endpoint != 'embed':
    jobs.check_answers(endpoint, '--job_endpoint')
  environment = (portable.environment_type or '').upper()
  if environment == 'EXTERNAL':
    if not portable.environment_config:
      raise UserError('--environment_type=EXTERNAL needs '
                      '--environment_config=HOST:PORT (a Beam worker pool)')
    jobs.check_answers(portable.environment_config, '--environment_config')
  if detach and environment == 'LOOPBACK':
    raise UserError('--detach: LOOPBACK workers run inside this command and '
                    'would stop with it; use a worker pool '
                    '(--environment_type=EXTERNAL --environment_config='
                    'HOST:PORT), PROCESS or DOCKER')


def _check_dataflow(options, detach, paths):
  cloud = options.view_as(GoogleCloudOptions)
  _check_setup(options)
  if cloud.template_location and _is_local(cloud.dataflow_endpoint):
    _prepare_offline_build(cloud, paths)
    return Target(runner_name(options), 'dataflow_build', waits=False)
  if _is_local(cloud.dataflow_endpoint):
    raise UserError(f'--dataflow_endpoint={cloud.dataflow_endpoint} reaches '
                    'no Dataflow service: offline, only a job build works '
                    '(add --template_location=FILE)')
  missing = [f'--{name}' for name in ('project', 'region', 'temp_location')
             if not getattr(cloud, name)]
  if missing:
    raise UserError(f'Dataflow needs {", ".join(missing)}')
  for flag in ('temp_location', 'staging_location', 'template_location'):
    value = getattr(cloud, flag)
    if value and not value.startswith('gs://'):
      raise UserError(
          f'--{flag}={value}: Dataflow needs a gs:// location (a local '
          'folder works only for an offline job build: --template_location '
          'with --dataflow_endpoint=http://localhost:1 --no_auth)')
  for what, path in dict(paths).items():
    if not fs.is_remote(path):
      raise UserError(f'{what} {path} is local: Dataflow workers cannot read '
                      'it; put it on gs://')
  if cloud.template_location:
    return Target(runner_name(options), 'dataflow_build', waits=False)
  return Target(runner_name(options), 'dataflow', waits=not detach)


def _check_setup(options):
  setup = options.view_as(SetupOptions)
  if not (setup.setup_file or
          options.view_as(WorkerOptions).sdk_container_image):
    raise UserError('Dataflow workers need estpipe installed: add '
                    '--setup_file=./setup.py (or --sdk_container_image)')
  if not setup.setup_file:
    return
  if not os.path.isfile(setup.setup_file):
    raise UserError(f'--setup_file={setup.setup_file}: no such file')
  if importlib.util.find_spec('build') is None:
    # Beam stages setup.py with `python -m build --sdist`; without it the
    # staging fails and retries with backoff for minutes.
    raise UserError('--setup_file needs the `build` package: pip install '
                    'build')


def _prepare_offline_build(cloud, paths):
  if not cloud.no_auth:
    raise UserError('an offline job build needs --no_auth (else Beam looks '
                    'for cloud credentials)')
  for flag in ('temp_location', 'staging_location'):
    value = getattr(cloud, flag)
    if not value:
      raise UserError(f'a Dataflow job build needs --{flag}')
    if not fs.is_remote(value):
      fs.makedirs(value)
  if not fs.is_remote(cloud.template_location):
    fs.makedirs(os.path.dirname(os.path.abspath(cloud.template_location)))
  local = [path for path in dict(paths).values() if not fs.is_remote(path)]
  if local:
    _log.warning('the job names local paths (%s): workers on Dataflow '
                 'cannot read them', ', '.join(local))


def _is_local(endpoint):
  host = urllib.parse.urlparse(endpoint or '').hostname or ''
  return host in ('localhost', '127.0.0.1')


def submitted(result, options, target):
  """Lines saying where a job that estpipe does not wait for is; the job id
  (None for a job build) last, alone."""
  cloud = options.view_as(GoogleCloudOptions)
  if target.kind == 'dataflow_build':
    return [f'Dataflow job request written to {cloud.template_location} '
            f'(the pipeline and packages in {cloud.staging_location})'], None
  if target.kind == 'dataflow':
    job_id = result.job_id()
    return [f'submitted to Dataflow: https://console.cloud.google.com/'
            f'dataflow/jobs/{cloud.region}/{job_id}?project={cloud.project}',
            job_id], job_id
  # PortableRunner's result keeps the id private; the job API needs it.
  job_id = result._job_id  # pylint: disable=protected-access
  endpoint = options.view_as(PortableOptions).job_endpoint
  return [f'submitted to the job service at {endpoint}; follow it with '
          f'`estpipe jobs status {job_id} --job_endpoint {endpoint}`',
          job_id], job_id
