"""The errors a user sees as one `estpipe: ...` line, never a traceback.

Library code in every stage raises these; only the command line
(`pipeline/cli.py`) turns them into messages and exit codes, so the stages
never depend on the command line.
"""


class UserError(Exception):
  """A failure the user can fix (bad input, missing outputs, wrong flags)."""
  # The command's exit status.
  exit_code = 1


class TaskFailed(UserError):
  """A process the command ran failed; the command exits with its status."""

  def __init__(self, message, exit_code):
    super().__init__(message)
    self.exit_code = exit_code


class ConfigError(ValueError):
  """A config problem, with the key path that caused it."""

  def __init__(self, path, message):
    self.path = path
    super().__init__(f'{path}: {message}' if path else message)


class TooManyRejects(UserError):
  """More rows were rejected than the configured share allows."""


def rejects_message(read, rejected, rejects_path):
  """The line a job that succeeded with rejects logs; None without any."""
  if not rejected:
    return None
  return (f'{rejected} of {read} rows rejected (reasons in '
          f'{rejects_path})')


def check_reject_fraction(read, rejected, limit, rejects_path):
  """Raises TooManyRejects when a job read nothing or rejected too much.

  One rule for every job that reads raw rows (preprocessing, batch
  prediction): the rejects are written before this check, so the message
  can point at them.
  """
  if read == 0:
    raise TooManyRejects('no rows were read')
  fraction = rejected / read
  if fraction > limit:
    raise TooManyRejects(
        f'{rejected} of {read} rows rejected ({fraction:.2%}), more than '
        f'preprocessing.max_reject_fraction={limit}; see {rejects_path}')
