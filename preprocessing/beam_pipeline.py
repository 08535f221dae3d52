"""The preprocessing job: raw files -> tf.Transform -> gzip TFRecords.

    files --ReadRawData--> train rows --AnalyzeDataset--> transform_fn
    files --ReadRawData--> train / eval rows + rejects
    each split --TransformDataset(transform_fn)--> --WriteExamples-->
        RUN_DIR/data/{split}-*.tfrecord.gz

The files are read twice on purpose: a single read would have to hold the
whole training split until the analysis is done, so memory would grow with
the data; reading again lets the transform stream, in constant memory.

Everything that runs on workers is defined here, in an installed module, so
the job runs under the multi-processing DirectRunner, Dataflow and portable
runners alike.
"""

import json
import logging
import os
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
import tensorflow_transform.beam as tft_beam
from tfx_bsl.coders import example_coder
from tfx_bsl.public import tfxio

from pipeline import fs
from pipeline.rundir import RunDir
from preprocessing import rows as rows_lib
from preprocessing import schema as schema_lib
from preprocessing.transform_fn import build_preprocessing_fn

_NAMESPACE = 'estpipe'
_PROGRESS_EVERY = 200_000
SPLITS = ('train', 'eval')
_log = logging.getLogger('estpipe')


class _ParseFile(beam.DoFn):
  """One raw file -> record batches per split, and rejects with reasons."""

  def __init__(self, config, split, report=True):
    self._config = config
    self._split = split  # None: assign each row by hash
    self._report = report  # count and log (once per job, not per read)
    self._parser = None

  def setup(self):
    self._parser = rows_lib.RowParser(self._config)
    self._counters = {}

  def _count(self, name, n=1):
    if not self._report:
      return
    if name not in self._counters:
      self._counters[name] = Metrics.counter(_NAMESPACE, name)
    self._counters[name].inc(n)

  def process(self, path):
    batch_size = self._config.preprocessing.batch_size
    fraction = self._config.data.eval_fraction
    pending = {s: [] for s in SPLITS}
    counts = {s: 0 for s in SPLITS}
    rejected = 0
    unit = 'record' if self._config.data.format == 'tfrecord' else 'line'
    for number, raw, result in self._parser.read_file(path):
      split = self._split or ('eval' if rows_lib.is_eval_row(raw, fraction)
                              else 'train')
      if isinstance(result, rows_lib.Reject):
        rejected += 1
        self._count(f'{split}_rejected')
        if not self._report:
          continue
        yield beam.pvalue.TaggedOutput('rejects', {
            'split': split, 'file': path, unit: number,
            'field': result.field, 'reason': result.reason,
            'raw': rows_lib.raw_for_json(raw)})
        continue
      counts[split] += 1
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
      self._count(f'{split}_read', counts[split])
    if self._report:
        _log.info('read %s: %d train rows, %d eval rows, %d rejected',
                path, counts['train'], counts['eval'], rejected)


class ReadRawData(beam.PTransform):
  """Raw files -> {'train', 'eval', 'rejects'} PCollections.

  With one input, each row goes to eval by a stable hash of its raw bytes.
  """

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
            .with_outputs('train', 'eval', 'rejects'))

  def expand(self, pipeline):
    data = self._config.data
    if not data.eval_patterns:
      parsed = self._read(pipeline, data.train_patterns, 'Data', None)
      return {s: parsed[s] for s in ('train', 'eval', 'rejects')}
    train = self._read(pipeline, data.train_patterns, 'Train', 'train')
    evals = self._read(pipeline, data.eval_patterns, 'Eval', 'eval')
    rejects = ((train.rejects, evals.rejects)
               | 'AllRejects' >> beam.Flatten())
    return {'train': train.train, 'eval': evals.eval, 'rejects': rejects}


def _encode(batch_and_passthrough):
  batch, _ = batch_and_passthrough
  return example_coder.RecordBatchToExamples(batch)


class WriteExamples(beam.PTransform):
  """Transformed record batches -> gzip TFRecords of tf.Example."""

  def __init__(self, prefix, split):
    super().__init__()
    self._prefix = prefix
    self._split = split

  def expand(self, batches):
    return (batches
            | 'Encode' >> beam.FlatMap(_encode)
            | 'Count' >> beam.ParDo(_CountRows(f'{self._split}_written'))
            | 'Write' >> beam.io.WriteToTFRecord(
                self._prefix, file_name_suffix='.tfrecord.gz',
                compression_type=beam.io.filesystem.CompressionTypes.GZIP))


class _CountRows(beam.DoFn):

  def __init__(self, name):
    self._name = name

  def setup(self):
    self._counter = Metrics.counter(_NAMESPACE, self._name)

  def process(self, element):
    self._counter.inc()
    yield element


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


def build(pipeline, config, out_dir, start=None):
  """Adds the preprocessing job to `pipeline`, writing under `out_dir`.

  `out_dir` is laid out as a run directory (a staging one until published).
  """
  start = start or time.time()
  staged = RunDir(out_dir)
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
            'analysis done: transform graph written', start)
  raw = pipeline | 'ReadRawData' >> ReadRawData(config)
  for split in SPLITS:
    name = split.title()
    transformed, _ = (
        ((raw[split], adapter), transform_fn)
        | f'Transform{name}' >> tft_beam.TransformDataset(
            output_record_batches=True))
    files = transformed | f'Write{name}' >> WriteExamples(
        os.path.join(staged.data, split), split)
    milestone(files, f'Report{name}', f'{split} split written: {{}}', start)
  _ = raw['rejects'] | 'WriteRejects' >> WriteRejects(
      os.path.join(staged.rejects, 'rejects'))


def pipeline_options(beam_args):
  """Beam options from the command line, with estpipe's defaults."""
  args = list(beam_args)
  if not any(a.startswith('--pickle_library') for a in args):
    # cloudpickle pickles the job's many tf.Transform DoFns faster than
    # dill (about 1 s of a 15 s Census job) and works on every runner.
    args.append('--pickle_library=cloudpickle')
  return PipelineOptions(args)


def runner_name(options):
  return options.view_as(StandardOptions).runner or 'DirectRunner'


def run_job(config, out_dir, beam_args=()):
  """Runs the job; returns the summary (counts, time, runner)."""
  options = pipeline_options(beam_args)
  runner = runner_name(options)
  start = time.time()
  pipeline = beam.Pipeline(options=options)
  with tft_beam.Context(temp_dir=os.path.join(out_dir, 'tmp')):
    build(pipeline, config, out_dir, start)
    result = pipeline.run()
    result.wait_until_finish()
  counts = counters(result)
  summary = {'runner': runner,
             'wall_seconds': round(time.time() - start, 2),
             'splits': {}}
  for split in SPLITS:
    summary['splits'][split] = {
        'read': counts.get(f'{split}_read', 0) +
                counts.get(f'{split}_rejected', 0),
        'written': counts.get(f'{split}_written', 0),
        'rejected': counts.get(f'{split}_rejected', 0)}
  return summary


def counters(result, namespace=_NAMESPACE):
  """A finished job's counters in `namespace`, summed over steps."""
  found = {}
  for counter in result.metrics().query(
      MetricsFilter().with_namespace(namespace))['counters']:
    name = counter.key.metric.name
    found[name] = found.get(name, 0) + (counter.committed or
                                        counter.attempted or 0)
  return found
