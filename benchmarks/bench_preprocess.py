"""Preprocessing speed and memory, as ratios against a reference in the same run.

The reference is the approach of tf.Transform's own census example (CSV lines
decoded by BeamRecordCsvTFXIO, scale_to_0_1 on numeric columns,
compute_and_apply_vocabulary on categorical ones, AnalyzeAndTransformDataset
on train, TransformDataset on test, TFRecords out), on the DirectRunner in
process. Each measurement runs in its own process, so peak memory (max RSS)
is that job's alone.

    python benchmarks/bench_preprocess.py                 # census + 50k, 500k, 2M
    python benchmarks/bench_preprocess.py --sizes 50000   # quicker
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CENSUS = os.path.join(ROOT, '..', 'shared', 'data', 'census')

CENSUS_COLUMNS = [
    'age', 'workclass', 'fnlwgt', 'education', 'education-num',
    'marital-status', 'occupation', 'relationship', 'race', 'sex',
    'capital-gain', 'capital-loss', 'hours-per-week', 'native-country',
    'income']
CENSUS_NUMERIC = ['age', 'fnlwgt', 'education-num', 'capital-gain',
                  'capital-loss', 'hours-per-week']
CENSUS_CATEGORICAL = ['workclass', 'education', 'marital-status',
                      'occupation', 'relationship', 'race', 'sex',
                      'native-country']


def reference_job(out_dir):
  """The tf.Transform census example's pipeline shape, written here."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_transform as tft  # pylint: disable=g-import-not-at-top
  import tensorflow_transform.beam as tft_beam  # pylint: disable=g-import-not-at-top
  from tensorflow_transform.tf_metadata import schema_utils  # pylint: disable=g-import-not-at-top
  from tfx_bsl.coders import example_coder  # pylint: disable=g-import-not-at-top
  from tfx_bsl.public import tfxio  # pylint: disable=g-import-not-at-top

  spec = {c: tf.io.FixedLenFeature([], tf.string) for c in
          CENSUS_CATEGORICAL + ['income']}
  spec.update({c: tf.io.FixedLenFeature([], tf.float32)
               for c in CENSUS_NUMERIC})
  schema = schema_utils.schema_from_feature_spec(spec)

  def preprocessing_fn(inputs):
    outputs = {c: tft.scale_to_0_1(inputs[c]) for c in CENSUS_NUMERIC}
    for c in CENSUS_CATEGORICAL:
      outputs[c] = tft.compute_and_apply_vocabulary(
          tf.strings.strip(inputs[c]), vocab_filename=c)
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(['<=50K', '>50K']), tf.constant([0, 1], tf.int64)), -1)
    outputs['income'] = table.lookup(inputs['income'])
    return outputs

  csv = tfxio.BeamRecordCsvTFXIO(physical_format='text',
                                 column_names=CENSUS_COLUMNS, schema=schema)
  with beam.Pipeline() as p, tft_beam.Context(
      temp_dir=os.path.join(out_dir, 'tmp')):
    def read(name, path):
      return (p | f'Read{name}' >> beam.io.ReadFromText(
          path, coder=beam.coders.BytesCoder())
              | f'Drop{name}Blank' >> beam.Filter(bool)
              | f'Decode{name}' >> csv.BeamSource())
    train = read('Train', os.path.join(CENSUS, 'adult.train.csv'))
    test = read('Test', os.path.join(CENSUS, 'adult.eval.csv'))
    (out_train, _), transform_fn = (
        (train, csv.TensorAdapterConfig())
        | tft_beam.AnalyzeAndTransformDataset(preprocessing_fn,
                                              output_record_batches=True))
    out_test, _ = (((test, csv.TensorAdapterConfig()), transform_fn)
                   | tft_beam.TransformDataset(output_record_batches=True))
    for name, data in (('train', out_train), ('test', out_test)):
      _ = (data
           | f'Encode{name}' >> beam.FlatMapTuple(
               lambda batch, _: example_coder.RecordBatchToExamples(batch))
           | f'Write{name}' >> beam.io.WriteToTFRecord(
               os.path.join(out_dir, name), file_name_suffix='.gz'))
    _ = transform_fn | tft_beam.WriteTransformFn(
        os.path.join(out_dir, 'transform'))


