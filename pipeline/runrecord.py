"""Run records and atomic outputs in the run directory.

Stages talk through files, so a later stage must never read a half-written
output: every stage writes into a staging folder and publishes by rename, and
its summary JSON (the completeness marker) is written last.
"""

import contextlib
import datetime
import json
import os
import socket
import uuid

from pipeline import fs
from pipeline.rundir import RunDir


def write_json(path, obj):
  """Writes JSON so that readers see the old file or the new one, never half."""
  fs.makedirs(os.path.dirname(fs.abspath(path)))
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  with fs.open_file(tmp, 'w') as f:
    f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + '\n')
  fs.replace(tmp, path)


def read_json(path):
  with fs.open_file(path) as f:
    return json.load(f)


@contextlib.contextmanager
def staging_dir(run_dir, stage):
  """A private folder under RUN_DIR for a stage's outputs before publishing.

  Removed on exit; whatever the stage published by `publish` survives. The
  staging root goes too once no other stage uses it.
  """
  path = new_staging(run_dir, stage)
  try:
    yield path
  finally:
    remove_staging(path)


def new_staging(run_dir, stage, detached=False):
  """Creates RUN_DIR/.staging/STAGE-<id> (for a job that outlives its caller,
  which removes it with `remove_staging` when done).

  The folder records its owner (host, pid), so the next stage to stage
  something removes it if its process died (SIGKILL) without cleaning up:
  see `remove_stale_staging`. A `detached` job's folder belongs to the job,
  not to this process, and is left alone.
  """
  remove_stale_staging(run_dir)
  path = os.path.join(RunDir(run_dir).staging,
                      f'{stage}-{uuid.uuid4().hex[:8]}')
  _make_staging(path)
  owner = {'host': socket.gethostname(), 'pid': os.getpid(),
           'process_start': _process_start(os.getpid()), 'time': now()}
  if detached:
    owner['detached'] = True
  with fs.open_file(RunDir(path).staging_owner, 'w') as f:
    f.write(json.dumps(owner, sort_keys=True) + '\n')
  return path


def remove_stale_staging(run_dir):
  """Removes the staging folders of dead processes on this host; returns them.

  A folder is stale when its owner file names this host and a pid that is
  gone (or reused: the process started at another time). Folders of live
  processes, of other hosts, of detached jobs, and without an owner file
  (whose owner cannot be known) stay.
  """
  root = RunDir(run_dir).staging
  if not fs.isdir(root):
    return []
  removed = []
  for name in fs.listdir(root):
    path = os.path.join(root, name)
    try:
      owner = read_json(RunDir(path).staging_owner)
    except (OSError, ValueError):
      continue
    if not _owner_is_gone(owner):
      continue
    try:
      fs.rmtree(path)
    except OSError:
      continue  # another process cleaned it first
    removed.append(path)
  return removed


def _owner_is_gone(owner):
  if (not isinstance(owner, dict) or owner.get('detached') or
      owner.get('host') != socket.gethostname()):
    return False
  pid = owner.get('pid')
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    pass  # alive, another user's
  started = owner.get('process_start')
  return started is not None and _process_start(pid) not in (None, started)


def _process_start(pid):
  """The process's start time in clock ticks since boot (Linux), or None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
    return int(stat.rsplit(')', 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def remove_staging(path):
  """Removes a staging folder, and the staging root once no stage uses it."""
  fs.rmtree(path)
  fs.rmdir_if_empty(os.path.dirname(path.rstrip('/')))


def _make_staging(path):
  # A stage finishing at the same moment may remove the empty root between
  # makedirs creating it and creating `path` in it: create it again.
  for attempt in range(3):
    try:
      fs.makedirs(path)
      return
    except FileNotFoundError:
      if attempt == 2:
        raise


def publish(src, dst):
  """Moves a finished output into place, replacing an older one."""
  if fs.isdir(dst):
    old = f'{dst}.old-{uuid.uuid4().hex[:8]}'
    fs.replace(dst, old)
    fs.replace(src, dst)
    fs.rmtree(old)
  else:
    fs.replace(src, dst)


def now():
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds')


def append_history(run_dir, stage, status, summary=None):
  """One line per stage run in RUN_DIR/history.jsonl: the run record."""
  fs.makedirs(run_dir)
  line = {'stage': stage, 'status': status, 'time': now(),
          'host': socket.gethostname(), 'pid': os.getpid()}
  if summary:
    line['summary'] = summary
  with fs.open_file(RunDir(run_dir).history, 'a') as f:
    f.write(json.dumps(line, sort_keys=True, default=str) + '\n')


def read_history(run_dir):
  """The lines of RUN_DIR/history.jsonl, oldest first ([] when none).

  A line cut short by a killed process is left out.
  """
  path = RunDir(run_dir).history
  if not fs.exists(path):
    return []
  lines = []
  with fs.open_file(path) as f:
    for line in f:
      try:
        lines.append(json.loads(line))
      except ValueError:
        continue
  return lines


def last_history(run_dir, stage, attempt, statuses):
  """The last history line of `stage` for `attempt` (the summary's
  'attempt') with one of `statuses`, or None."""
  found = None
  for line in read_history(run_dir):
    if (line.get('stage') == stage and line.get('status') in statuses and
        (line.get('summary') or {}).get('attempt') == attempt):
      found = line
  return found
