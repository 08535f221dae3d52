"""`estpipe cluster --emit vertex`: the same cluster as a Vertex AI CustomJob.

Written offline: a CustomJobSpec (what `gcloud ai custom-jobs create
--config` reads) whose worker pools are, in Vertex's fixed order, the chief
(1 replica), the workers, the ps tasks and the evaluator (1 replica). Every
replica installs the staged sdist of this project into TensorFlow 2.15's
prebuilt training container and runs `python -m pipeline.cli train CONFIG`;
Vertex sets each replica's TF_CONFIG, as `estpipe cluster` does locally.
"""

import json
import logging

import yaml

from estimators import cluster
from pipeline import fs
from pipeline.errors import UserError

log = logging.getLogger('estpipe')

# Vertex's prebuilt training container for TensorFlow 2.15 (Python 3.10).
IMAGE = 'us-docker.pkg.dev/vertex-ai/training/tf-cpu.2-15.py310:latest'
MACHINE_TYPE = 'n1-standard-4'
MODULE = 'pipeline.cli'
# Vertex mounts Cloud Storage here in every replica (Cloud Storage FUSE).
GCS_MOUNT = '/gcs/'


def job_config_path(config_path, config_uri):
  """Where a replica reads the config: the uploaded copy through /gcs/."""
  if not config_uri:
    log.warning('no --config_uri: the job reads the config at %s, which '
                'must exist in the container; upload it to gs:// and pass '
                '--config_uri', config_path)
    return config_path
  if not config_uri.startswith('gs://'):
    raise UserError(f'--config_uri {config_uri}: expected a gs:// path')
  return GCS_MOUNT + config_uri[len('gs://'):]


def warn_local_paths(config):
  """Replicas reach only Cloud Storage: local run_dir or data cannot work."""
  paths = {'run_dir': [config.run_dir],
           'data.train': config.data.train_patterns,
           'data.eval': config.data.eval_patterns}
  for key, values in paths.items():
    for value in values:
      if not fs.is_remote(value):
        log.warning('%s is local (%s): Vertex replicas need a gs:// path',
                    key, value)


def custom_job_spec(args, workers, ps, package_uri, image=IMAGE,
                    machine_type=MACHINE_TYPE):
  """The CustomJobSpec: chief, workers, ps and evaluator pools."""
  if not package_uri.startswith('gs://'):
    raise UserError(f'--package_uri {package_uri}: expected the gs:// path '
                    'of the uploaded sdist')

  def pool(replicas):
    if not replicas:
      return {}  # Vertex's placeholder for an unused pool.
    return {'machineSpec': {'machineType': machine_type},
            'replicaCount': replicas,
            'pythonPackageSpec': {'executorImageUri': image,
                                  'packageUris': [package_uri],
                                  'pythonModule': MODULE,
                                  'args': list(args)}}
  return {'workerPoolSpecs': [pool(1), pool(workers), pool(ps), pool(1)]}


def emit(config, config_path, overrides, distribution, workers, ps,
         package_uri, config_uri=None, image=IMAGE,
         machine_type=MACHINE_TYPE):
  """The spec for `config`: the tasks `estpipe cluster` would run."""
  warn_local_paths(config)
  args = cluster.train_args(job_config_path(config_path, config_uri),
                            overrides, distribution)
  return custom_job_spec(args, workers, ps, package_uri, image, machine_type)


def write_spec(spec, out):
  """YAML for .yaml/.yml, else JSON (which gcloud reads as YAML too)."""
  if out.endswith(('.yaml', '.yml')):
    text = yaml.safe_dump(spec, sort_keys=False)
  else:
    text = json.dumps(spec, indent=2) + '\n'
  with open(out, 'w') as f:
    f.write(text)
