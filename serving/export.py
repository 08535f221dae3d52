"""SavedModel exports that TF Serving, saved_model_cli and RunInference read.

Every export lives in RUN_DIR/export/<version>/, the base-path layout TF
Serving watches: it serves the highest integer version and ignores other
names. The tf.Transform graph is part of every export, so clients send raw
features and can never feed a transform that differs from training.

One SavedModel carries two signature families over the same graph (their
keys and inputs: pipeline/signatures.py):
  - serialized tf.Example in (`serving_default`, `classification` or
    `regression`, `predict`), as canned Estimators export them, for
    `:classify`, `:regress` and tfx-bsl RunInference;
  - `raw:predict`: one dense tensor per raw feature, for JSON clients.
The second works because each parsed raw feature is a
`placeholder_with_default` over the parsed value: feeding it bypasses the
parser, not feeding it keeps the tf.Example path.

Missing values on the raw-feature signature: a string equal to '' or to one of
`data.missing`, or a NaN number. They reach the transform as absent values,
exactly as a missing CSV field does in preprocessing.

Required features (`required_features`, written to the export metadata):
numeric features that were never missing in the training split and have no
`default`. Filling them with 0 would feed the model a value it never saw, so
the graph itself rejects an example that lacks one (InvalidArgumentError
naming the feature), on every signature and in any server.
"""

import gc
import logging
import os
import re
import time
import uuid

import tensorflow as tf

from pipeline import fs
from pipeline import rundir
from pipeline import runrecord
from pipeline import signatures

log = logging.getLogger('estpipe')

# Per-version metadata, in the folder TF Serving reserves for extra files.
METADATA_FILE = os.path.join('assets.extra', 'estpipe_export.json')
EXPORTER_NAMES = ('latest', 'best', 'final')
# Metrics where a smaller value is better (for the best exporter's default).
_SMALLER_IS_BETTER = re.compile(r'loss|error|mse|mae|rmse', re.IGNORECASE)
_LIVE_TRANSFORM = []


# --- the serving input receiver ----------------------------------------------

def serving_feature_spec(config):
  """The raw feature spec of the serving inputs: features only, no label."""
  from preprocessing import schema  # pylint: disable=g-import-not-at-top
  return schema.serving_feature_spec(config)


# Wire kinds of the raw features, as written to the export metadata: the
# model server reads them to build tf.Examples this export's parser accepts.
RAW_FEATURE_KINDS = {tf.float32: 'float', tf.int64: 'integer',
                     tf.string: 'string'}


def raw_feature_kinds(config):
  """{raw feature: 'float' | 'integer' | 'string'} of the serving inputs."""
  return {name: RAW_FEATURE_KINDS[spec.dtype]
          for name, spec in sorted(serving_feature_spec(config).items())}


def required_features(config):
  """Raw features every example must have (see the module docstring); none
  for a run whose preprocess.json predates the missing-value counts."""
  from preprocessing import schema  # pylint: disable=g-import-not-at-top
  path = config.rundir.preprocess_summary
  summary = runrecord.read_json(path) if fs.exists(path) else {}
  return schema.required_features(config, summary.get('train_missing'))


def required_message(name):
  """The error an example without required feature `name` gets."""
  return (f'raw feature {name!r} is required: it was never missing in '
          'training and has no default, so a missing value cannot be filled')


def raw_input_dtype(spec_dtype):
  """The dtype of a raw-feature signature input for a raw column dtype.

  Numbers travel as float64 so that NaN can say "missing" for integer columns
  too (exact for integers below 2**53); strings stay strings.
  """
  return tf.string if spec_dtype == tf.string else tf.float64


def _densify(name, sparse, missing_value):
  """[batch, <=1] raw SparseTensor -> dense [batch], missing_value if absent."""
  check = tf.debugging.assert_less_equal(
      sparse.dense_shape[1], tf.constant(1, tf.int64),
      message=f'raw feature {name!r} has more than one value in an example')
  with tf.control_dependencies([check]):
    one_column = tf.SparseTensor(
        sparse.indices, sparse.values,
        tf.stack([sparse.dense_shape[0], tf.constant(1, tf.int64)]))
  dense = tf.sparse.to_dense(one_column, default_value=missing_value)
  return tf.reshape(dense, [-1])


def _is_present(values, missing_tokens):
  if values.dtype == tf.string:
    present = tf.not_equal(values, '')
    for token in missing_tokens:
      present = tf.logical_and(present, tf.not_equal(values, token))
    return present
  return tf.logical_not(tf.math.is_nan(values))


