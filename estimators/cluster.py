"""`estpipe cluster`: a local cluster of `estpipe train` processes.

Every task of a TF_CONFIG cluster (one chief, N workers, M ps) runs the same
`estpipe train CONFIG`, and so does an evaluator beside them: in a
distributed train_and_evaluate only the evaluator evaluates and exports.
This module is the one home of launching such a cluster: it picks free
127.0.0.1 ports, builds each task's TF_CONFIG, starts the tasks, streams
their output line by line prefixed with the task's name, and stops them all
when the chief and the evaluator are done (ps tasks never exit on their
own), when a task fails, on SIGINT/SIGTERM, or on a timeout.

No TensorFlow here: the launcher only starts and watches processes. Each
task is its own process group, stopped as a whole, and is killed by the
kernel if the launcher dies (PR_SET_PDEATHSIG), so none is left behind.
"""

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from pipeline.errors import UserError

log = logging.getLogger('estpipe')

HOST = '127.0.0.1'
# TF_CONFIG's job names, in the order tasks start and are listed.
JOBS = ('chief', 'worker', 'ps')
EVALUATOR = 'evaluator'
POLL_SECS = 0.2
# A stopped task gets this long after SIGTERM before SIGKILL.
STOP_GRACE_SECS = 10
# Workers normally exit with the chief; give stragglers this long.
WORKER_GRACE_SECS = 30
# The evaluator evaluates the final checkpoint after the chief wrote it.
EVALUATOR_TIMEOUT_SECS = 600

PARAMETER_SERVER = 'parameter_server'
MULTI_WORKER_MIRRORED = 'multi_worker_mirrored'


def distribution_for(config, ps):
  """The train.distribution of a cluster with `ps` ps tasks.

  The topology decides: ps tasks mean parameter_server, none
  multi_worker_mirrored. A config that names the other cluster mode is an
  error rather than silently trained another way.
  """
  wanted, other = ((PARAMETER_SERVER, MULTI_WORKER_MIRRORED) if ps else
                   (MULTI_WORKER_MIRRORED, PARAMETER_SERVER))
  if config.train.distribution == other:
    raise UserError(f'train.distribution is {other} but --ps {ps} makes a '
                    f'{wanted} cluster: use --ps '
                    f'{"0" if ps else "1 or more"}, or change the config')
  return wanted


def check_counts(workers, ps):
  if workers < 0 or ps < 0:
    raise UserError('--workers and --ps must be 0 or more')


def free_ports(count):
  """`count` distinct free ports on 127.0.0.1."""
  # Held open together, so that no two of them are the same port.
  with contextlib.ExitStack() as stack:
    sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
    for s in sockets:
      s.bind((HOST, 0))
    return [s.getsockname()[1] for s in sockets]


def local_cluster(workers, ps):
  """The TF_CONFIG cluster on 127.0.0.1: a chief, workers and ps tasks."""
  counts = {'chief': 1, 'worker': workers, 'ps': ps}
  ports = iter(free_ports(sum(counts.values())))
  return {job: [f'{HOST}:{next(ports)}' for _ in range(n)]
          for job, n in counts.items() if n}


def task_list(cluster):
  """(job, index) of every task to run: the cluster's, then the evaluator."""
  tasks = [(job, i) for job in JOBS for i in range(len(cluster.get(job, ())))]
  return tasks + [(EVALUATOR, 0)]


def tf_config(cluster, job, index):
  return json.dumps({'cluster': cluster,
                     'task': {'type': job, 'index': index}})


def train_args(config_path, overrides=(), distribution=None):
  """The `estpipe train` arguments every task runs, locally or on Vertex."""
  args = ['train', config_path]
  for override in overrides:
    args += ['--set', override]
  if distribution:
    args += ['--set', f'train.distribution={distribution}']
  return args


def train_command(config_path, overrides=(), distribution=None,
                  verbose=False):
  """The command line of one local task (this Python, this package)."""
  return [sys.executable, '-m', 'pipeline.cli',
          *(['-v'] if verbose else []),
          *train_args(config_path, overrides, distribution)]


def exit_status(returncode):
  """A shell's view of a task's returncode (killed by signal N: 128+N)."""
  return 128 - returncode if returncode < 0 else returncode


@dataclasses.dataclass
class Outcome:
  """How a cluster ended; code 0 when it trained and evaluated."""
  code: int
  message: str
  # Task name -> returncode when the watch ended (None: it was stopped).
  returncodes: dict
  failed: str = None


class Task:
  """One `estpipe train` process of the cluster."""

  def __init__(self, job, index):
    self.job = job
    self.index = index
    self.name = f'{job}{index}'
    self.proc = None
    self.reader = None

  def returncode(self):
    return self.proc.poll() if self.proc else None


def print_line(name, line):
  """The default log sink: each task's line on stderr, prefixed."""
  if not line.endswith('\n'):  # a task's last words, cut off mid-line
    line += '\n'
  with _PRINT_LOCK:
    sys.stderr.write(f'[{name}] {line}')
    sys.stderr.flush()


_PRINT_LOCK = threading.Lock()


