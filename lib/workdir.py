"""The run directory: checked before use, and held by one training launch at a time.

    check_usable('runs/x')          # UserError if it is a file or cannot be created
    check_usable('gs://b/runs/x')   # UserError if the bucket is missing or not writable
    in_bucket('b', 'diffuse_nnx', 'x')  # gs://b/diffuse_nnx/NNN_x, as diffuse_nnx's --bucket
    with WorkdirLock('runs/x'):     # WorkdirBusy if another launch trains in runs/x
      record_launch('runs/x', step)  # appends what ran to runs/x/run.json
      ...

The lock is the object `WORKDIR/lock`, whose text (`host`, `pid`, `started`) names the holder
for the refusal message and, when a later launch takes over a lock left by a run that ended,
for its log line.

- Local workdir: an exclusive `fcntl.flock` on the file, held while the run trains. The kernel
  releases it when the process ends, however it ends, so a killed run never leaves a lock that
  blocks its resumption. flock is per host: two hosts sharing a network file system are only
  kept apart where that file system supports it.
- Bucket workdir (`gs://`): the lock object is created with the precondition "no such object"
  (`ifGenerationMatch=0`), which the object store grants to exactly one of any number of
  concurrent writers; release deletes it (only the generation this run wrote). A killed run
  cannot delete it, so the holder rewrites it every `HEARTBEAT_SECS` (`heartbeat`: seconds
  since the epoch) and a lock is stale, and taken over with a log line, when its holder is a
  process of this host that has ended or when its heartbeat is older than `STALE_SECS`
  (hosts' clocks are assumed to agree within a minute or so).

A run that loses its lock stops before its next write (fencing): the training loop asks
`owned()` before every metrics write and every step's stop vote, and `check_owned()` (which
raises `errors.LockLost` naming the new holder) before every checkpoint save. Locally the
kernel holds the flock, so the lock is lost only if `WORKDIR/lock` was deleted or replaced
(another launch could then lock the new file). In a bucket it is lost when the heartbeat's
precondition write fails (the object is no longer the generation this run wrote) or when a check
finds another generation there; the check reads the object's metadata, at most once per
`HEARTBEAT_SECS` (a lock confirmed more recently cannot be stale to anyone), so a run stopped
(SIGSTOP, a suspended laptop) and taken over finds out before its first write after it wakes.
A write already in flight when the holder was stopped still lands.

Each call to the bucket waits at most about twice `FIDDLEDIFF_IO_TIMEOUT_SECS` (`lib.storage`).
A heartbeat or check that gets no answer confirms nothing and stops nothing by itself: the run
goes on to its writes, which meet the same silence and stop it with a `StorageError` after
`FIDDLEDIFF_IO_RETRY_SECS`; if another launch took the lock over meanwhile, the first check
that gets an answer stops it with `LockLost`.

`FIDDLEDIFF_LOCK_HEARTBEAT_SECS` and `FIDDLEDIFF_LOCK_STALE_SECS` override the two periods
(tests shorten them); keep STALE several times HEARTBEAT.
"""

import datetime
import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from absl import logging

from lib import errors, paths, storage

HEARTBEAT_SECS = float(os.environ.get('FIDDLEDIFF_LOCK_HEARTBEAT_SECS', 60.0))
STALE_SECS = float(os.environ.get('FIDDLEDIFF_LOCK_STALE_SECS', 600.0))


def check_usable(workdir) -> None:
  """Raises UserError unless `workdir` is (or can be created as) a writable directory, or is
  in a bucket that exists and this process may write to; leaves nothing behind."""
  path = paths.resolve(workdir, '--workdir')
  if paths.is_url(path):
    _check_bucket(path, f'--workdir={paths.shown(workdir)}')
    return
  path = os.fspath(path)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise errors.UserError(f'--workdir={paths.shown(workdir)} is an existing file, not a '
                             'directory; give a new or existing directory')
    if not os.access(path, os.W_OK | os.X_OK):
      raise errors.UserError(f'--workdir={paths.shown(workdir)} is not writable')
    return
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise errors.UserError(f'--workdir={paths.shown(workdir)} cannot be created: '
                           f'{paths.shown(parent)} is not a writable directory')