def _sparsify(name, values, spec_dtype, missing_tokens, required=False):
  """Dense raw input [batch] -> the VarLen SparseTensor preprocessing saw.

  Strings are stripped and missing tokens dropped as the raw row parser
  (preprocessing.rows) does, so serving sees what training saw. A
  `required` feature's missing value is an InvalidArgumentError naming it.
  """
  if values.dtype == tf.string:
    values = tf.strings.strip(values)
  present = _is_present(values, missing_tokens)
  if required:
    check = tf.debugging.Assert(tf.reduce_all(present),
                                [tf.constant(required_message(name))],
                                name=f'require_{_signature_safe(name)}')
    with tf.control_dependencies([check]):
      present = tf.identity(present)
  kept = tf.boolean_mask(values, present)
  if spec_dtype.is_integer:
    whole = tf.debugging.assert_equal(
        tf.math.floor(kept), kept,
        message=f'raw feature {name!r} is an integer feature and takes whole '
        'numbers, got a fraction')
    with tf.control_dependencies([whole]):
      kept = tf.cast(kept, spec_dtype)
  elif kept.dtype != spec_dtype:
    kept = tf.cast(kept, spec_dtype)
  rows = tf.where(present)
  indices = tf.concat([rows, tf.zeros_like(rows)], axis=1)
  batch = tf.shape(values, out_type=tf.int64)[0]
  return tf.SparseTensor(indices, kept, tf.stack([batch, 1]))


def parse_raw_examples(serialized, spec):
  """Serialized raw tf.Examples [batch] -> {raw feature: dense [batch]}, an
  absent value as NaN or '': the inputs of the raw-feature signature."""
  parsed = tf.io.parse_example(serialized, spec)
  dense = {}
  for name in sorted(spec):
    dtype = spec[name].dtype
    missing = '' if dtype == tf.string else float('nan')
    sparse = parsed[name]
    sparse = tf.SparseTensor(sparse.indices,
                             tf.cast(sparse.values, raw_input_dtype(dtype)),
                             sparse.dense_shape)
    dense[name] = _densify(name, sparse, missing)
  return dense


def sparsify_raw(dense, spec, missing_tokens, required):
  """Dense raw inputs -> the VarLen SparseTensors preprocessing saw, with
  the `required` features asserted present."""
  return {name: _sparsify(name, dense[name], spec[name].dtype,
                          missing_tokens, required=name in required)
          for name in sorted(spec)}


def _signature_safe(name):
  return re.sub(r'[^A-Za-z0-9_.]', '_', name)


def serving_input_receiver_fn(config):
  """The Estimator serving input receiver fn for this pipeline's exports.

  Parses serialized tf.Example with the raw feature spec, offers each parsed
  feature as a feedable raw input, then applies the tf.Transform graph. The
  returned features are the transformed features without the label: what
  the model_fn receives in training.
  """
  import tensorflow_transform as tft  # pylint: disable=g-import-not-at-top
  spec = serving_feature_spec(config)
  missing_tokens = list(config.data.missing)
  required = set(required_features(config))
  transform_dir = config.rundir.transform
  label = config.label.name

  def receiver_fn():
    # TF2 resources (the transform's tables) left over from an earlier export
    # graph must be destroyed here, between graphs: destroyed by the garbage
    # collector while an op is being created, they deadlock on the graph lock.
    gc.collect()
    serialized = tf.compat.v1.placeholder(
        tf.string, [None], name='input_example_tensor')
    dense = parse_raw_examples(serialized, spec)
    raw_inputs = {
        name: tf.compat.v1.placeholder_with_default(
            dense[name], [None], name=f'raw_{_signature_safe(name)}')
        for name in sorted(spec)}
    raw_features = sparsify_raw(raw_inputs, spec, missing_tokens, required)
    # A fresh TFTransformOutput per graph: its cached Keras layer holds
    # resources of the graph it was first called in.
    tft_output = tft.TFTransformOutput(transform_dir)
    transformed = tft_output.transform_raw_features(
        raw_features, drop_unused_features=True)
    features = {k: v for k, v in transformed.items() if k != label}
    # Keep this export's transform alive until the next export (see above),
    # and collect what loading it left behind while no op is being built.
    _LIVE_TRANSFORM[:] = [tft_output]
    gc.collect()
    # The classify and regress signatures rename the one serialized input
    # themselves (signatures.CLASSIFY_INPUTS).
    return tf.estimator.export.ServingInputReceiver(
        features, {signatures.EXAMPLES_INPUT: serialized},
        receiver_tensors_alternatives={signatures.RAW_RECEIVER: raw_inputs})

  return receiver_fn


# --- versions in RUN_DIR/export ------------------------------------------------

def read_metadata(path):
  meta_path = os.path.join(path, METADATA_FILE)
  if not fs.exists(meta_path):
    return {}
  return runrecord.read_json(meta_path)


def exported_required_features(path):
  """The required raw features an export's metadata names (none for an
  export from before they were recorded)."""
  return tuple(read_metadata(path).get('required_features') or ())