class LocalCluster:
  """Starts, watches and stops the tasks of one cluster.

  As a context manager it starts them and, whatever happens, stops them.
  `on_line(task_name, line)` receives every output line as it comes.
  """

  def __init__(self, command, cluster, on_line=print_line, env=None):
    self.command = command
    self.cluster = cluster
    self.on_line = on_line
    self.env = dict(os.environ if env is None else env)
    self.tasks = [Task(job, i) for job, i in task_list(cluster)]
    # The signal that asked the cluster to stop (set by stop_on_signals).
    self.interrupted = None

  def __enter__(self):
    self.start()
    return self

  def __exit__(self, *exc_info):
    self.stop()

  def start(self):
    for task in self.tasks:
      if self.interrupted:
        return
      task.proc = _spawn(self.command, self._task_env(task))
      log.info('started %s (pid %d)', task.name, task.proc.pid)
    # Readers start after every fork: forking beside threads is unsafe.
    for task in self.tasks:
      if task.proc:
        task.reader = threading.Thread(target=_stream,
                                       args=(task, self.on_line), daemon=True)
        task.reader.start()

  def _task_env(self, task):
    return dict(self.env, PYTHONUNBUFFERED='1',
                TF_CONFIG=tf_config(self.cluster, task.job, task.index))

  def wait(self, timeout=None, evaluator_timeout=EVALUATOR_TIMEOUT_SECS,
           worker_grace=WORKER_GRACE_SECS):
    """Watches the tasks until the cluster is done or broken: an Outcome."""
    started = time.monotonic()
    chief_done = both_done = None
    while True:
      outcome = self._failure() or self._interruption()
      if outcome:
        return outcome
      now = time.monotonic()
      if chief_done is None and self._done('chief'):
        chief_done = now
      if both_done is None and chief_done and self._done(EVALUATOR):
        both_done = now
      if both_done and (self._done('worker') or
                        now - both_done > worker_grace):
        return self._outcome(0, 'the chief and the evaluator finished')
      if chief_done and not both_done and (
          now - chief_done > evaluator_timeout):
        return self._outcome(1, f'{EVALUATOR}0 did not finish within '
                             f'{evaluator_timeout}s after the chief')
      if timeout and now - started > timeout:
        return self._outcome(1, f'the cluster did not finish within '
                             f'{timeout}s')
      time.sleep(POLL_SECS)

  def _failure(self):
    """The outcome when a task failed (a ps task may not exit at all)."""
    for task in self.tasks:
      code = task.returncode()
      if code is None or (code == 0 and task.job != 'ps'):
        continue
      status = exit_status(code) or 1
      why = (f'exited with status {code}' if code >= 0 else
             f'was killed by signal {-code}')
      return self._outcome(status, f'{task.name} {why}; see its lines '
                           f'[{task.name}] above', task.name)
    return None

  def _interruption(self):
    if not self.interrupted:
      return None
    name = signal.Signals(self.interrupted).name
    return self._outcome(128 + self.interrupted, f'interrupted by {name}')

  def _done(self, job):
    return all(t.returncode() == 0 for t in self.tasks if t.job == job)

  def _outcome(self, code, message, failed=None):
    return Outcome(code, message,
                   {t.name: t.returncode() for t in self.tasks}, failed)

  def stop(self):
    """Stops every task still running: SIGTERM its group, later SIGKILL."""
    running = [t for t in self.tasks if t.returncode() is None and t.proc]
    for task in running:
      log.info('stopping %s (pid %d)', task.name, task.proc.pid)
      _signal_group(task.proc, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECS
    for task in running:
      try:
        task.proc.wait(max(0.1, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        _signal_group(task.proc, signal.SIGKILL)
        task.proc.wait()
    for task in self.tasks:
      if task.reader:
        task.reader.join(timeout=5)


def _signal_group(proc, signum):
  try:
    os.killpg(proc.pid, signum)
  except ProcessLookupError:
    pass


def _stream(task, on_line):
  with task.proc.stdout:
    for line in task.proc.stdout:
      on_line(task.name, line)


# Loaded before any fork: the child only calls into it.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == 'linux' else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent():
  """In the child: the kernel SIGKILLs it when the launcher dies."""
  _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _spawn(command, env):
  # Its own session: the terminal's Ctrl-C reaches only the launcher, which
  # stops the tasks, and a task's group is killed as a whole.
  return subprocess.Popen(
      command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, errors='replace',
      start_new_session=True,
      preexec_fn=_die_with_parent if _LIBC else None)


@contextlib.contextmanager
def stop_on_signals(cluster):
  """SIGINT and SIGTERM make the watch stop every task, then return."""
  def handler(signum, frame):
    del frame
    cluster.interrupted = signum
  previous = {s: signal.signal(s, handler)
              for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)


def run(command, workers, ps, on_line=print_line, env=None, timeout=None,
        evaluator_timeout=EVALUATOR_TIMEOUT_SECS):
  """Runs `command` as every task of a local cluster; returns the Outcome."""
  cluster = LocalCluster(command, local_cluster(workers, ps), on_line, env)
  with stop_on_signals(cluster), cluster:
    outcome = cluster.wait(timeout, evaluator_timeout)
  return outcome
