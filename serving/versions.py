"""Which versions of which models are served, kept in step with the disk.

Each model's base path is polled: integer-named folders holding a finished
SavedModel are candidates (temporary folders, other names and folders without
saved_model.pb are ignored, so half-written exports are never loaded); the
version policy (latest N / all / specific) picks the aspired ones. New
versions are loaded before the served set is swapped in one assignment, so
in-flight requests keep the version they resolved; removed versions are
dropped from the set and freed once their last request finishes.

A version that fails to load (say, copied in slowly: saved_model.pb there,
its variables not yet) is retried, with backoff (`load_retry_seconds`,
doubling up to `load_retry_max_seconds`), and at once when anything in its
folder changes (any file's size, time or count, at any depth); each failure
is logged with its error. While the policy picks the previous version
instead, that one serves. Availability comes first, as TF Serving's
AvailabilityPreservingPolicy: served versions are unloaded only once a
version the policy wants is serving, so while every version the policy
wants still fails to load, the versions being served stay (even if their
folders were deleted); with no version at all left on disk, the model is
unloaded.

The model list itself can change while serving (`ModelManager.reconfigure`,
from a re-read --model_config_file or gRPC HandleReloadConfigRequest): added
models are loaded, removed ones unloaded, and changed version policies and
labels applied, with the same load-then-swap rule.

Both the base paths and a --model_config_file are re-read by one small
poller (a thread waiting on an Event between rounds, so stop() is prompt and
a failed round is logged rather than ending the polling).
"""

import dataclasses
import logging
import os
import threading
import time
from typing import Dict, Optional, Tuple

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from pipeline import fs
from pipeline import rundir
from serving import warmup
from serving.errors import invalid, not_found
from serving.models import ServableVersion, is_complete_export

log = logging.getLogger('estpipe')

AVAILABLE = 'AVAILABLE'
LOADING = 'LOADING'
END = 'END'


@dataclasses.dataclass
class ModelConfig:
  """One served model: where its versions are and which to serve."""
  name: str
  base_path: str
  policy: str = 'latest'  # latest | all | specific
  num_versions: int = 1  # for latest
  versions: Tuple[int, ...] = ()  # for specific
  labels: Dict[str, int] = dataclasses.field(default_factory=dict)

  def aspired(self, candidates):
    """The versions the policy wants, from the available candidates."""
    if self.policy == 'all':
      return set(candidates)
    if self.policy == 'specific':
      return set(candidates) & set(self.versions)
    return set(sorted(candidates)[-self.num_versions:])


def parse_model_config_text(text, where='model_config_file'):
  """ModelConfigs from TF Serving's text-format ModelServerConfig."""
  config = model_server_config_pb2.ModelServerConfig()
  try:
    text_format.Parse(text, config)
  except text_format.ParseError as e:
    raise ValueError(f'{where}: {e}') from None
  return model_configs(config, where)


def model_configs(config, where='model server config'):
  """ModelConfigs from a ModelServerConfig proto; ValueError if invalid."""
  if config.WhichOneof('config') != 'model_config_list':
    raise ValueError(f'{where}: expected a model_config_list')
  models = []
  for i, model in enumerate(config.model_config_list.config):
    at = f'{where}: config[{i}]'
    if not model.name:
      raise ValueError(f'{at}: name is required')
    if not model.base_path:
      raise ValueError(f'{at} ({model.name}): base_path is required')
    if model.model_platform not in ('', 'tensorflow'):
      raise ValueError(f'{at} ({model.name}): model_platform '
                       f'{model.model_platform!r} is not supported; only '
                       'tensorflow SavedModels are served')
    models.append(ModelConfig(
        name=model.name, base_path=os.path.abspath(model.base_path),
        labels=dict(model.version_labels), **_policy(model, at)))
  names = [m.name for m in models]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f'{where}: model names must be unique, repeated: '
                     f'{", ".join(duplicates)}')
  if not models:
    raise ValueError(f'{where}: no models configured')
  return models


def _policy(model, at):
  policy = model.model_version_policy
  which = policy.WhichOneof('policy_choice')
  if which == 'all':
    return {'policy': 'all'}
  if which == 'specific':
    if not policy.specific.versions:
      raise ValueError(f'{at} ({model.name}): specific policy lists no '
                       'versions')
    return {'policy': 'specific', 'versions': tuple(policy.specific.versions)}
  num = policy.latest.num_versions if which == 'latest' else 0
  return {'policy': 'latest', 'num_versions': num or 1}


@dataclasses.dataclass
class VersionStatus:
  state: str
  error: str = ''


class _Model:
  """The served versions of one model and what happened to the others."""

  def __init__(self, config):
    self.config = config  # replaced by reconfigure, never edited
    self.servables = {}  # version -> ServableVersion; replaced, never edited
    self.status = {}  # version -> VersionStatus
    self.failed = {}  # version -> _Failure of its last load
    self.missing_logged = False
    self.removed = False  # taken out of the config: statuses only


