"""tf.data input functions over the transformed gzip TFRecords.

Reads interleave over the files, examples are shuffled and batched as
serialized strings and parsed a batch at a time with the transformed feature
spec (one parse op per batch, not per example), and the pipeline prefetches so
that the next batch is ready while the model steps.
"""

import tensorflow as tf

from pipeline import fs
from pipeline.errors import UserError

# How the label reaches the model:
#   names: class-name strings (canned Estimators with label_vocabulary, so
#          that exports return the configured class names)
#   index: the class index (int64) or the regression target, shape [batch]
#   keras: as index, but shaped [batch, 1] as Keras losses expect
LABEL_FORMATS = ('names', 'index', 'keras')


def data_files(config, split):
  files = fs.glob(config.rundir.data_pattern(split))
  if not files:
    raise UserError(f'no {split} data at {config.rundir.data_pattern(split)}: run '
                    '`estpipe preprocess` on this config first')
  return files


def make_input_fn(config, tft_output, split, training, label_format,
                  num_epochs=None):
  """An Estimator input_fn for one split of the transformed data.

  Training input is shuffled and repeated (`num_epochs` times, or forever);
  evaluation input is read once, in order.
  """
  if label_format not in LABEL_FORMATS:
    raise ValueError(f'label_format: expected one of {LABEL_FORMATS}')
  files = data_files(config, split)
  feature_spec = tft_output.transformed_feature_spec()
  pipeline_config = config

  def input_fn(config=None, input_context=None):  # pylint: disable=redefined-outer-name
    # `config` here is the Estimator's RunConfig (passed by name): each task
    # of a between-graph cluster shuffles with its own seed.
    task_offset = getattr(config, 'global_id_in_cluster', 0) or 0
    return make_dataset(pipeline_config, files, feature_spec, training,
                        label_format, num_epochs, input_context,
                        seed_offset=task_offset)

  return input_fn


def make_dataset(config, files, feature_spec, training, label_format,
                 num_epochs=None, input_context=None, seed_offset=0,
                 batch_size=None):
  """(features, label) batches from transformed TFRecord files."""
  seed = config.train.seed + seed_offset
  batch_size = batch_size or config.train.batch_size
  # Under a synchronous strategy each input pipeline reads its own part: whole
  # files when there are enough of them, every n-th record otherwise.
  pipelines = input_context.num_input_pipelines if input_context else 1
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  shard_files = pipelines > 1 and len(files) >= pipelines
  if input_context:
    batch_size = input_context.get_per_replica_batch_size(batch_size)
  dataset = tf.data.Dataset.from_tensor_slices(files)
  if shard_files:
    dataset = dataset.shard(pipelines, pipeline_id)
  if training:
    dataset = dataset.shuffle(len(files), seed=seed)
  dataset = dataset.interleave(
      lambda f: tf.data.TFRecordDataset(f, compression_type='GZIP'),
      cycle_length=min(len(files), 8), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=not training)
  if pipelines > 1 and not shard_files:
    dataset = dataset.shard(pipelines, pipeline_id)
  if training:
    dataset = dataset.shuffle(config.train.shuffle_buffer, seed=seed)
    dataset = dataset.repeat(num_epochs)
  # Fixed-size training batches keep shapes static across replicas.
  dataset = dataset.batch(batch_size, drop_remainder=training)
  parse = _parse_fn(config, feature_spec, label_format)
  dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=not training)
  return dataset.prefetch(tf.data.AUTOTUNE)


def _parse_fn(config, feature_spec, label_format):
  label_name = config.label.name
  if label_name not in feature_spec:
    raise UserError(f'the label {label_name!r} is not in the transformed '
                    'data: preprocess again with this config')
  vocabulary = config.label.vocabulary

  def parse(serialized):
    features = tf.io.parse_example(serialized, feature_spec)
    label = features.pop(label_name)
    if label_format == 'names' and vocabulary:
      label = tf.gather(tf.constant(vocabulary), label)
    elif label_format == 'keras':
      label = tf.expand_dims(label, -1)
    return features, label

  return parse


def count_examples(files):
  """Number of records in gzip TFRecord files (to turn epochs into steps)."""
  dataset = tf.data.TFRecordDataset(files, compression_type='GZIP')
  return int(dataset.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
