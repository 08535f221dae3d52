"""`estpipe predict`: batch prediction over raw files with Beam.

    files --ParseRaw--> (key, serialized raw tf.Example) + rejects
          --RunInference(export, 'predict')--> (key, PredictionLog)
          --Format--> one JSON line or CSV row per good input row

The export's own parser and transform do the preprocessing, so batch and
online predictions come from the same graph. A row's key is where it came
from (`path:line` for CSV, `path:record` for TFRecords), or with
`predict.key_column` that column's text (a row whose key is empty or a
missing token is rejected with the reason). Everything that runs
on workers is defined here, in an installed module.
"""

import csv
import glob
import io
import json
import logging
import os
import shutil
import time
import typing
import uuid

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from pipeline import errors
from pipeline import fs
from pipeline import signatures
from preprocessing import beam_pipeline
from preprocessing import rows as rows_lib
from preprocessing import runners
from serving import raw_examples

log = logging.getLogger('estpipe')

_NAMESPACE = 'estpipe_predict'
OUTPUT_FORMATS = ('jsonl', 'csv')


def predict_signature(export_path):
  """The export's tf.Example predict signature: (name, {output: width}).

  Widths (values per row) come from the SignatureDef in saved_model.pb,
  read without loading the model: the CSV header and the JSON shapes are
  fixed before the job runs.
  """
  from tensorflow.python.saved_model import loader_impl  # pylint: disable=g-import-not-at-top
  saved_model = loader_impl.parse_saved_model(export_path)
  defs = saved_model.meta_graphs[0].signature_def
  signature = signatures.predict_signature(defs)
  if (signature not in defs or
      defs[signature].method_name != signatures.PREDICT_METHOD):
    raise ValueError(f'{export_path} has no tf.Example predict signature')
  widths = {}
  for name, info in sorted(defs[signature].outputs.items()):
    dims = [d.size for d in info.tensor_shape.dim[1:]]
    width = 1
    for d in dims:
      width = None if d < 0 or width is None else width * d
    widths[name] = width
  return signature, widths


class _ParseRaw(beam.DoFn):
  """One raw file -> (key, serialized tf.Example) per good row; rejects."""

  def __init__(self, config, data_format, required=()):
    self._config = config
    self._format = data_format
    self._required = tuple(required)  # the export's required features
    self._parser = None

  def setup(self):
    self._key_column = self._config.predict.key_column
    self._parser = raw_examples.row_parser(self._config, self._required,
                                           self._key_column)
    self._read = Metrics.counter(_NAMESPACE, 'read')
    self._rejected = Metrics.counter(_NAMESPACE, 'rejected')

  def process(self, path):
    unit = 'record' if self._format == 'tfrecord' else 'line'
    for number, raw, result in self._parser.read_file(path, self._format):
      self._read.inc()
      if isinstance(result, rows_lib.Reject):
        self._rejected.inc()
        yield beam.pvalue.TaggedOutput('rejects', {
            'file': path, unit: number, 'field': result.field,
            'reason': result.reason, 'raw': rows_lib.raw_for_json(raw)})
        continue
      if self._key_column:
        *result, key = result
      else:
        key = f'{path}:{number}'
      yield key, raw_examples.to_example(self._parser, result)