def _next_version(export_dir):
  """Seconds since the epoch, as Estimators do, but always above the newest.

  TF Serving serves the highest number, so the newest export must be it.
  """
  versions = rundir.list_versions(export_dir)
  return max([int(time.time())] + [v + 1 for v in versions])


def _publish_version(staged, export_dir):
  """Renames a finished SavedModel to export_dir/<version>, atomically."""
  fs.makedirs(export_dir)
  while True:
    version = _next_version(export_dir)
    target = os.path.join(export_dir, str(version))
    # Claim the number; a local rename replaces the empty folder.
    if not fs.claim_dir(target):
      continue
    if fs.is_remote(target):
      fs.rmtree(target)  # object stores rename onto no folder
    fs.replace(staged, target)
    return version, target


def remove_version(export_dir, version):
  """Deletes one version; TF Serving never sees it half deleted."""
  path = os.path.join(export_dir, str(version))
  doomed = os.path.join(export_dir, f'.deleting-{version}-{uuid.uuid4().hex}')
  fs.replace(path, doomed)
  fs.rmtree(doomed)


def _global_step(checkpoint_path):
  # A reader of the checkpoint prefix itself: load_variable first asks
  # whether the path is a folder, which some object stores answer yes for a
  # prefix of other objects ('model.ckpt-30' of 'model.ckpt-30.index').
  try:
    reader = tf.compat.v1.train.NewCheckpointReader(checkpoint_path)
    return int(reader.get_tensor('global_step'))
  except (tf.errors.NotFoundError, ValueError):
    return None


def export_saved_model(config, estimator, checkpoint_path=None,
                       exporter='manual', metrics=None):
  """Exports one checkpoint to RUN_DIR/export/<version>; returns the path.

  The SavedModel is written under RUN_DIR/.staging and renamed into place,
  so a watcher sees either no version or a complete one.
  """
  checkpoint_path = checkpoint_path or estimator.latest_checkpoint()
  if not checkpoint_path:
    raise FileNotFoundError(f'no checkpoint in {estimator.model_dir}')
  receiver_fn = serving_input_receiver_fn(config)
  with runrecord.staging_dir(config.run_dir, 'export') as staging:
    written = estimator.export_saved_model(
        staging, receiver_fn, checkpoint_path=checkpoint_path)
    written = written.decode() if isinstance(written, bytes) else written
    target = publish_export(
        config, written, exporter=exporter, checkpoint=checkpoint_path,
        global_step=_global_step(checkpoint_path), metrics=metrics)
  log.info('exported %s (%s) to %s', checkpoint_path, exporter, target)
  return target


def publish_export(config, written, metrics=None, **metadata):
  """Completes a staged SavedModel, whatever trained it: its estpipe
  metadata (`metadata` plus the raw features and required features) and
  warmup requests; then publishes it as the next version. Its path."""
  runrecord.write_json(os.path.join(written, METADATA_FILE), {
      **metadata,
      'metrics': _plain_metrics(metrics),
      'raw_features': raw_feature_kinds(config),
      'required_features': required_features(config),
      'time': runrecord.now(),
  })
  write_warmup_requests(config, written)
  _, target = _publish_version(written, config.rundir.export)
  return target


WARMUP_ROWS = 4


def write_warmup_requests(config, export_path, rows=WARMUP_ROWS):
  """Writes TF Serving's warmup file into an export: one request per
  signature over the first `rows` good eval rows (serving/warmup.py), which
  the model server (and tensorflow_model_server) replays before serving the
  version. Without readable eval rows the export goes without one, with a
  warning: warmup only saves the first requests' time. Returns the number
  of requests written."""
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  from preprocessing import rows as rows_lib  # pylint: disable=g-import-not-at-top
  from serving import raw_examples  # pylint: disable=g-import-not-at-top
  from serving import warmup  # pylint: disable=g-import-not-at-top
  try:
    parser = raw_examples.row_parser(config)
    good = []
    for _, _, values in raw_examples.eval_rows(config, parser):
      if not isinstance(values, rows_lib.Reject):
        good.append(values)
        if len(good) >= rows:
          break
    if not good:
      raise ValueError('no good eval rows')
  except Exception as e:  # pylint: disable=broad-except
    log.warning('export %s has no warmup requests: cannot read eval rows '
                '(%s); its first requests will be slower', export_path, e)
    return 0
  examples = [tf.train.Example.FromString(raw_examples.to_example(parser, v))
              for v in good]
  instances = [raw_examples.to_raw_instance(parser, v) for v in good]
  saved_model = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(os.path.join(export_path, 'saved_model.pb'),
                         'rb') as f:
    saved_model.ParseFromString(f.read())
  (meta_graph,) = [m for m in saved_model.meta_graphs
                   if signatures.SERVE_TAG in m.meta_info_def.tags]
  logs = warmup.requests_for_signatures(meta_graph.signature_def, examples,
                                        instances)
  warmup.write(os.path.join(export_path, warmup.WARMUP_FILE), logs)
  return len(logs)


