"""A full disk and an unwritable workdir stop a run with one message, keep the newest
checkpoint intact, and the relaunch resumes exactly (lib.storage). The tests run as root, which
passes permission checks: a full disk is a small tmpfs they mount and fill, an unwritable
folder a read-only bind mount."""

import contextlib
import errno
import os
import subprocess
import time

import pytest

from lib import errors, storage
from lib.config import REPO_ROOT
from tests import test_nothing_lost
from tests.test_train import checkpoints, losses


def no_checkpoint():
  return None


def test_write_failures_are_recognised_in_exception_chains_and_messages(tmp_path):
  workdir = str(tmp_path)
  wrapped = RuntimeError('CLU AsyncError')
  wrapped.__cause__ = OSError(errno.EACCES, 'Permission denied', f'{workdir}/metrics.jsonl')
  message = str(storage.storage_error(wrapped, workdir, no_checkpoint))
  assert message.startswith(f'cannot write to {workdir}: permission denied; the run stopped '
                            f'and there is no checkpoint in {workdir}/checkpoints yet')
  tensorstore = ValueError(f'RESOURCE_EXHAUSTED: Error writing "w/0": Failed writing: '
                           f'"{workdir}/checkpoints/5.orbax-checkpoint-tmp/d/1": No space left '
                           "on device [os_error_code='28']")
  assert str(storage.storage_error(tensorstore, workdir, no_checkpoint)).startswith(
      f'cannot write to {workdir}/checkpoints: the disk is full')
  assert storage.storage_error(ValueError('shapes differ'), workdir, no_checkpoint) is None
  from clu import asynclib
  fenced = asynclib.AsyncError('in the metrics writer')
  fenced.__cause__ = errors.LockLost(f'{workdir}/metrics.jsonl was rewritten by another launch')
  unwrapped = storage.storage_error(fenced, workdir, no_checkpoint)
  assert type(unwrapped) is errors.LockLost and str(unwrapped) == str(fenced.__cause__)


@contextlib.contextmanager
def tmpfs(path, size: str):
  os.makedirs(path)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs: {mounted.stderr.strip()}')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], check=True)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  result = test_nothing_lost.launch(workdir, '--fdl_set=log_every_steps=1')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def fail_after_first_checkpoint(workdir, break_it) -> str:
  """Starts the 20-step run, breaks its workdir (`break_it()`) once step 5 is saved, and
  returns its stderr after it stopped with status 2."""
  with open(os.path.join(os.path.dirname(workdir), 'run.log'), 'w') as log:
    process = test_nothing_lost.conftest.launch(
        '--fdl_config=experiments/dit.py:digits(total_steps=20)', *test_nothing_lost.conftest.TINY_FLAGS,
        '--fdl_set=checkpoint.save_interval_steps=5', '--fdl_set=log_every_steps=1',
        f'--workdir={workdir}', wait=False, stderr=log)
  deadline = time.time() + 600
  while 5 not in checkpoints(workdir):
    assert process.poll() is None and time.time() < deadline
    time.sleep(0.02)
  break_it()
  assert process.wait(timeout=600) == 2
  stderr = open(log.name).read()
  # no traceback through this project's code (tensorstore's threads may still print theirs
  # against orbax's closed event loop while the failed save winds down)
  assert f'File "{REPO_ROOT}' not in stderr, stderr[-4000:]
  return stderr


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_the_relaunch_resumes(reference, tmp_path):
  with tmpfs(tmp_path / 'disk', '64m') as disk:
    workdir = str(disk / 'run')

    def fill():
      with open(disk / 'filler', 'wb') as f:
        with contextlib.suppress(OSError):
          while True:
            f.write(b'\0' * 65536)
            f.flush()

    stderr = fail_after_first_checkpoint(workdir, fill)
    lines = [line for line in stderr.splitlines() if 'error: ' in line]
    assert len(lines) == 1 and f'cannot write to {workdir}' in lines[0] and \
        'the disk is full' in lines[0] and 'free space there' in lines[0], stderr[-3000:]
    newest = max(checkpoints(workdir))
    assert f'the newest intact checkpoint is step {newest} in {workdir}/checkpoints' in lines[0]
    os.remove(disk / 'filler')
    result = test_nothing_lost.launch(workdir, '--fdl_set=log_every_steps=1')
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'Resumed from the checkpoint of step {newest}' in result.stderr
    assert losses(workdir) == losses(reference)


@pytest.mark.slow
def test_an_unwritable_checkpoint_folder_stops_with_one_line_and_the_relaunch_resumes(
    reference, tmp_path):
  workdir = str(tmp_path / 'run')
  folder = os.path.join(workdir, 'checkpoints')
  mount = lambda *args: subprocess.run(['mount', *args], capture_output=True, text=True)

  def read_only():  # a read-only bind mount of the folder over itself
    if mount('--bind', folder, folder).returncode:
      pytest.skip('cannot bind-mount')
    assert mount('-o', 'remount,bind,ro', folder).returncode == 0

  try:
    stderr = fail_after_first_checkpoint(workdir, read_only)
  finally:
    subprocess.run(['umount', '-l', folder])
  lines = [line for line in stderr.splitlines() if 'error: ' in line]
  assert len(lines) == 1 and f'cannot write to {folder}: the file system is read-only' in \
      lines[0] and 'remount it writable' in lines[0], stderr[-3000:]
  newest = max(checkpoints(workdir))
  assert f'the newest intact checkpoint is step {newest}' in lines[0]
  result = test_nothing_lost.launch(workdir, '--fdl_set=log_every_steps=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert losses(workdir) == losses(reference)


@pytest.mark.slow
def test_a_profiler_that_cannot_write_its_trace_is_a_warning(tmp_path):
  (tmp_path / 'plugins').write_text('a file where the trace folder goes')
  result = test_nothing_lost.launch(
      tmp_path, '--fdl_set=profile.first_profile=2', '--fdl_set=profile.num_profile_steps=2',
      '--fdl_set=profile.profile_duration_ms=None', preset='digits(total_steps=6)')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'The profiler could not write its trace to {tmp_path}/plugins/profile' in result.stderr
  assert 'Traceback' not in result.stderr
  assert checkpoints(tmp_path) == [5, 6]


def refused_connection():
  """Connects to a port nobody listens on: a real ConnectionRefusedError."""
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  socket.create_connection(('127.0.0.1', port), timeout=5)


def test_transient_failures_are_retried_then_stop_naming_the_newest_checkpoint(tmp_path,
                                                                              monkeypatch):
  monkeypatch.setattr(storage, 'RETRY_SECS', 2.5)
  calls = []

  def flaky():
    calls.append(time.monotonic())
    if len(calls) < 2:
      refused_connection()
    return 'saved'

  assert storage.retrying(flaky, 'saving') == 'saved' and len(calls) == 2
  calls.clear()
  with pytest.raises(ConnectionRefusedError) as failure:
    storage.retrying(lambda: calls.append(0) or refused_connection(), 'saving')
  assert len(calls) == 2  # after 1 s; the next wait (2 s) would pass the 2.5 s limit
  message = str(storage.storage_error(failure.value, str(tmp_path), no_checkpoint))
  assert message.startswith(f'cannot write to {tmp_path}: the storage did not answer; the run '
                            f'stopped and there is no checkpoint in {tmp_path}/checkpoints yet')
  with pytest.raises(ValueError):  # not transient: raised at once
    storage.retrying(lambda: calls.append(0) or int('x'), 'saving')
  assert len(calls) == 3