def in_bucket(bucket: str, prefix: str, name: str) -> paths.Path:
  """diffuse_nnx's run folder `gs://BUCKET/PREFIX/NNN_NAME`: the existing folder `NNN_NAME`
  if there is one (the run resumes), else NNN = the number of run folders under PREFIX,
  three digits (`000_x`, `001_y`, ...). Raises UserError for a missing or unwritable bucket."""
  if not name or '/' in name:
    raise errors.UserError(f'--workdir={name!r} with --bucket is the name of the run folder; '
                           'give a name without "/"')
  base = paths.resolve(f'gs://{bucket}/{prefix.strip("/")}', '--bucket')
  _check_bucket(base, f'--bucket={bucket!r}')
  runs = sorted(next(base.walk())[1]) if base.is_dir() else []
  mine = [folder for folder in runs if re.fullmatch(r'\d+_' + re.escape(name), folder)]
  return base / (mine[0] if mine else f'{len(runs):03d}_{name}')


def record_launch(workdir, step: int) -> None:
  """Appends what this launch runs to `workdir/run.json` (a list, oldest first): the command
  line, the code's git revision and whether its tree had uncommitted changes, the JAX, Flax,
  Fiddle and orbax versions, the devices and processes, the step it starts from, and in a
  Slurm job its id and `SLURM_RESTART_COUNT`."""
  import importlib.metadata

  from lib.config import REPO_ROOT

  def git(*args) -> str | None:
    try:
      return subprocess.run(['git', *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return None

  revision = git('rev-parse', 'HEAD')
  status = git('status', '--porcelain', '--untracked-files=no') if revision else None
  devices = jax.devices()
  entry = {
      'started': datetime.datetime.now().isoformat(timespec='seconds'),
      'command': [sys.executable, *sys.argv],
      'cwd': os.getcwd(),
      'host': socket.gethostname(),
      'git_revision': revision,
      'git_dirty': None if status is None else bool(status),
      'versions': {name: importlib.metadata.version(name) for name in
                   ('jax', 'jaxlib', 'flax', 'fiddle', 'orbax-checkpoint')},
      'device_kind': devices[0].device_kind,
      'device_count': len(devices),
      'process_count': jax.process_count(),
      'start_step': int(step),
  }
  if 'SLURM_JOB_ID' in os.environ:  # a Slurm job; requeued RESTART_COUNT times
    entry['slurm'] = {'job_id': os.environ['SLURM_JOB_ID'],
                      'restart_count': int(os.environ.get('SLURM_RESTART_COUNT', '0'))}
  file = paths.resolve(workdir, '--workdir') / 'run.json'
  entries = json.loads(file.read_text()) if file.exists() else []
  paths.write_atomic(file, json.dumps([*entries, entry], indent=1) + '\n')


def _check_bucket(path, flag: str) -> None:
  """The bucket of `path` exists and takes (and gives back) a small object under `path`;
  else UserError naming `flag` (the flag and its value)."""
  from google import auth
  from google.api_core import exceptions

  probe = paths.blob(path / f'.write_check.{socket.gethostname()}.{os.getpid()}')
  try:
    if not probe.bucket.exists(**storage.call_options()):
      raise errors.UserError(f'{flag}: bucket gs://{probe.bucket.name} does '
                             'not exist (or these credentials cannot see it); create it or '
                             'name another')
    probe.upload_from_string(b'', **storage.call_options())
    probe.delete(**storage.call_options())
  except (exceptions.GoogleAPIError, auth.exceptions.GoogleAuthError) as error:
    raise errors.UserError(f'{flag}: cannot write there: '
                           f'{type(error).__name__}: {str(error).splitlines()[0][:300]}') from None


class WorkdirLock:
  """An exclusive lock on a workdir for the life of a training run (a context manager)."""

  def __init__(self, workdir):
    self.workdir = paths.resolve(workdir, '--workdir')
    self.path = self.workdir / 'lock'
    self._file = None  # local: the open, locked file
    self._blob = None  # bucket: the lock object this run created
    self._stop = threading.Event()
    self._heartbeat = None
    self._guard = threading.Lock()  # the heartbeat thread and the fence checks
    self._confirmed = 0.0  # time.monotonic() when the lock object was last known to be ours
    self._lost = None  # why the lock is no longer this run's

  def acquire(self) -> None:
    """Takes the lock (process 0 of a multi-host run; every process learns the outcome).
    Raises WorkdirBusy naming the holder."""
    refusal = None
    if jax.process_index() == 0:
      try:
        self._acquire_object() if paths.is_url(self.workdir) else self._acquire_file()
      except errors.WorkdirBusy as e:
        refusal = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      busy = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
      if busy and refusal is None:
        refusal = errors.WorkdirBusy(f'{self.workdir} is in use by another training launch '
                                     '(process 0 could not lock it)')
    if refusal is not None:
      raise refusal

  def _busy(self, holder: str) -> errors.WorkdirBusy:
    return errors.WorkdirBusy(f'{self.workdir} is in use by another training launch '
                              f'({holder}); wait for it to end or stop it, or use another '
                              '--workdir')

  @staticmethod
  def _holder_text() -> str:
    return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                       'started': datetime.datetime.now().isoformat(timespec='seconds'),
                       'heartbeat': time.time()})

  @staticmethod
  def _describe(text: str) -> str:
    try:
      info = json.loads(text or 'null')
      return f'host {info["host"]}, process {info["pid"]}, since {info["started"]}'
    except (ValueError, TypeError, KeyError):
      return 'unknown holder'

  # ----------------------------------------------------------------------------- local
  def _acquire_file(self) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    handle = open(self.path, 'a+')
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = self._describe(handle.read())
      handle.close()
      raise self._busy(holder) from None
    handle.seek(0)
    previous = self._describe(handle.read())
    if previous != 'unknown holder':
      logging.warning('Took over the lock of %s left by %s, which has ended', self.workdir,
                      previous)
    handle.seek(0)
    handle.truncate()
    handle.write(self._holder_text())
    handle.flush()
    self._file = handle
    self._lost = None

  # ----------------------------------------------------------------------------- bucket
  def _acquire_object(self) -> None:
    from google.api_core import exceptions

    blob = paths.blob(self.path)
    for _ in range(3):  # a stale lock deleted by us may be retaken by another launch first
      try:
        blob.upload_from_string(self._holder_text(), if_generation_match=0,
                                **storage.call_options())
        break
      except exceptions.PreconditionFailed:
        pass
      try:
        existing = blob.bucket.get_blob(blob.name, **storage.call_options())
        text = '' if existing is None else existing.download_as_text(**storage.call_options())
      except exceptions.NotFound:  # released meanwhile
        continue
      if existing is None:
        continue
      stale = self._stale_reason(text)
      if stale is None:
        raise self._busy(self._describe(text))
      logging.warning('Took over the lock of %s left by %s (%s)', self.workdir,
                      self._describe(text), stale)
      try:
        existing.delete(if_generation_match=existing.generation,
                        **storage.call_options())
      except (exceptions.PreconditionFailed, exceptions.NotFound):
        pass
    else:
      raise self._busy('the lock changed hands during three attempts to take it')
    self._blob = blob
    self._lost = None
    self._confirmed = time.monotonic()
    self._stop.clear()
    self._heartbeat = threading.Thread(target=self._beat, name='workdir-lock-heartbeat',
                                       daemon=True)
    self._heartbeat.start()

  @staticmethod
  def _stale_reason(text: str) -> str | None:
    """Why a lock object's holder is known to be gone, or None while it may be alive."""
    try:
      info = json.loads(text)
      host, pid, beat = info['host'], int(info['pid']), float(info['heartbeat'])
    except (ValueError, TypeError, KeyError):
      return 'its text names no holder'
    if host == socket.gethostname() and pid != os.getpid():
      try:
        os.kill(pid, 0)
      except ProcessLookupError:
        return 'its process has ended'
      except PermissionError:
        pass
    age = time.time() - beat
    if age > STALE_SECS:
      return f'no heartbeat for {age:.0f} s'
    return None

  def _beat(self) -> None:
    from google.api_core import exceptions

    while not self._stop.wait(HEARTBEAT_SECS):
      with self._guard:
        if self._lost is not None:
          return
        try:
          self._blob.upload_from_string(self._holder_text(),
                                        if_generation_match=self._blob.generation,
                                        **storage.call_options())
          self._confirmed = time.monotonic()
        except exceptions.PreconditionFailed:
          self._lose()
          return
        except exceptions.GoogleAPIError as error:  # transient: the next beat retries
          logging.warning('Could not refresh the lock of %s: %s', self.workdir, error)

  def _lose(self) -> None:
    """Marks the bucket lock lost, naming whoever holds the object now (under `_guard`)."""
    from google.api_core import exceptions

    try:
      current = self._blob.bucket.get_blob(self._blob.name, **storage.call_options())
      holder = None if current is None else self._describe(
          current.download_as_text(**storage.call_options()))
    except exceptions.GoogleAPIError:
      holder = 'unknown holder'
    self._lost = (f'it is now held by {holder}' if holder else
                  'another launch took it over and has released it since')
    logging.error('The lock of %s was taken over (%s); this run stops before its next write',
                  self.workdir, self._lost)

  # ----------------------------------------------------------------------------- fencing
  def owned(self) -> bool:
    """False once this run's lock is known to be lost (see the module docstring); True on
    processes that hold no lock (every process but 0) and while the lock holds."""
    if self._file is not None and self._lost is None:
      try:
        same = os.fstat(self._file.fileno()).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        self._lost = f'{self.path} was deleted or replaced while this run held it'
    if self._blob is not None:
      with self._guard:
        if self._lost is None and time.monotonic() - self._confirmed >= HEARTBEAT_SECS:
          self._confirm()
    return self._lost is None

  def _confirm(self) -> None:
    """Reads the lock object's generation: ours confirms the lock, any other loses it."""
    from google.api_core import exceptions

    try:
      current = self._blob.bucket.get_blob(self._blob.name, **storage.call_options())
    except exceptions.GoogleAPIError as error:  # unreachable, or no answer in TIMEOUT_SECS:
      # not confirmed; the writes that follow fail the same way and stop the run
      logging.warning('Could not check the lock of %s: %s', self.workdir, error)
      return
    if current is not None and current.generation == self._blob.generation:
      self._confirmed = time.monotonic()
    else:
      self._lose()

  def check_owned(self) -> None:
    """Raises `errors.LockLost` unless `owned()`."""
    if not self.owned():
      raise self.lost_error()

  def lost_error(self) -> errors.LockLost:
    return errors.LockLost(
        f'this run lost the lock of {self.workdir} '
        f'({self._lost or "process 0 found it taken over"}); it stopped without writing '
        'anything more. The other launch owns the workdir now; to continue this run, stop that '
        'one and relaunch')

  # ----------------------------------------------------------------------------- both
  def release(self) -> None:
    if self._file is not None:
      self._file.seek(0)
      self._file.truncate()  # a cleanly ended run leaves no holder behind
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
    if self._blob is not None:
      from google.api_core import exceptions

      self._stop.set()
      self._heartbeat.join()
      try:
        self._blob.delete(if_generation_match=self._blob.generation,
                          **storage.call_options())
      except (exceptions.PreconditionFailed, exceptions.NotFound):
        pass  # taken over meanwhile: the lock is not ours to delete
      except exceptions.GoogleAPIError as error:  # the bucket did not answer: the lock stays
        logging.warning('Could not delete the lock of %s (%s); the next launch on this host takes '
                        'it over, another after %.0f s without heartbeat', self.workdir,
                        str(error).splitlines()[0][:300], STALE_SECS)
      self._blob = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
