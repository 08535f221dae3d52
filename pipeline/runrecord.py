"""Run records and atomic outputs in the run directory.

Stages talk through files, so a later stage must never read a half-written
output: every stage writes into a staging folder and publishes by rename, and
its summary JSON (the completeness marker) is written last.
"""

import contextlib
import datetime
import json
import os
import shutil
import socket
import uuid

_STAGING = '.staging'


def write_json(path, obj):
  """Writes JSON so that readers see the old file or the new one, never half."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
    f.write('\n')
  os.replace(tmp, path)


def read_json(path):
  with open(path) as f:
    return json.load(f)


@contextlib.contextmanager
def staging_dir(run_dir, stage):
  """A private folder under RUN_DIR for a stage's outputs before publishing.

  Removed on exit; whatever the stage published by `publish` survives. The
  staging root goes too once no other stage uses it.
  """
  root = os.path.join(run_dir, _STAGING)
  path = os.path.join(root, f'{stage}-{uuid.uuid4().hex[:8]}')
  _make_staging(path)
  try:
    yield path
  finally:
    shutil.rmtree(path, ignore_errors=True)
    try:
      os.rmdir(root)
    except OSError:  # another stage is staging, or it is already gone
      pass


def _make_staging(path):
  # A stage finishing at the same moment may remove the empty root between
  # makedirs creating it and creating `path` in it: create it again.
  for attempt in range(3):
    try:
      os.makedirs(path)
      return
    except FileNotFoundError:
      if attempt == 2:
        raise


def publish(src, dst):
  """Moves a finished output into place, replacing an older one."""
  if os.path.isdir(dst):
    old = f'{dst}.old-{uuid.uuid4().hex[:8]}'
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(src, dst)


def now():
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds')


def append_history(run_dir, stage, status, summary=None):
  """One line per stage run in RUN_DIR/history.jsonl: the run record."""
  os.makedirs(run_dir, exist_ok=True)
  line = {'stage': stage, 'status': status, 'time': now(),
          'host': socket.gethostname(), 'pid': os.getpid()}
  if summary:
    line['summary'] = summary
  with open(os.path.join(run_dir, 'history.jsonl'), 'a') as f:
    f.write(json.dumps(line, sort_keys=True, default=str) + '\n')
