"""RunConfig and distribution from `train:` and the TF_CONFIG cluster.

`train.distribution`:
  none                   one process, one device
  mirrored               one process, synchronous over its devices (the GPUs,
                         or `train.num_devices` logical CPUs when there are
                         none)
  multi_worker_mirrored  synchronous all-reduce over the workers in
                         TF_CONFIG (chief + workers; an evaluator may run
                         beside them)
  parameter_server       between-graph asynchronous training: variables on
                         the ps tasks of TF_CONFIG, chief + workers train, an
                         evaluator may run beside them

The multi-worker modes read the cluster and this process's task from
TF_CONFIG, so the same `estpipe train` command runs as chief, worker, ps or
evaluator.
"""

import json
import os

import tensorflow as tf

from pipeline.errors import UserError

MULTI_WORKER = ('multi_worker_mirrored', 'parameter_server')


def tf_config():
  """The parsed TF_CONFIG environment variable ({} when unset)."""
  raw = os.environ.get('TF_CONFIG', '')
  if not raw.strip():
    return {}
  try:
    value = json.loads(raw)
  except json.JSONDecodeError as e:
    raise UserError(f'TF_CONFIG is not valid JSON: {e}')
  if not isinstance(value, dict):
    raise UserError('TF_CONFIG must be a JSON object with cluster and task')
  return value


def task_type():
  """This process's role: chief, worker, ps, evaluator, or None (local)."""
  return tf_config().get('task', {}).get('type')


def check_cluster(config):
  """Fails early when train.distribution and TF_CONFIG disagree."""
  mode = config.train.distribution
  tfc = tf_config()
  cluster = tfc.get('cluster', {})
  task = tfc.get('task', {})
  if mode not in MULTI_WORKER:
    if cluster:
      raise UserError(f'TF_CONFIG describes a cluster but train.distribution '
                      f'is {mode}: set it to multi_worker_mirrored or '
                      'parameter_server, or unset TF_CONFIG')
    return
  if not tfc:
    raise UserError(f'train.distribution {mode} reads the cluster from '
                    'TF_CONFIG, which is not set')
  if 'type' not in task or 'index' not in task:
    raise UserError('TF_CONFIG needs task.type and task.index')
  if task['type'] != 'evaluator' and task['type'] not in cluster:
    raise UserError(f'TF_CONFIG: task type {task["type"]!r} is not in the '
                    f'cluster ({", ".join(sorted(cluster))})')
  if 'chief' not in cluster:
    raise UserError('TF_CONFIG: the cluster needs a chief task')
  has_ps = bool(cluster.get('ps'))
  if mode == 'parameter_server' and not has_ps:
    raise UserError('train.distribution parameter_server needs ps tasks in '
                    'the TF_CONFIG cluster')
  if mode == 'multi_worker_mirrored' and has_ps:
    raise UserError('train.distribution multi_worker_mirrored takes no ps '
                    'tasks; use parameter_server for a cluster with ps')


def configure_local_devices(config):
  """Splits the CPU into logical devices for `mirrored` without GPUs.

  Must run before TensorFlow initializes its runtime (before any op runs).
  """
  if config.train.distribution != 'mirrored':
    return
  if tf.config.list_physical_devices('GPU'):
    return
  cpu = tf.config.list_physical_devices('CPU')[0]
  wanted = config.train.num_devices
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * wanted)
  except RuntimeError:
    # Already initialized (e.g. in a notebook): use what is there.
    have = len(tf.config.list_logical_devices('CPU'))
    if have < wanted:
      raise UserError(f'mirrored training needs {wanted} CPU devices but '
                      f'TensorFlow was initialized with {have}; start a new '
                      'process')


def make_strategy(config):
  """The tf.distribute strategy for training, or None."""
  mode = config.train.distribution
  if mode == 'mirrored':
    gpus = tf.config.list_logical_devices('GPU')
    if gpus:
      return tf.distribute.MirroredStrategy()
    devices = [d.name for d in tf.config.list_logical_devices('CPU')]
    devices = devices[:config.train.num_devices]
    # The default (NCCL-style) cross-device ops hang at step 0 on CPUs.
    return tf.distribute.MirroredStrategy(
        devices=devices,
        cross_device_ops=tf.distribute.ReductionToOneDevice())
  if mode == 'multi_worker_mirrored' and task_type() != 'evaluator':
    # The evaluator is not in the cluster: building the strategy there
    # fails, and it evaluates without one.
    return tf.distribute.experimental.MultiWorkerMirroredStrategy()
  # parameter_server: the Estimator's own between-graph replication places
  # variables on the ps tasks (replica_device_setter) from TF_CONFIG.
  return None


def make_run_config(config, distribute=True):
  """The RunConfig for training (distribute=False: for evaluation/export)."""
  if distribute:
    check_cluster(config)
  train = config.train
  strategy = make_strategy(config) if distribute else None
  return tf.estimator.RunConfig(
      model_dir=config.rundir.model,
      tf_random_seed=train.seed,
      save_summary_steps=train.save_summary_steps,
      save_checkpoints_steps=train.save_checkpoints_steps,
      keep_checkpoint_max=train.keep_checkpoint_max,
      log_step_count_steps=train.log_step_count_steps,
      train_distribute=strategy)
