"""`estpipe run`: stage declarations, fingerprints, skipping and run.json.

Each stage package declares its stage when it registers its runner
(`pipeline/args.py` `register_stage`): the config sections its outputs depend
on, the files it reads, and how to tell that its outputs are complete. From
those, this module decides per stage whether a re-run may skip it, and keeps
the record of the run in RUN_DIR/run.json. It never imports a stage package:
the declarations bring what is stage-specific.

A stage's fingerprint hashes its config sections, the fingerprint of the
stage before it and its input files, so a change anywhere upstream reaches
every later stage. A stage is skipped when the previous run recorded it done
with the same fingerprint and its outputs are still complete.
"""

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import time
import traceback
from typing import Callable, Optional, Tuple

from pipeline import fs
from pipeline import runrecord
from pipeline.errors import ConfigError, UserError

log = logging.getLogger('estpipe')

SUCCEEDED, SKIPPED, FAILED = 'succeeded', 'skipped', 'failed'
RUNNING, PENDING = 'running', 'pending'
# Files up to this size are fingerprinted by content, larger ones by size
# and modification time (hashing them would cost more than a stage).
HASH_LIMIT = 64 << 20
# Distributions whose versions the record keeps: they decide the outputs.
LIBRARIES = ('tensorflow', 'tensorflow-estimator', 'tensorflow-transform',
             'tfx-bsl', 'apache-beam', 'estpipe')


@dataclasses.dataclass
class Stage:
  """What `estpipe run` knows of one stage.

  run(config, beam_args, verbose) does the stage's work, as its own command
  does. complete(config) answers the stage's outputs (a JSON-able dict) when
  they are all there, else None; an `export_version` or `metrics` key in them
  is lifted into the top of run.json. inputs(config) lists the files the
  stage reads. reset(config) makes the stage start afresh (when forced, or
  when the stage before it now has other outputs than it last ran on).
  With `current`, complete outputs are enough to skip whatever else changed
  (they are a function of upstream outputs that the check compares with);
  current(outputs) says so in the skip line.
  """
  name: str
  run: Callable
  sections: Tuple[str, ...] = ()
  complete: Optional[Callable] = None
  inputs: Optional[Callable] = None
  reset: Optional[Callable] = None
  current: Optional[Callable] = None
  beam: bool = False


# --- fingerprints ----------------------------------------------------------------

def file_fingerprint(path):
  """Path, size, modification time and (below HASH_LIMIT) content hash."""
  size, mtime = fs.stat(path)
  record = {'path': path, 'size': size, 'mtime': _iso(mtime)}
  if size <= HASH_LIMIT:
    record['sha256'] = fs.sha256(path)
  return record


def _content_key(record):
  # A file's content decides, where it was hashed: touching it changes nothing.
  return record.get('sha256') or [record['size'], record['mtime']]


