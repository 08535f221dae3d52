"""A deterministic, census-like synthetic data set with a learnable label.

Used by the out-of-the-box example (no files needed) and by scale benchmarks.
The same seed and row count always give byte-identical files.
"""

import csv
import os

import numpy as np

COLUMNS = ['age', 'hours_per_week', 'capital_gain', 'workclass', 'education',
           'occupation', 'region', 'notes', 'label']
LABEL_VALUES = ['no', 'yes']

_WORKCLASS = ['private', 'self_emp', 'government', 'unemployed']
_EDUCATION = ['primary', 'high_school', 'some_college', 'bachelors',
              'masters', 'doctorate']
_OCCUPATIONS = ['clerical', 'sales', 'craft', 'service', 'tech', 'managerial',
                'professional', 'farming', 'transport', 'protective']
_REGIONS = [f'region_{i:02d}' for i in range(40)]
_NEUTRAL_WORDS = ['works', 'with', 'team', 'daily', 'office', 'remote',
                  'shift', 'weekend', 'projects', 'customers', 'travel',
                  'local', 'store', 'field', 'night']
_POSITIVE_WORDS = ['senior', 'lead', 'director', 'principal', 'expert']
_NEGATIVE_WORDS = ['junior', 'intern', 'trainee', 'assistant', 'temporary']


def generate(num_rows, seed=0):
  """Returns the columns of `num_rows` synthetic rows as a dict of arrays."""
  rng = np.random.RandomState(seed)
  age = rng.randint(17, 80, size=num_rows)
  hours = np.round(rng.gamma(9.0, 4.5, size=num_rows).clip(1, 99), 1)
  has_gain = rng.rand(num_rows) < 0.1
  gain = np.where(has_gain, np.round(rng.lognormal(8, 1.2, num_rows)), 0)
  workclass = rng.choice(len(_WORKCLASS), num_rows, p=[.7, .12, .15, .03])
  education = rng.choice(len(_EDUCATION), num_rows,
                         p=[.1, .35, .25, .18, .09, .03])
  occupation = rng.randint(0, len(_OCCUPATIONS), num_rows)
  region = rng.randint(0, len(_REGIONS), num_rows)
  seniority = rng.randint(-1, 2, num_rows)  # -1 junior, 0 neutral, 1 senior

  logit = (-4.2 + 0.045 * np.minimum(age, 60) + 0.03 * hours +
           0.55 * education + 1.5 * has_gain + 0.9 * seniority +
           np.where(workclass == 3, -2.0, 0.0) +
           np.where(occupation >= 5, 0.8, 0.0) +
           0.3 * np.sin(region))
  positive = rng.rand(num_rows) < 1.0 / (1.0 + np.exp(-logit))

  notes = [_note(rng, s) for s in seniority]
  # Some fields are missing, as in real data: the pipeline must impute them.
  missing_hours = rng.rand(num_rows) < 0.02
  missing_occupation = rng.rand(num_rows) < 0.03
  return {
      'age': [str(a) for a in age],
      'hours_per_week': ['' if m else f'{h:.1f}' for h, m in
                         zip(hours, missing_hours)],
      'capital_gain': [str(int(g)) for g in gain],
      'workclass': [_WORKCLASS[i] for i in workclass],
      'education': [_EDUCATION[i] for i in education],
      'occupation': ['' if m else _OCCUPATIONS[i] for i, m in
                     zip(occupation, missing_occupation)],
      'region': [_REGIONS[i] for i in region],
      'notes': notes,
      'label': [LABEL_VALUES[int(p)] for p in positive],
  }


def _note(rng, seniority):
  words = list(rng.choice(_NEUTRAL_WORDS, size=rng.randint(2, 6)))
  if seniority > 0:
    words.append(_POSITIVE_WORDS[rng.randint(len(_POSITIVE_WORDS))])
  elif seniority < 0:
    words.append(_NEGATIVE_WORDS[rng.randint(len(_NEGATIVE_WORDS))])
  rng.shuffle(words)
  return ' '.join(words)


def write_csv(out_dir, num_rows, seed=0, shards=1, chunk_rows=100_000):
  """Writes `shards` CSV files with a header; returns their paths.

  Rows are generated in chunks so memory stays flat for any row count.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f'data-{i:05d}-of-{shards:05d}.csv')
           for i in range(shards)]
  files = [open(p + '.tmp', 'w', newline='') for p in paths]
  try:
    writers = [csv.writer(f) for f in files]
    for w in writers:
      w.writerow(COLUMNS)
    row = 0
    chunk_index = 0
    while row < num_rows:
      n = min(chunk_rows, num_rows - row)
      columns = generate(n, seed=seed * 100_003 + chunk_index)
      for i, values in enumerate(zip(*(columns[c] for c in COLUMNS))):
        writers[(row + i) % shards].writerow(values)
      row += n
      chunk_index += 1
  finally:
    for f in files:
      f.close()
  for p in paths:
    os.replace(p + '.tmp', p)
  return paths