class ModelManager:
  """Loads, swaps and unloads model versions; resolves requests to them."""

  def __init__(self, configs, poll_wait_seconds=1.0, on_load=None,
               load_retry_seconds=1.0, load_retry_max_seconds=300.0,
               warmup=True):
    self._models = {c.name: _Model(c) for c in configs}
    self._warmup = warmup
    self._poll_wait = poll_wait_seconds
    self._retry = (load_retry_seconds, load_retry_max_seconds)
    self._on_load = on_load or (lambda servable: None)
    self._lock = threading.Lock()  # guards status dicts and polling
    self._poller = _Poller(self.poll, poll_wait_seconds, 'version-poller',
                           'polling model base paths failed; retrying')

  @property
  def model_names(self):
    return [name for name, model in self._models.items()
            if not model.removed]

  def start(self):
    """Loads what is on disk now, then keeps polling (TF Serving's rules:
    a zero wait polls once, a negative one never)."""
    if self._poll_wait >= 0:
      self.poll()
    if self._poll_wait > 0:
      self._poller.start()

  def stop(self):
    self._poller.stop()

  def poll(self):
    with self._lock:
      for model in self._models.values():
        if not model.removed:
          self._sync(model)

  def reconfigure(self, configs):
    """Serves the models of `configs` from now on, as TF Serving's
    ReloadConfig: added models are loaded (before this returns), removed
    ones unloaded, and changed version policies and labels applied. A model
    whose base path changed is loaded anew, then swapped in."""
    with self._lock:
      models = dict(self._models)
      for config in configs:
        model = models.get(config.name)
        if model is None or model.removed or (
            model.config.base_path != config.base_path):
          if model is not None and not model.removed:
            log.info('model %s: base path is now %s', config.name,
                     config.base_path)
          fresh = _Model(config)
          if model is not None:  # earlier versions' states stay reported
            fresh.status = dict(model.status)
          self._sync(fresh)
          if model is not None:
            self._unload(fresh, set(model.servables) - set(fresh.servables))
          models[config.name] = fresh
          log.info('model %s added', config.name)
        elif model.config != config:
          model.config = config
          self._sync(model)
          log.info('model %s: config updated', config.name)
      wanted = {config.name for config in configs}
      for name, model in models.items():
        if name not in wanted and not model.removed:
          model.removed = True
          self._unload(model, set(model.servables))
          model.servables = {}
          log.info('model %s removed', name)
      self._models = models  # one assignment: requests see old or new

  def _unload(self, model, versions):
    for version in versions:
      model.status[version] = VersionStatus(END)
      log.info('unloaded %s version %d', model.config.name, version)

  def _sync(self, model):
    candidates = self._candidates(model)
    if candidates is None:
      return
    current = model.servables
    new = {}
    waiting = set()  # wanted, but failed to load (now or not yet retried)
    while True:
      aspired = model.config.aspired(candidates)
      failed = False
      for version in sorted(aspired - set(current) - set(new), reverse=True):
        servable = None
        if self._due(model, version, candidates[version]):
          servable = self._load(model, version, candidates[version])
        if servable is None:
          # The policy picks again without it (e.g. the previous latest).
          del candidates[version]
          waiting.add(version)
          failed = True
        else:
          new[version] = servable
      if not failed:
        break
    loaded = {v: current.get(v) or new[v] for v in aspired}
    if waiting and not loaded and current:
      # Availability first: keep serving until a wanted version loads.
      return
    model.servables = loaded  # the swap: one reference assignment
    self._unload(model, set(current) - set(loaded))

  def _candidates(self, model):
    """{version: path} of finished exports, minus ones that failed as is."""
    base = model.config.base_path
    if not fs.isdir(base):
      if not model.missing_logged:
        log.warning('model %s: cannot list base path %s: no such folder',
                    model.config.name, base)
        model.missing_logged = True
      return None
    model.missing_logged = False
    candidates = {}
    for version in rundir.list_versions(base):
      path = os.path.join(base, str(version))
      if is_complete_export(path):
        candidates[version] = path
    for version in set(model.failed) - set(candidates):
      del model.failed[version]  # gone: a new copy starts afresh
    return candidates

  def _due(self, model, version, path):
    """Whether to try loading a version: yes unless it failed before and
    neither its backoff has passed nor anything in its folder changed."""
    failure = model.failed.get(version)
    if failure is None:
      return True
    if time.monotonic() >= failure.retry_at:
      return True
    return _stamp(path) != failure.stamp

  def _load(self, model, version, path):
    name = model.config.name
    failure = model.failed.get(version)
    attempt = failure.attempts + 1 if failure else 1
    stamp = _stamp(path)  # before loading: a change while loading retries
    model.status[version] = VersionStatus(LOADING)
    if failure:
      log.info('retrying %s version %d from %s (attempt %d)', name, version,
               path, attempt)
    else:
      log.info('loading %s version %d from %s', name, version, path)
    try:
      servable = ServableVersion(name, version, path)
      # TF Serving's warmup, before the version is made available.
      servable.warmup_requests = (warmup.replay(servable) if self._warmup
                                  else 0)
      self._on_load(servable)
    except Exception as e:  # pylint: disable=broad-except
      lines = str(e).splitlines()
      message = f'{type(e).__name__}: {lines[0] if lines else ""}'
      first, most = self._retry
      delay = min(first * 2 ** (attempt - 1), most)
      log.error('model %s version %d failed to load (attempt %d): %s; '
                'retrying in %.1fs or when its files change', name, version,
                attempt, message, delay)
      model.failed[version] = _Failure(stamp, attempt,
                                       time.monotonic() + delay)
      model.status[version] = VersionStatus(END, message)
      return None
    model.failed.pop(version, None)
    model.status[version] = VersionStatus(AVAILABLE)
    log.info('serving %s version %d', name, version)
    return servable

  def _model(self, name):
    model = self._models.get(name)
    if model is None:
      raise not_found(f'Servable not found for request: Latest({name})')
    return model

  def resolve(self, name, version=None, label=None):
    """The ServableVersion a request names (latest if unspecified)."""
    model = self._model(name)
    servables = model.servables  # one consistent snapshot
    if label is not None:
      labels = model.config.labels  # likewise
      if label not in labels:
        raise invalid(f'Unrecognized servable version label: {label}')
      version = labels[label]
    if version is None:
      if not servables:
        raise not_found(f'Servable not found for request: Latest({name})')
      return servables[max(servables)]
    servable = servables.get(version)
    if servable is None:
      raise not_found(
          f'Servable not found for request: Specific({name}, {version})')
    return servable

  def statuses(self, name, version=None, label=None):
    """[(version, VersionStatus)] for a model, or one version of it."""
    model = self._model(name)
    if label is not None:
      labels = model.config.labels
      if label not in labels:
        raise invalid(f'Unrecognized servable version label: {label}')
      version = labels[label]
    status = dict(model.status)  # a copy: the poller may be adding to it
    if version is not None:
      if version not in status:
        raise not_found(f'Could not find version {version} of model {name}')
      return [(version, status[version])]
    if not status:
      raise not_found(f'Could not find any versions of model {name}')
    return sorted(status.items(), reverse=True)

  def config(self, name) -> Optional[ModelConfig]:
    return self._model(name).config


