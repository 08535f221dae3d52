"""A run directory on a remote filesystem (gs:// on Dataflow).

There is no GCS here, so the run directory lives on TensorFlow's in-memory
filesystem (ram://), which tf.io.gfile serves like gs://, and Beam reaches it
through a small object-store FileSystem over tf.io.gfile, registered below
(Beam finds FileSystem subclasses by their scheme). Like GCS it has no
folders to rename: every object under a prefix moves one by one.
"""

import io
import json
import os
import posixpath
import uuid

import pytest
import tensorflow as tf
from apache_beam.io.filesystem import (BeamIOError, CompressedFile,
                                       CompressionTypes, FileMetadata,
                                       FileSystem)

from pipeline import fs
from pipeline import rundir
from pipeline import runrecord
from pipeline import signatures
from tests.conftest import example_config

gfile = tf.io.gfile


class _Upload(io.BytesIO):
  """A whole-object write, as to GCS (ram:// files cannot tell())."""

  mode = 'wb'

  def __init__(self, path):
    super().__init__()
    self._path = path

  def close(self):
    if not self.closed:
      with gfile.GFile(self._path, 'wb') as f:
        f.write(self.getvalue())
    super().close()


class RamFileSystem(FileSystem):
  """Beam's view of ram://, an object store over tf.io.gfile (tests only)."""

  @classmethod
  def scheme(cls):
    return 'ram'

  def join(self, basepath, *paths):
    return posixpath.join(basepath, *paths)

  def split(self, path):
    return posixpath.split(path)

  def has_dirs(self):
    return False

  def mkdirs(self, path):
    gfile.makedirs(path)

  def _list(self, dir_or_prefix):
    root = dir_or_prefix if gfile.isdir(dir_or_prefix) else posixpath.dirname(
        dir_or_prefix)
    if not gfile.isdir(root):
      return
    for folder, _, files in gfile.walk(root):
      for name in files:
        path = posixpath.join(folder, name)
        if path.startswith(dir_or_prefix):
          yield FileMetadata(path, gfile.stat(path).length)

  def _open(self, path, mode, compression_type):
    compression_type = FileSystem._get_compression_type(path, compression_type)
    if mode == 'wb':
      raw = _Upload(path)
    else:
      with gfile.GFile(path, 'rb') as f:
        raw = io.BytesIO(f.read())
    if compression_type == CompressionTypes.UNCOMPRESSED:
      return raw
    return CompressedFile(raw, compression_type=compression_type)

  def create(self, path, mime_type='application/octet-stream',
             compression_type=CompressionTypes.AUTO):
    gfile.makedirs(posixpath.dirname(path))
    return self._open(path, 'wb', compression_type)

  def open(self, path, mime_type='application/octet-stream',
           compression_type=CompressionTypes.AUTO):
    return self._open(path, 'rb', compression_type)

  def copy(self, source_file_names, destination_file_names):
    for src, dst in zip(source_file_names, destination_file_names):
      gfile.makedirs(posixpath.dirname(dst))
      gfile.copy(src, dst, overwrite=True)

  def rename(self, source_file_names, destination_file_names):
    for src, dst in zip(source_file_names, destination_file_names):
      gfile.makedirs(posixpath.dirname(dst))
      gfile.rename(src, dst, overwrite=True)

  def exists(self, path):
    return gfile.exists(path)

  def size(self, path):
    return gfile.stat(path).length

  def last_updated(self, path):
    return gfile.stat(path).mtime_nsec / 1e9

  def checksum(self, path):
    return str(self.size(path))

  def metadata(self, path):
    if not gfile.exists(path):
      raise BeamIOError('metadata failed', {path: 'not found'})
    return FileMetadata(path, self.size(path), self.last_updated(path))

  def delete(self, paths):
    for path in paths:
      if gfile.isdir(path):
        gfile.rmtree(path)
      elif gfile.exists(path):
        gfile.remove(path)


@pytest.fixture
def ram_dir(monkeypatch):
  # GCS renames a folder object by object; ram:// only renames files.
  # tf.Transform and Estimators rename folders, so give ram:// the
  # object-store behaviour.
  rename = gfile.rename

  def rename_folders_too(src, dst, overwrite=False):
    src, dst = tf.compat.as_str(src), tf.compat.as_str(dst)
    if gfile.isdir(src):
      fs._rename_tree(src, dst)  # pylint: disable=protected-access
    else:
      rename(src, dst, overwrite)

  monkeypatch.setattr(gfile, 'rename', rename_folders_too)
  # Estimators rename their export folder through the TF1 name.
  monkeypatch.setattr(tf.compat.v1.gfile, 'Rename', rename_folders_too)
  path = f'ram://estpipe-{uuid.uuid4().hex[:8]}'
  yield path
  fs.rmtree(path)