def _plain_metrics(metrics):
  if not metrics:
    return None
  plain = {}
  for key, value in metrics.items():
    try:
      plain[key] = float(value)
    except (TypeError, ValueError):
      continue
  return plain


def versions_by_exporter(export_dir, exporter):
  """Versions an exporter wrote, ascending, with their metadata."""
  found = []
  for version in rundir.list_versions(export_dir):
    meta = read_metadata(os.path.join(export_dir, str(version)))
    if meta.get('exporter') == exporter:
      found.append((version, meta))
  return found


def garbage_collect(export_dir, exporter, keep):
  """Keeps the newest `keep` versions of one exporter; removes the rest."""
  found = versions_by_exporter(export_dir, exporter)
  for version, _ in found[:max(0, len(found) - keep)]:
    log.info('removing old export %s/%d (%s)', export_dir, version, exporter)
    remove_version(export_dir, version)


# --- exporters for train_and_evaluate -------------------------------------------

class RunDirExporter(tf.estimator.Exporter):
  """Exports into RUN_DIR/export/<version> instead of model_dir/export/NAME.

  Subclasses decide when to export; all versions share one TF Serving base
  path and each exporter garbage collects only its own versions.
  """

  def __init__(self, config, name):
    self._config = config
    self._name = name

  @property
  def name(self):
    return self._name

  def should_export(self, eval_result, is_the_final_export):
    raise NotImplementedError

  def export(self, estimator, export_path, checkpoint_path, eval_result,
             is_the_final_export):
    del export_path  # model_dir/export/NAME: not the TF Serving layout
    if not self.should_export(eval_result, is_the_final_export):
      return None
    path = export_saved_model(self._config, estimator, checkpoint_path,
                              exporter=self._name, metrics=eval_result)
    garbage_collect(self._config.rundir.export, self._name,
                    self._config.export.keep)
    return path


class LatestRunDirExporter(RunDirExporter):
  """Exports after every evaluation; keeps the newest `export.keep`."""

  def __init__(self, config):
    super().__init__(config, 'latest')

  def should_export(self, eval_result, is_the_final_export):
    return True


class FinalRunDirExporter(RunDirExporter):
  """Exports once, after the last evaluation of training."""

  def __init__(self, config):
    super().__init__(config, 'final')

  def should_export(self, eval_result, is_the_final_export):
    return is_the_final_export


class BestRunDirExporter(RunDirExporter):
  """Exports when `export.best_metric` beats every earlier best export.

  The best value so far is read back from the exports' metadata, so a
  restarted training keeps comparing against the real best.
  """

  def __init__(self, config):
    super().__init__(config, 'best')
    self._metric = config.export.best_metric or 'loss'
    self._smaller_is_better = best_is_smaller(config)

  def should_export(self, eval_result, is_the_final_export):
    if self._metric not in eval_result:
      raise ValueError(f'export.best_metric {self._metric!r} is not an eval '
                       f'metric; have {", ".join(sorted(eval_result))}')
    value = float(eval_result[self._metric])
    best = self._best_so_far()
    if best is None:
      return True
    return value < best if self._smaller_is_better else value > best

  def _best_so_far(self):
    values = [meta['metrics'][self._metric] for _, meta in
              versions_by_exporter(self._config.rundir.export, self._name)
              if self._metric in (meta.get('metrics') or {})]
    if not values:
      return None
    return min(values) if self._smaller_is_better else max(values)


def best_is_smaller(config):
  mode = config.export.best_mode
  if mode == 'auto':
    return bool(_SMALLER_IS_BETTER.search(config.export.best_metric or 'loss'))
  return mode == 'min'


_EXPORTERS = {'latest': LatestRunDirExporter, 'best': BestRunDirExporter,
              'final': FinalRunDirExporter}


def make_exporters(config):
  """The EvalSpec exporters named by `export.exporters`, in config order."""
  return [_EXPORTERS[name](config) for name in config.export.exporters]


def export_checkpoint(config, make_estimator, checkpoint_path=None):
  """`estpipe export`: one checkpoint (default: the latest) -> a version.

  `make_estimator(config)` builds the trained model's Estimator; it is
  called once the inputs are known to be there, since it takes seconds.
  """
  rundir.require_preprocessed(config.rundir)
  checkpoint_path = checkpoint_path or tf.train.latest_checkpoint(
      config.rundir.model)
  if not checkpoint_path:
    raise FileNotFoundError(f'no checkpoint in {config.rundir.model}: run '
                            '`estpipe train` first')
  if not tf.io.gfile.exists(checkpoint_path + '.index'):
    raise FileNotFoundError(f'no checkpoint {checkpoint_path}')
  return export_saved_model(config, make_estimator(config), checkpoint_path)
