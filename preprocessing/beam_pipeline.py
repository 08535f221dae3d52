"""The preprocessing job: raw files -> tf.Transform -> gzip TFRecords.

    files --ReadRawData--> train rows --AnalyzeDataset--> transform_fn
    files --ReadRawData--> train / eval rows + rejects
    each split --TransformDataset(transform_fn)--> --WriteExamples-->
        RUN_DIR/.staging/ID/data/{split}-*.tfrecord.gz
    written files, transform fn, per-split counts --Publish--> RUN_DIR/

The files are read twice on purpose: a single read would have to hold the
whole training split until the analysis is done, so memory would grow with
the data; reading again lets the transform stream, in constant memory.

Everything that runs on workers is defined here (and in publish.py), in
installed modules, so the job runs under the multi-processing DirectRunner,
Dataflow and portable runners alike. The job publishes its own outputs as its
last step (preprocessing/publish.py), so it needs no client to finish.
"""

import json
import logging
import os
import time

import apache_beam as beam
import tensorflow_transform.beam as tft_beam
from tfx_bsl.coders import example_coder
from tfx_bsl.public import tfxio

from pipeline import fs
from pipeline.rundir import RunDir
from preprocessing import publish
from preprocessing import rows as rows_lib
from preprocessing import runners
from preprocessing import schema as schema_lib
from preprocessing.transform_fn import build_preprocessing_fn

_PROGRESS_EVERY = 200_000
SPLITS = ('train', 'eval')
_log = logging.getLogger('estpipe')


class _ParseFile(beam.DoFn):
  """One raw file -> record batches per split, rejects with reasons, and
  ('SPLIT_read' | 'SPLIT_rejected' | 'train_missing/FEATURE', n) counts."""

  def __init__(self, config, split, report=True):
    self._config = config
    self._split = split  # None: assign each row by hash
    self._report = report  # count and log (once per job, not per read)
    self._parser = None

  def setup(self):
    self._parser = rows_lib.RowParser(self._config)

  def process(self, path):
    batch_size = self._config.preprocessing.batch_size
    fraction = self._config.data.eval_fraction
    pending = {s: [] for s in SPLITS}
    counts = {s: 0 for s in SPLITS}
    rejected = {s: 0 for s in SPLITS}
    features = [c.name for c in self._parser.columns]
    missing = [0] * len(features)  # per feature, in the train split
    unit = 'record' if self._config.data.format == 'tfrecord' else 'line'
    for number, raw, result in self._parser.read_file(path):
      split = self._split or ('eval' if rows_lib.is_eval_row(raw, fraction)
                              else 'train')
      if isinstance(result, rows_lib.Reject):
        rejected[split] += 1
        if not self._report:
          continue
        yield beam.pvalue.TaggedOutput('rejects', {
            'split': split, 'file': path, unit: number,
            'field': result.field, 'reason': result.reason,
            'raw': rows_lib.raw_for_json(raw)})
        continue
      counts[split] += 1
      if split == 'train' and self._report:
        for i, value in enumerate(result[:len(missing)]):
          if value is None:
            missing[i] += 1
      if self._report and sum(counts.values()) % _PROGRESS_EVERY == 0:
        _log.info('%s: %d rows read so far', path, sum(counts.values()))
      pending[split].append(result)
      if len(pending[split]) >= batch_size:
        yield beam.pvalue.TaggedOutput(
            split, self._parser.record_batch(pending[split]))
        pending[split] = []
    for split in SPLITS:
      if pending[split]:
        yield beam.pvalue.TaggedOutput(
            split, self._parser.record_batch(pending[split]))
    if self._report:
      yield from self._counts(counts, rejected)
      for name, count in zip(features, missing):
        yield beam.pvalue.TaggedOutput('counts',
                                       (publish.missing_key(name), count))
      _log.info('read %s: %d train rows, %d eval rows, %d rejected',
                path, counts['train'], counts['eval'],
                sum(rejected.values()))

  def _counts(self, good, rejected):
    for split in SPLITS:
      yield beam.pvalue.TaggedOutput(
          'counts', (f'{split}_read', good[split] + rejected[split]))
      yield beam.pvalue.TaggedOutput(
          'counts', (f'{split}_rejected', rejected[split]))


class ReadRawData(beam.PTransform):
  """Raw files -> {'train', 'eval', 'rejects', 'counts'} PCollections.

  With one input, each row goes to eval by a stable hash of its raw bytes.
  """

  _OUTPUTS = ('train', 'eval', 'rejects', 'counts')

  def __init__(self, config, report=True):
    super().__init__()
    self._config = config
    self._report = report

  def _read(self, pipeline, patterns, key, split):
    files = fs.expand_patterns(patterns, key)
    return (pipeline
            | f'List{key}' >> beam.Create(files)
            | f'Parse{key}' >> beam.ParDo(
                _ParseFile(self._config, split, self._report))
            .with_outputs(*self._OUTPUTS))

  def expand(self, pipeline):
    data = self._config.data
    if not data.eval_patterns:
      parsed = self._read(pipeline, data.train_patterns, 'Data', None)
      return {s: parsed[s] for s in self._OUTPUTS}
    train = self._read(pipeline, data.train_patterns, 'Train', 'train')
    evals = self._read(pipeline, data.eval_patterns, 'Eval', 'eval')
    rejects = ((train.rejects, evals.rejects)
               | 'AllRejects' >> beam.Flatten())
    counts = (train.counts, evals.counts) | 'AllCounts' >> beam.Flatten()
    return {'train': train.train, 'eval': evals.eval, 'rejects': rejects,
            'counts': counts}