def estpipe_job(config_path, run_dir, overrides, beam_args):
  from pipeline.config import load_config  # pylint: disable=g-import-not-at-top
  from preprocessing import run  # pylint: disable=g-import-not-at-top
  config = load_config(config_path, [f'run_dir={run_dir}', *overrides])
  summary = run.preprocess(config, beam_args)
  return sum(s['written'] for s in summary['splits'].values())


def _child(args):
  """Runs one job in this (fresh) process and prints its figures."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow_transform  # pylint: disable=g-import-not-at-top,unused-import
  out = tempfile.mkdtemp(prefix='bench-')
  start = time.time()
  if args.job == 'reference':
    reference_job(out)
    rows = 32561 + 16278
  else:
    rows = estpipe_job(args.config, out, args.override, args.beam_arg)
  seconds = time.time() - start
  print(json.dumps({'rows': rows, 'seconds': round(seconds, 2),
                    'peak_rss_mb': round(resource.getrusage(
                        resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def measure(job, config=None, overrides=(), beam_args=()):
  cmd = [sys.executable, __file__, '--child', job]
  if config:
    cmd += ['--config', config]
  cmd += [f'--override={o}' for o in overrides]
  cmd += [f'--beam_arg={a}' for a in beam_args]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f'{job} failed:\n{proc.stderr[-3000:]}')
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result['rows_per_second'] = round(result['rows'] / result['seconds'])
  print(job, config or '', ' '.join(beam_args), result, flush=True)
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--child')
  parser.add_argument('--config')
  parser.add_argument('--override', action='append', default=[])
  parser.add_argument('--beam_arg', action='append', default=[])
  parser.add_argument('--sizes', default='50000,500000,2000000')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks',
                                                    'results'))
  args = parser.parse_args()
  if args.child:
    args.job = args.child
    return _child(args)

  results = {'machine': f'{os.cpu_count()} cores'}
  census = os.path.join(ROOT, 'examples', 'census.yaml')
  if os.path.isdir(CENSUS):
    reference = measure('reference')
    same_work = measure('estpipe', os.path.join(
        ROOT, 'benchmarks', 'census_like_reference.yaml'))
    full = measure('estpipe', census)
    results['census'] = {
        'reference': reference,
        'estpipe_same_transforms': same_work,
        'estpipe_examples_census_yaml': full,
        'time_ratio_same_transforms': round(
            same_work['seconds'] / reference['seconds'], 3),
        'time_ratio_examples_census_yaml': round(
            full['seconds'] / reference['seconds'], 3)}
  from pipeline import synthetic  # pylint: disable=g-import-not-at-top
  results['synthetic'] = []
  data_root = tempfile.mkdtemp(prefix='bench-data-')
  for size in [int(s) for s in args.sizes.split(',') if s]:
    data = os.path.join(data_root, str(size))
    synthetic.write_csv(data, size, seed=0, shards=4)
    result = measure('estpipe', os.path.join(ROOT, 'examples',
                                             'synthetic.yaml'),
                     [f'data.train={data}/data-*.csv'])
    result['size'] = size
    results['synthetic'].append(result)
  base = results['synthetic'][0] if results['synthetic'] else None
  for r in results['synthetic']:
    r['time_per_row_vs_smallest'] = round(
        (r['seconds'] / r['rows']) / (base['seconds'] / base['rows']), 3)
    r['peak_rss_vs_smallest'] = round(r['peak_rss_mb'] / base['peak_rss_mb'],
                                      3)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'preprocess.json')
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))
  print('wrote', path)


if __name__ == '__main__':
  main()