def _tree(root):
  return sorted(posixpath.relpath(posixpath.join(folder, name), root)
                for folder, _, files in gfile.walk(root) for name in files)


def test_run_records_on_an_object_store(ram_dir):
  runrecord.write_json(f'{ram_dir}/a/summary.json', {'rows': 3})
  assert runrecord.read_json(f'{ram_dir}/a/summary.json') == {'rows': 3}
  runrecord.append_history(ram_dir, 'preprocess', 'started')
  runrecord.append_history(ram_dir, 'preprocess', 'succeeded', {'rows': 3})
  with gfile.GFile(f'{ram_dir}/history.jsonl') as f:
    lines = [json.loads(line) for line in f]
  assert [l['status'] for l in lines] == ['started', 'succeeded']
  # Publishing replaces an older output with the staged one, whole.
  for generation in ('old', 'new'):
    with runrecord.staging_dir(ram_dir, 'stage') as stage:
      for name in ('x/1.txt', 'x/deep/2.txt', f'x/{generation}.txt'):
        # ram:// lists only folders made explicitly (gs:// needs none).
        fs.makedirs(posixpath.dirname(f'{stage}/{name}'))
        with fs.open_file(f'{stage}/{name}', 'w') as f:
          f.write(generation)
      runrecord.publish(f'{stage}/x', f'{ram_dir}/x')
  assert _tree(f'{ram_dir}/x') == ['1.txt', 'deep/2.txt', 'new.txt']
  with fs.open_file(f'{ram_dir}/x/deep/2.txt') as f:
    assert f.read() == 'new'
  # Staging leaves nothing behind; tmp files of write_json neither.
  assert sorted(fs.listdir(ram_dir)) == ['a', 'history.jsonl', 'x']
  assert fs.listdir(f'{ram_dir}/a') == ['summary.json']


def test_preprocess_train_export_with_a_remote_run_dir(synthetic_csv,
                                                       synthetic_run,
                                                       ram_dir):
  from estimators import train  # pylint: disable=g-import-not-at-top
  from preprocessing import run  # pylint: disable=g-import-not-at-top
  from serving import export  # pylint: disable=g-import-not-at-top
  # tf-idf would add a vocabulary file 'notes__df' beside 'notes', and the
  # ram:// filesystem takes a file that prefixes another for a folder (gs://
  # does not): bag of words keeps the names apart.
  config = example_config('synthetic', ram_dir,
                          f'data.train={synthetic_csv}/data-*.csv',
                          'features.notes.text_output=bag_of_words',
                          'train.steps=30', 'train.eval_steps=5')
  assert config.run_dir == ram_dir  # a URL is not made relative to the cwd
  summary = run.preprocess(config)
  local = runrecord.read_json(synthetic_run.rundir.preprocess_summary)
  assert summary['splits'] == local['splits']
  assert config.rundir.is_preprocessed()
  assert sorted(fs.listdir(ram_dir)) == [
      'data', 'history.jsonl', 'preprocess.json', 'rejects', 'transform']
  records = sum(1 for path in fs.glob(config.rundir.data_pattern('train'))
                for _ in tf.data.TFRecordDataset(path, 'GZIP'))
  assert records == summary['splits']['train']['written']

  record = train.train(config, export.make_exporters(config))
  assert record['global_step'] == 30
  assert runrecord.read_json(config.rundir.metrics)['global_step'] == 30
  versions = rundir.list_versions(config.rundir.export)
  assert len(versions) == 1, versions
  path = rundir.version_dir(config.rundir.export)
  assert export.read_metadata(path)['global_step'] == 30
  # Nothing staged is left (ram:// may keep an empty folder entry).
  assert _tree(config.rundir.path('.staging')) == []
  loaded = tf.saved_model.load(path)
  assert signatures.RAW_SIGNATURE in loaded.signatures
  with fs.open_file(config.rundir.history) as f:
    stages = [json.loads(line)['stage'] for line in f]
  assert stages == ['preprocess', 'preprocess']  # started, succeeded


def test_local_paths_keep_os_semantics(tmp_path):
  # fs only reroutes paths with a scheme; local ones are plain os calls.
  path = str(tmp_path / 'a')
  assert fs.claim_dir(path) and not fs.claim_dir(path)
  assert fs.abspath('relative') == os.path.abspath('relative')
  assert fs.abspath('gs://bucket/run') == 'gs://bucket/run'
  assert fs.is_remote('gs://bucket/run') and not fs.is_remote(path)