class _Poller:
  """Calls `poll` every `seconds` on a thread of its own, from start() to
  stop(). A failed round is logged (`failed`: a log message, with `args`)
  and the next round tries again: one bad moment on disk must not end the
  polling."""

  def __init__(self, poll, seconds, name, failed, *args):
    self._poll = poll
    self._seconds = seconds
    self._name = name
    self._failed = (failed, *args)
    self._stop = threading.Event()
    self._thread = None

  def start(self):
    self._thread = threading.Thread(target=self._loop, name=self._name,
                                    daemon=True)
    self._thread.start()

  def stop(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def _loop(self):
    while not self._stop.wait(self._seconds):
      try:
        self._poll()
      except Exception:  # pylint: disable=broad-except
        log.exception(*self._failed)


class ConfigFilePoller(_Poller):
  """Re-reads a --model_config_file every `seconds` and, when its text
  changed, applies it (ModelManager.reconfigure). A file that cannot be
  read or parsed is logged, with the reason, and the config in force kept."""

  def __init__(self, path, seconds, manager):
    super().__init__(self.check, seconds, 'config-poller',
                     'applying %s failed; keeping the current config', path)
    self.path = path
    self.seconds = seconds
    self.manager = manager
    self._last = self._read()  # the text the server started from

  def _read(self):
    try:
      with open(self.path) as f:
        return f.read()
    except OSError as e:
      return e  # compared like text: logged once until it changes

  def check(self):
    """Applies the file if it changed; True if a new config was applied."""
    text = self._read()
    if text == self._last or (isinstance(text, OSError) and isinstance(
        self._last, OSError) and str(text) == str(self._last)):
      return False
    self._last = text
    if isinstance(text, OSError):
      log.error('cannot read model config file %s: %s; keeping the current '
                'config', self.path, text.strerror or text)
      return False
    try:
      configs = parse_model_config_text(text, self.path)
    except ValueError as e:
      log.error('model config file not applied: %s; keeping the current '
                'config', e)
      return False
    started = time.monotonic()
    self.manager.reconfigure(configs)
    log.info('applied model config file %s (%d models) in %.1fs', self.path,
             len(configs), time.monotonic() - started)
    return True


@dataclasses.dataclass
class _Failure:
  """A version's failed load: its folder's stamp then, the attempts so far
  and when backoff allows the next one (time.monotonic())."""
  stamp: object
  attempts: int
  retry_at: float


def _stamp(path):
  """Changes when anything in an export folder changes, at any depth
  (files added, removed, grown or rewritten), to retry failed loads at once:
  a copy that finishes writing variables/ after saved_model.pb changes no
  top-level time."""
  files = []
  try:
    for folder, _, names in os.walk(path):
      for name in names:
        full = os.path.join(folder, name)
        info = os.stat(full)
        files.append((full, info.st_size, info.st_mtime_ns))
  except OSError:
    return None
  return hash(tuple(sorted(files)))