def stage_fingerprint(stage, config_dict, upstream, inputs):
  payload = {'sections': {s: config_dict[s] for s in stage.sections},
             'upstream': upstream,
             'inputs': [[r['path'], _content_key(r)] for r in inputs]}
  text = json.dumps(payload, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the decision ------------------------------------------------------------------

def skip_reason(stage, outputs, fingerprint, previous, forced, redo):
  """Why the stage may be skipped, or None when it must run.

  forced: --force names this stage. redo: a stage before it ran in this run
  or was forced; then only outputs that are current by themselves count.
  """
  if forced or outputs is None:
    return None
  if stage.current:
    return stage.current(outputs)
  if redo or not previous:
    return None
  if previous.get('status') not in (SUCCEEDED, SKIPPED):
    return None
  if previous.get('fingerprint') != fingerprint:
    return None
  return 'unchanged; outputs complete'


def must_start_afresh(forced, previous, upstream):
  """Forced (or after a forced stage), or the stage before it now has other
  outputs than the ones this stage last ran on."""
  return forced or bool(previous and previous.get('upstream') != upstream)


# --- the run -----------------------------------------------------------------------

class Run:
  """One `estpipe run`: decides, runs and records each stage in order."""

  def __init__(self, config, stages, beam_args=(), verbose=False, force=None,
               command=None):
    self.config = config
    self.stages = list(stages)
    self.beam_args = list(beam_args)
    self.verbose = verbose
    names = [s.name for s in self.stages]
    if force is not None and force not in names:
      raise UserError(f'--force {force}: not a stage of this run (stages: '
                      f'{", ".join(names)})')
    self.forced = names.index(force) if force else len(names)
    self.layout = config.rundir
    self.previous = previous_stages(self.layout.run_record)
    self.record = {
        'status': RUNNING, 'started': runrecord.now(), 'command': command,
        'config': config.to_dict(), 'libraries': library_versions(),
        'runner': runner_options(self.beam_args), 'inputs': [],
        'stages': [self._pending(s.name) for s in stages]}

  def _pending(self, name):
    # A stage this run does not reach keeps what is known of its outputs.
    entry = {'name': name, 'status': PENDING}
    if name in self.previous:
      entry['previous'] = self.previous[name]
    return entry

  def run(self):
    fs.makedirs(self.config.run_dir)
    self._save()
    config_dict = self.config.to_dict()
    upstream, ran = None, False
    for index, stage in enumerate(self.stages):
      entry = self.record['stages'][index]
      upstream = self._run_stage(index, entry, config_dict, upstream, ran)
      ran = ran or entry['status'] == SUCCEEDED
    self._finish(SUCCEEDED)
    return self.record

  def _run_stage(self, index, entry, config_dict, upstream, ran):
    """Skips or runs one stage; returns its fingerprint.

    ran: a stage before it ran in this run.
    """
    stage = self.stages[index]
    previous = self.previous.get(stage.name)
    entry.pop('previous', None)
    entry.update(status=RUNNING, start=runrecord.now(), upstream=upstream)
    started = time.time()
    try:
      entry['fingerprint'], outputs = self._check(stage, config_dict, upstream)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(stage, entry, e, started)
      raise UserError(f'stage {stage.name} failed: {one_line(e)}') from None
    reason = skip_reason(stage, outputs, entry['fingerprint'], previous,
                         index == self.forced, ran or index > self.forced)
    if reason:
      self._skipped(stage, entry, previous, outputs, reason, started)
    else:
      self._run_logged(stage, entry, index >= self.forced, previous, started)
    return entry['fingerprint']

  def _run_logged(self, stage, entry, forced, previous, started):
    """Runs a stage with its log in RUN_DIR/logs; records how it ended."""
    log_path = entry['log'] = self.layout.stage_log(stage.name)
    self._save()
    with StageLog(log_path) as stage_log:
      try:
        self._execute(stage, entry, forced, previous)
      except KeyboardInterrupt as e:
        stage_log.add_traceback()
        self._failed(stage, entry, e, started)
        raise
      except Exception as e:  # pylint: disable=broad-except
        stage_log.add_traceback()
        self._failed(stage, entry, e, started)
        raise UserError(f'stage {stage.name} failed: {one_line(e)} (log: '
                        f'{log_path})') from None
    entry.update(status=SUCCEEDED, end=runrecord.now(),
                 duration_s=round(time.time() - started, 2),
                 outputs=(stage.complete(self.config) if stage.complete
                          else None) or {})
    self._save()
    log.info('=== %s: succeeded in %.1f s', stage.name, entry['duration_s'])

  def _check(self, stage, config_dict, upstream):
    """(fingerprint, outputs when complete else None) of a stage now."""
    inputs = [file_fingerprint(p) for p in
              (stage.inputs(self.config) if stage.inputs else ())]
    self._add_inputs(inputs)
    outputs = stage.complete(self.config) if stage.complete else None
    return stage_fingerprint(stage, config_dict, upstream, inputs), outputs

  def _execute(self, stage, entry, forced, previous):
    if stage.reset and must_start_afresh(forced, previous, entry['upstream']):
      why = 'forced' if forced else 'the stage before it changed'
      log.info('=== %s: starting afresh (%s)', stage.name, why)
      entry['started_afresh'] = True
      stage.reset(self.config)
    else:
      log.info('=== %s', stage.name)
    stage.run(self.config, self.beam_args if stage.beam else (), self.verbose)

  def _skipped(self, stage, entry, previous, outputs, reason, started):
    entry.update(status=SKIPPED, reason=reason, outputs=outputs,
                 end=runrecord.now(),
                 duration_s=round(time.time() - started, 2))
    if previous and previous.get('log'):
      entry['log'] = previous['log']  # the log of the run that made them
    self._save()
    log.info('=== %s: skipped (%s)', stage.name, reason)

  def _failed(self, stage, entry, error, started):
    entry.update(status=FAILED, end=runrecord.now(), error=one_line(error),
                 duration_s=round(time.time() - started, 2))
    self.record['failed_stage'] = stage.name
    self._finish(FAILED)

  def _add_inputs(self, inputs):
    known = {r['path'] for r in self.record['inputs']}
    self.record['inputs'].extend(r for r in inputs if r['path'] not in known)

  def _finish(self, status):
    self.record.update(status=status, ended=runrecord.now())
    for entry in reversed(self.record['stages']):
      outputs = entry.get('outputs') or {}
      for key in ('metrics', 'export_version'):
        if key in outputs and key not in self.record:
          self.record[key] = outputs[key]
    self._save()

  def _save(self):
    # After every change, so a killed run leaves a readable record.
    runrecord.write_json(self.layout.run_record, self.record)


def previous_stages(path):
  """{stage: its latest entry} from an earlier run.json ({} when none)."""
  if not fs.exists(path):
    return {}
  try:
    entries = runrecord.read_json(path).get('stages', [])
    latest = {s['name']: (s.get('previous') if s.get('status') == PENDING
                          else s) for s in entries}
  except (ValueError, KeyError, TypeError, AttributeError):
    return {}
  return {name: entry for name, entry in latest.items() if entry}


def library_versions():
  versions = {}
  for name in LIBRARIES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def runner_options(beam_args):
  """The Beam runner and every flag given for it."""
  runner = 'DirectRunner'
  for i, arg in enumerate(beam_args):
    if arg.startswith('--runner='):
      runner = arg.split('=', 1)[1]
    elif arg == '--runner' and i + 1 < len(beam_args):
      runner = beam_args[i + 1]
  return {'runner': runner, 'beam_args': list(beam_args)}


def one_line(error):
  """The cause of a failure in one line: its message's first line."""
  if isinstance(error, KeyboardInterrupt):
    return 'interrupted'
  lines = str(error).strip().splitlines()
  first = lines[0] if lines else ''
  if isinstance(error, (UserError, ConfigError)) and first:
    return first
  return f'{type(error).__name__}: {first}' if first else type(error).__name__


def _iso(seconds):
  return datetime.datetime.fromtimestamp(
      seconds, datetime.timezone.utc).isoformat(timespec='seconds')


class StageLog:
  """Copies every log line of a stage into its log file while it runs.

  The console keeps its progress lines; the file also gets the traceback of
  a failure, which the one-line error points at. Remote run directories get
  the file when the stage ends.
  """

  def __init__(self, path):
    self.path = path
    self._remote = fs.is_remote(path)
    if self._remote:
      fd, self._local = tempfile.mkstemp(suffix='.log')
      os.close(fd)
    else:
      self._local = path

  def __enter__(self):
    if not self._remote:
      fs.makedirs(os.path.dirname(self.path))
    self._handler = logging.FileHandler(self._local, mode='w')
    self._handler.setFormatter(logging.Formatter(
        '%(asctime)s %(levelname)s %(message)s', '%H:%M:%S'))
    logging.getLogger().addHandler(self._handler)
    return self

  def add_traceback(self):
    self._handler.flush()
    with open(self._local, 'a') as f:
      traceback.print_exc(file=f)

  def __exit__(self, *exc):
    logging.getLogger().removeHandler(self._handler)
    self._handler.close()
    if self._remote:
      with open(self._local) as src, fs.open_file(self.path, 'w') as dst:
        dst.write(src.read())
      os.remove(self._local)
    return False
