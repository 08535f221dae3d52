"""File operations on run directories and data inputs, local or remote.

A run directory may be local or on any filesystem TensorFlow knows
(`gs://bucket/run` for Dataflow). Local paths keep the os semantics the
stages rely on (a rename is atomic); paths with a scheme go through
`tf.io.gfile`. On an object store a rename is a copy, so readers there trust
the completeness markers every stage writes last (`preprocess.json`, an
export's metadata), never the mere presence of a folder.
"""

import hashlib
import os
import shutil


def is_remote(path):
  return '://' in str(path)


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def abspath(path):
  return path if is_remote(path) else os.path.abspath(path)


def exists(path):
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path):
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def makedirs(path):
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def stat(path):
  """(size in bytes, modification time in seconds since the epoch)."""
  if is_remote(path):
    info = _gfile().stat(path)
    return info.length, info.mtime_nsec / 1e9
  info = os.stat(path)
  return info.st_size, info.st_mtime


def sha256(path, chunk=1 << 20):
  """The hex SHA-256 of a file's bytes, read in chunks (files may be large)."""
  digest = hashlib.sha256()
  with open_file(path, 'rb') as f:
    for block in iter(lambda: f.read(chunk), b''):
      digest.update(block)
  return digest.hexdigest()


def listdir(path):
  if is_remote(path):
    # gfile marks subfolders of object stores with a trailing slash; some
    # stores list by bare prefix, so 'x' would also list 'x.old' as '.old'.
    names = [name.rstrip('/') for name in _gfile().listdir(path)]
    return [n for n in names if _gfile().exists(f'{path.rstrip("/")}/{n}')]
  return os.listdir(path)


def glob(pattern):
  if is_remote(pattern):
    return sorted(_gfile().glob(pattern))
  import glob as globbing  # pylint: disable=g-import-not-at-top
  return sorted(globbing.glob(pattern))


def expand_patterns(patterns, key):
  """Input globs -> sorted file list; a pattern that matches nothing is an
  error naming `key`, the config key or flag that gave it.

  Data inputs go through Beam's file systems, the ones the jobs read them
  with (local, gs://, and any Beam registers).
  """
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  files = []
  for pattern in patterns:
    matches = FileSystems.match([pattern])[0].metadata_list
    if not matches:
      raise FileNotFoundError(f'{key}: no file matches {pattern}')
    files.extend(sorted(m.path for m in matches))
  return files


def read_first_line(path):
  """The first line of a data input (decompressed as Beam would)."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  with FileSystems.open(path) as f:
    return f.readline().decode('utf-8', 'replace')


def open_file(path, mode='r'):
  if is_remote(path):
    return _gfile().GFile(path, mode)
  return open(path, mode)  # pylint: disable=unspecified-encoding


def replace(src, dst):
  """Renames src to dst, replacing a file (a folder must be gone first)."""
  if not is_remote(src):
    os.replace(src, dst)
  elif _gfile().isdir(src):
    _rename_tree(src, dst)
  else:
    _gfile().rename(src, dst, overwrite=True)


def _rename_tree(src, dst):
  # Object stores have no folders to rename: every object under the prefix
  # moves (GCS copies each one), then the old prefix goes.
  gfile = _gfile()
  gfile.makedirs(dst)
  for name in listdir(src):
    source, target = f'{src}/{name}', f'{dst}/{name}'
    if gfile.isdir(source):
      _rename_tree(source, target)
    else:
      gfile.rename(source, target, overwrite=True)
  rmtree(src)  # an emptied prefix may be gone already


def remove(path):
  if is_remote(path):
    _gfile().remove(path)
  else:
    os.remove(path)


def rmtree(path):
  """Removes a folder and everything in it; a missing folder is fine."""
  if is_remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      tf.io.gfile.rmtree(path)
    except tf.errors.NotFoundError:
      pass
  else:
    shutil.rmtree(path, ignore_errors=True)


def rmdir_if_empty(path):
  """Removes an empty folder; leaves a folder in use (or gone) alone."""
  if is_remote(path):
    if _gfile().isdir(path) and not listdir(path):
      rmtree(path)
    return
  try:
    os.rmdir(path)
  except OSError:
    pass


def claim_dir(path):
  """Creates the folder `path`; False if it exists already.

  Atomic on local disks. Object stores have no exclusive create, so there
  two writers racing for one name could both win: give concurrent writers
  separate run directories.
  """
  if is_remote(path):
    if _gfile().exists(path):
      return False
    _gfile().makedirs(path)
    return True
  try:
    os.mkdir(path)
    return True
  except FileExistsError:
    return False