def _encode(batch_and_passthrough):
  batch, _ = batch_and_passthrough
  return example_coder.RecordBatchToExamples(batch)


class WriteExamples(beam.PTransform):
  """Serialized tf.Examples -> gzip TFRecords; the written file names."""

  def __init__(self, prefix):
    super().__init__()
    self._prefix = prefix

  def expand(self, examples):
    return examples | 'Write' >> beam.io.WriteToTFRecord(
        self._prefix, file_name_suffix='.tfrecord.gz',
        compression_type=beam.io.filesystem.CompressionTypes.GZIP)


class CountAs(beam.PTransform):
  """A PCollection -> one (name, number of elements) pair."""

  def __init__(self, name):
    super().__init__()
    self._name = name

  def expand(self, pcoll):
    return (pcoll
            | 'Count' >> beam.combiners.Count.Globally()
            | 'Name' >> beam.Map(_named, self._name))


def _named(value, name):
  return name, value


def to_json(record):
  return json.dumps(record, sort_keys=True)


class _Milestone(beam.DoFn):
  """Logs when a stage's output appears: the job's progress report."""

  def __init__(self, message, start):
    self._message = message
    self._start = start

  def process(self, element):
    if isinstance(element, str):
      element = os.path.basename(element)
    _log.info('[%5.1f s] %s', time.time() - self._start,
              self._message.format(element))


def milestone(pcoll, label, message, start):
  return pcoll | label >> beam.ParDo(_Milestone(message, start))


class WriteRejects(beam.PTransform):

  def __init__(self, prefix):
    super().__init__()
    self._prefix = prefix

  def expand(self, rejects):
    return (rejects
            | 'ToJson' >> beam.Map(to_json)
            | 'Write' >> beam.io.WriteToText(self._prefix,
                                             file_name_suffix='.jsonl'))


def tensor_adapter_config(config):
  parser = rows_lib.RowParser(config)
  representations = tfxio.TFExampleRecord(
      file_pattern='unused', schema=schema_lib.raw_schema(config)
  ).TensorRepresentations()
  return tfxio.TensorAdapterConfig(parser.arrow_schema(), representations)


def build(pipeline, config, job):
  """Adds the preprocessing job to `pipeline`: it writes into `job.staging`
  and, as its last step, publishes into `job.run_dir` (publish.Job)."""
  staged = RunDir(job.staging)
  adapter = tensor_adapter_config(config)
  for_analysis = pipeline | 'ReadForAnalysis' >> ReadRawData(
      config, report=False)
  transform_fn = (
      (for_analysis['train'], adapter)
      | 'Analyze' >> tft_beam.AnalyzeDataset(build_preprocessing_fn(config)))
  written_fn = (transform_fn
                | 'WriteTransformFn' >> tft_beam.WriteTransformFn(
                    staged.transform))
  milestone(written_fn, 'ReportAnalysis',
            'analysis done: transform graph written', job.start)
  raw = pipeline | 'ReadRawData' >> ReadRawData(config)
  written, counts = [written_fn], [raw['counts']]
  for split in SPLITS:
    name = split.title()
    transformed, _ = (
        ((raw[split], adapter), transform_fn)
        | f'Transform{name}' >> tft_beam.TransformDataset(
            output_record_batches=True))
    examples = transformed | f'Encode{name}' >> beam.FlatMap(_encode)
    files = examples | f'Write{name}' >> WriteExamples(
        os.path.join(staged.data, split))
    milestone(files, f'Report{name}', f'{split} split written: {{}}',
              job.start)
    written.append(files)
    counts.append(examples | f'Count{name}' >> CountAs(f'{split}_written'))
  written.append(raw['rejects'] | 'WriteRejects' >> WriteRejects(
      os.path.join(staged.rejects, 'rejects')))
  _ = ({'counts': counts | 'AllCounts' >> beam.Flatten(),
        'written': written | 'AllWritten' >> beam.Flatten()}
       | 'Publish' >> publish.Publish(job))


def submit(config, staging, options):
  """Submits the job (staging in `staging`); returns Beam's PipelineResult."""
  job = publish.Job(
      run_dir=config.run_dir, staging=staging, config_source=config.source,
      max_reject_fraction=config.preprocessing.max_reject_fraction,
      runner=runners.runner_name(options), splits=SPLITS, start=time.time(),
      features=tuple(f.name for f in config.features),
      unfilled=tuple(schema_lib.unfilled_numeric(config)))
  pipeline = beam.Pipeline(options=options)
  with tft_beam.Context(temp_dir=os.path.join(staging, 'tmp')):
    build(pipeline, config, job)
    return pipeline.run()