def prediction_values(prediction_log, widths):
  """A PredictionLog's outputs for one row: scalars, or lists of values."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  outputs = prediction_log.predict_log.response.outputs
  values = {}
  for name, width in widths.items():
    array = tf.make_ndarray(outputs[name]).reshape(-1)
    items = [v.decode('utf-8', 'replace') if isinstance(v, bytes) else
             v.item() for v in array]
    values[name] = items[0] if width == 1 else items
  return values


class _Format(beam.DoFn):
  """(key, PredictionLog) -> one output line (JSON or CSV)."""

  def __init__(self, widths, output_format):
    self._widths = widths
    self._format = output_format

  def setup(self):
    self._written = Metrics.counter(_NAMESPACE, 'written')

  def process(self, keyed):
    key, prediction_log = keyed
    values = prediction_values(prediction_log, self._widths)
    self._written.inc()
    if self._format == 'jsonl':
      yield json.dumps({'key': key, **values}, sort_keys=True)
    else:
      yield _csv_line([key] + _flatten(values, self._widths))


def csv_columns(widths):
  """CSV header: key, then an output per column (name_i for vectors)."""
  columns = ['key']
  for name, width in widths.items():
    columns.extend([name] if width == 1 else
                   [f'{name}_{i}' for i in range(width)])
  return columns


def _flatten(values, widths):
  flat = []
  for name in widths:
    value = values[name]
    flat.extend(value if isinstance(value, list) else [value])
  return flat


def _csv_line(fields):
  out = io.StringIO()
  csv.writer(out, lineterminator='').writerow(fields)
  return out.getvalue()


def _identity(element):
  return element


def _required_features(export_path):
  # Rows without a feature the export requires are rejects (with the
  # reason) rather than a failed inference batch.
  from serving import export  # pylint: disable=g-import-not-at-top
  return export.exported_required_features(export_path)


def inference_spec(export_path, signature):
  from tfx_bsl.public.proto import model_spec_pb2  # pylint: disable=g-import-not-at-top
  return model_spec_pb2.InferenceSpecType(
      saved_model_spec=model_spec_pb2.SavedModelSpec(
          model_path=export_path, signature_name=[signature]))


def build(pipeline, config, export_path, files, data_format, output_format,
          output, rejects):
  """Adds the batch prediction job to `pipeline`."""
  from tfx_bsl.public.beam import RunInference  # pylint: disable=g-import-not-at-top
  signature, widths = predict_signature(export_path)
  if output_format == 'csv' and None in widths.values():
    raise ValueError('CSV output needs fixed-size outputs; use jsonl')
  parsed = (pipeline
            | 'ListFiles' >> beam.Create(files)
            | 'ParseRaw' >> beam.ParDo(_ParseRaw(
                config, data_format, _required_features(export_path)))
            .with_outputs('rejects', main='examples'))
  header = (','.join(csv_columns(widths)) if output_format == 'csv'
            else None)
  _ = (parsed.examples
       # RunInference keeps keys only when the element type says (key, value).
       | 'Keyed' >> beam.Map(_identity).with_output_types(
           typing.Tuple[str, bytes])
       | 'RunInference' >> RunInference(inference_spec(export_path, signature))
       | 'Format' >> beam.ParDo(_Format(widths, output_format))
       | 'WritePredictions' >> beam.io.WriteToText(
           output, shard_name_template='', header=header))
  _ = (parsed.rejects
       | 'RejectsToJson' >> beam.Map(beam_pipeline.to_json)
       | 'WriteRejects' >> beam.io.WriteToText(rejects,
                                                shard_name_template=''))


def rejects_path(output):
  return f'{output}.rejects.jsonl'


def predict(config, export_path, input_pattern, output, data_format=None,
            output_format=None, beam_args=()):
  """Runs batch prediction; returns a summary.

  Predictions go to `output` and rejected rows to `output`.rejects.jsonl;
  both appear only when the job succeeded and the rejects stay within
  preprocessing.max_reject_fraction.
  """
  data_format = data_format or config.data.format
  output_format = output_format or (
      'csv' if output.endswith('.csv') else 'jsonl')
  files = fs.expand_patterns([input_pattern], '--input')
  tag = uuid.uuid4().hex[:8]
  staged = f'{output}.tmp-{tag}'
  staged_rejects = f'{rejects_path(output)}.tmp-{tag}'
  options = _checked_options(beam_args, {
      '--input': input_pattern, '--output': output, 'the export': export_path})
  runner = runners.runner_name(options)  # before Beam's Pipeline edits it
  start = time.time()
  pipeline = beam.Pipeline(options=options)
  build(pipeline, config, export_path, files, data_format, output_format,
        staged, staged_rejects)
  try:
    result = pipeline.run()
    result.wait_until_finish()
    counters = _counters(result)
    summary = {
        'export': export_path, 'input_files': len(files),
        'read': counters.get('read', 0),
        'rejected': counters.get('rejected', 0),
        'written': counters.get('written', 0),
        'output': output, 'rejects': rejects_path(output),
        'wall_seconds': round(time.time() - start, 2),
        'runner': runner}
    # Rejects are published either way, so the user can see why.
    FileSystems.rename([staged_rejects], [rejects_path(output)])
    _check_rejects(config, summary)
    FileSystems.rename([staged], [output])
  finally:
    for path in (staged, staged_rejects):
      if FileSystems.exists(path):
        FileSystems.delete([path])
      _remove_beam_temp(path)
  return summary


def _checked_options(beam_args, paths):
  options = runners.pipeline_options(beam_args)
  if not runners.check(options, False, paths).waits:
    # The client publishes the predictions once the job is done.
    raise errors.UserError('estpipe predict waits for its job: a Dataflow '
                           'job build (--template_location) is not supported')
  return options


def _counters(result):
  """A finished job's counters, summed over steps."""
  found = {}
  for counter in result.metrics().query(
      MetricsFilter().with_namespace(_NAMESPACE))['counters']:
    name = counter.key.metric.name
    found[name] = found.get(name, 0) + (counter.committed or
                                        counter.attempted or 0)
  return found


def _remove_beam_temp(path):
  """Deletes the shards a failed WriteToText to `path` left behind.

  Beam writes them under `beam-temp-<name>-<uuid>` beside the output and
  removes that folder only when the write completes. `path` is this run's
  staged name, so no other job's folder matches.
  """
  base, name = FileSystems.split(path)
  try:
    if '://' not in path:
      # Local: the folder itself, which may be empty.
      for folder in glob.glob(os.path.join(
          glob.escape(base), f'beam-temp-{glob.escape(name)}-*')):
        shutil.rmtree(folder, ignore_errors=True)
      return
    # Object stores have no folders: delete the objects under the prefix.
    pattern = FileSystems.join(base, f'beam-temp-{name}-*') + '/**'
    found = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if found:
      FileSystems.delete(found)
  except (BeamIOError, OSError) as e:
    # Cleanup must not hide why the job failed.
    log.warning('could not remove Beam temporary files of %s: %s', path, e)


def _check_rejects(config, summary):
  read, rejected = summary['read'], summary['rejected']
  errors.check_reject_fraction(read, rejected,
                               config.preprocessing.max_reject_fraction,
                               summary['rejects'])
  if summary['written'] != read - rejected:
    raise RuntimeError(f'{read - rejected} good rows but '
                       f'{summary["written"]} predictions written')

