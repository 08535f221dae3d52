"""`estpipe verify-export`: a training/serving skew check on the eval split.

The same raw eval rows go two ways:
  serving:  raw tf.Example (or raw-feature tensors) -> the exported
            SavedModel's signatures (its own parser, transform and weights);
  training: the raw row parser -> the run's tf.Transform output -> the
            Estimator restored from the export's checkpoint.
Every prediction must agree to 1e-5; the first row that does not is reported
with its file, line, raw text and both answers.
"""

import logging

import numpy as np
import tensorflow as tf

from pipeline import fs
from pipeline import rundir
from pipeline import signatures
from preprocessing import rows as rows_lib
from serving import export
from serving import raw_examples

log = logging.getLogger('estpipe')

RTOL = 1e-5
ATOL = 1e-5
# Outputs of the classify / regress signatures and the prediction keys they
# equal in a canned Estimator's predictions.
_CLASSIFY_ALIASES = signatures.output_aliases(signatures.CLASSIFY_METHOD)
_REGRESS_ALIASES = signatures.output_aliases(signatures.REGRESS_METHOD)


class SkewError(Exception):
  """The export answers differently from the Estimator it came from."""


class Row:
  """One raw eval row: where it came from and its typed values."""

  def __init__(self, location, raw, values):
    self.location = location
    self.raw = raw
    self.values = values


def read_eval_rows(config, parser, max_rows=None):
  """Good raw eval rows (a list of Row) and the number rejected."""
  rows, rejected = [], 0
  for location, raw, result in raw_examples.eval_rows(config, parser,
                                                      max_rows):
    if isinstance(result, rows_lib.Reject):
      rejected += 1
    else:
      rows.append(Row(location, raw, result))
  if not rows:
    raise ValueError('no usable raw eval rows to verify with')
  return rows, rejected


# --- the training side --------------------------------------------------------

def _raw_sparse(parser, rows):
  """Typed rows -> the VarLen SparseTensors preprocessing feeds tf.Transform."""
  from preprocessing import schema  # pylint: disable=g-import-not-at-top
  spec = schema.serving_feature_spec(parser.config)
  tensors = {}
  for i, column in enumerate(parser.columns):
    present = [r for r, row in enumerate(rows) if row.values[i] is not None]
    values = [rows[r].values[i] for r in present]
    tensors[column.name] = tf.SparseTensor(
        indices=np.array([[r, 0] for r in present], np.int64).reshape(-1, 2),
        values=tf.constant(values, dtype=spec[column.name].dtype,
                           shape=[len(values)]),
        dense_shape=[len(rows), 1])
  return tensors


def transformed_features(config, parser, rows, batch_size):
  """The run's transform applied to the rows: a list of feature batches."""
  import tensorflow_transform as tft  # pylint: disable=g-import-not-at-top
  layer = tft.TFTransformOutput(config.rundir.transform).transform_features_layer()
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    out = layer(_raw_sparse(parser, chunk))
    batches.append({k: v for k, v in out.items() if k != config.label.name})
  return batches


# --- the serving side ---------------------------------------------------------

def _signature_inputs(fn, name, parser, rows):
  if signatures.is_raw(name):
    return raw_examples.raw_tensors(
        parser, [raw_examples.to_raw_instance(parser, r.values) for r in rows])
  # The one serialized tf.Example input: signatures.EXAMPLES_INPUT or
  # CLASSIFY_INPUTS / REGRESS_INPUTS.
  (key,) = fn.structured_input_signature[1]
  return {key: tf.constant([raw_examples.to_example(parser, r.values)
                            for r in rows])}


def signatures_to_check(loaded):
  """The serving signatures of an export that take raw data."""
  names = set(loaded.signatures)
  wanted = {signatures.predict_signature(names),
            signatures.raw_signature(names)}
  if not wanted <= names:
    raise SkewError(f'export lacks the {" or ".join(sorted(wanted - names))} '
                    f'signature (has: {", ".join(sorted(names))})')
  return sorted(names & (wanted | {signatures.DEFAULT_SIGNATURE,
                                   signatures.CLASSIFY_SIGNATURE,
                                   signatures.REGRESS_SIGNATURE}))


def signature_outputs(loaded, name, parser, rows, batch_size):
  """{output: array} of one signature over all rows, in row order."""
  fn = loaded.signatures[name]
  outputs = {}
  for start in range(0, len(rows), batch_size):
    result = fn(**_signature_inputs(fn, name, parser,
                                    rows[start:start + batch_size]))
    for key, value in result.items():
      outputs.setdefault(key, []).append(value.numpy())
  return {k: np.concatenate(v) for k, v in outputs.items()}


