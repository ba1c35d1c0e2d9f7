"""The run directory: checked before use, and held by one training launch at a time.

    check_usable('runs/x')          # UserError if it is a file or cannot be created
    with WorkdirLock('runs/x'):     # WorkdirBusy if another launch trains in runs/x
      ...

The lock is `WORKDIR/lock`: an exclusive `fcntl.flock` on the file, held while the run
trains. The kernel releases it when the process ends, however it ends, so a killed run never
leaves a lock that blocks its resumption; the file's text (`host`, `pid`, `started`) names
the holder for the refusal message and, when a later launch takes a lock that a dead process
left behind, for its log line. flock is per host: two hosts sharing a network file system
are only kept apart where that file system supports it.
"""

import datetime
import fcntl
import json
import os
import socket

import jax
import numpy as np
from absl import logging

from lib import errors


def check_usable(workdir: str) -> None:
  """Raises UserError unless `workdir` is (or can be created as) a writable directory;
  creates nothing."""
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise errors.UserError(f'--workdir={workdir!r} is an existing file, not a directory; '
                             'give a new or existing directory')
    if not os.access(path, os.W_OK | os.X_OK):
      raise errors.UserError(f'--workdir={workdir!r} is not writable')
    return
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise errors.UserError(f'--workdir={workdir!r} cannot be created: {parent!r} is not a '
                           'writable directory')


class WorkdirLock:
  """An exclusive lock on a workdir for the life of a training run (a context manager)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'lock')
    self._file = None

  def acquire(self) -> None:
    """Takes the lock (process 0 of a multi-host run; every process learns the outcome).
    Raises WorkdirBusy naming the holder."""
    refusal = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except errors.WorkdirBusy as e:
        refusal = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      busy = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
      if busy and refusal is None:
        refusal = errors.WorkdirBusy(f'{os.path.dirname(self.path)} is in use by another '
                                     'training launch (process 0 could not lock it)')
    if refusal is not None:
      raise refusal

  def _acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    handle = open(self.path, 'a+')
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._holder(handle)
      handle.close()
      raise errors.WorkdirBusy(
          f'{os.path.dirname(self.path)} is in use by another training launch ({holder}); '
          'wait for it to end or stop it, or use another --workdir') from None
    previous = self._holder(handle)
    if previous != 'unknown holder':
      logging.warning('Took over the lock of %s left by %s, which has ended',
                      os.path.dirname(self.path), previous)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                             'started': datetime.datetime.now().isoformat(timespec='seconds')}))
    handle.flush()
    self._file = handle

  @staticmethod
  def _holder(handle) -> str:
    handle.seek(0)
    try:
      info = json.loads(handle.read() or 'null')
      return f'host {info["host"]}, process {info["pid"]}, since {info["started"]}'
    except (ValueError, TypeError, KeyError):
      return 'unknown holder'

  def release(self) -> None:
    if self._file is not None:
      self._file.seek(0)
      self._file.truncate()  # a cleanly ended run leaves no holder behind
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