# --- comparing -------------------------------------------------------------------

def _first_difference(got, expected):
  """Index of the first row where got != expected, or None; and max diff."""
  got = got.reshape(len(got), -1)
  expected = expected.reshape(len(expected), -1)
  if got.shape != expected.shape:
    return 0, float('inf')
  if got.dtype.kind in 'SUO':
    bad = np.any(got != expected, axis=1)
    diff = 0.0 if not bad.any() else float('inf')
  else:
    got = got.astype(np.float64)
    expected = expected.astype(np.float64)
    bad = np.any(~np.isclose(got, expected, rtol=RTOL, atol=ATOL), axis=1)
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
  rows = np.flatnonzero(bad)
  return (int(rows[0]) if len(rows) else None), diff


def compare(name, got, expected, rows):
  """Checks one signature's outputs; returns {output: max |diff|}."""
  diffs = {}
  aliases = _aliases(got)
  for key, values in got.items():
    targets = aliases.get(key, (key,))
    target = next((t for t in targets if t in expected), None)
    if target is None:
      continue
    index, diff = _first_difference(values, expected[target])
    if index is not None:
      row = rows[index]
      raise SkewError(
          f'training/serving skew at eval row {index} ({row.location}):\n'
          f'  raw: {rows_lib.raw_for_json(row.raw)[:500]}\n'
          f'  signature {name!r} output {key!r}: export gave '
          f'{_show(values[index])}, the Estimator on the transformed row gave '
          f'{_show(expected[target][index])} (tolerance {RTOL:g})')
    diffs[key] = diff
  if not diffs:
    raise SkewError(f'signature {name!r} has no output to compare with the '
                    f'Estimator\'s predictions ({", ".join(sorted(got))} vs '
                    f'{", ".join(sorted(expected))})')
  return diffs


def _aliases(outputs):
  """Which prediction keys a signature's outputs stand for."""
  keys = set(outputs)
  if keys and keys <= set(_CLASSIFY_ALIASES):
    return _CLASSIFY_ALIASES
  if keys == set(_REGRESS_ALIASES):
    return _REGRESS_ALIASES
  return {}


def _show(value):
  value = np.asarray(value)
  if value.dtype.kind == 'S':
    value = value.astype(str)
  return np.array2string(value.reshape(-1), precision=7, separator=', ')


def checkpoint_of(config, path):
  """The checkpoint an export was made from (its metadata), which must exist."""
  checkpoint = export.read_metadata(path).get('checkpoint')
  if not checkpoint:
    raise ValueError(f'{path} has no {export.METADATA_FILE}: not exported by '
                     'estpipe, so its checkpoint is unknown')
  if not tf.io.gfile.exists(checkpoint + '.index'):
    raise ValueError(f'checkpoint {checkpoint} of export {path} no longer '
                     'exists (train.keep_checkpoint_max removed it?)')
  return checkpoint


def verify_export(config, model_predictions, path=None, max_rows=None,
                  batch_size=1024):
  """Runs the skew check on one export (default: the newest); returns a summary.

  `model_predictions(config, checkpoint, batches)` answers the trained
  model's predictions on transformed batches ({key: array}); the command
  hands over the trainer's, so this module needs no trainer. Raises
  SkewError naming the first differing row.
  """
  path = path or rundir.version_dir(config.rundir.export)
  checkpoint = checkpoint_of(config, path)
  # Rows without a feature the export requires are skipped as rejects.
  parser = raw_examples.row_parser(
      config, export.exported_required_features(path))
  rows, rejected = read_eval_rows(config, parser, max_rows)
  log.info('verifying %s on %d raw eval rows (%d rejected rows skipped)',
           path, len(rows), rejected)
  expected = model_predictions(
      config, checkpoint,
      transformed_features(config, parser, rows, batch_size))
  loaded = tf.saved_model.load(path)
  checked = {}
  for name in signatures_to_check(loaded):
    got = signature_outputs(loaded, name, parser, rows, batch_size)
    checked[name] = compare(name, got, expected, rows)
    log.info('signature %s matches on %d rows (max |diff| %.3g)', name,
             len(rows), max(checked[name].values()))
  return {'export': fs.abspath(path), 'checkpoint': checkpoint,
          'rows': len(rows), 'rejected': rejected,
          'max_abs_diff': checked}
