"""Stop signals (lib.stopping): what a signal records, the second Ctrl-C, and two processes
that stop at the same step when only one of them is signalled."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lib import errors, stopping
from lib.config import REPO_ROOT
from tests import test_sharding


class FakeLock:
  def __init__(self, owned):
    self._owned = owned

  def owned(self):
    return self._owned


def test_a_signal_is_recorded_by_name_and_the_handlers_are_restored_after():
  before = signal.getsignal(signal.SIGUSR2)
  with stopping.StopSignals() as signals:
    assert signals.vote() == 0 and signals.vote(FakeLock(False)) == stopping.LOCK_LOST
    os.kill(os.getpid(), signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGTERM)  # the first signal names the stop
    assert signals.received == 'SIGUSR2' and signals.vote(FakeLock(True)) == stopping.STOP
  assert signal.getsignal(signal.SIGUSR2) is before


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_with_one_line():
  code = textwrap.dedent('''
      import sys, time
      from lib import stopping
      with stopping.StopSignals():
        print('ready', flush=True)
        while True:
          time.sleep(0.01)
      ''')
  process = subprocess.Popen([sys.executable, '-c', code], cwd=REPO_ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  assert process.stdout.readline() == 'ready\n'
  process.send_signal(signal.SIGINT)
  time.sleep(0.5)
  assert process.poll() is None  # the first one only asks the loop to save and stop
  process.send_signal(signal.SIGINT)
  assert process.wait(timeout=30) == errors.INTERRUPTED_STATUS
  stderr = process.stderr.read()
  assert stderr.splitlines() == [
      'SIGINT: saving a checkpoint of the current step, then exiting (Ctrl-C again to exit at '
      'once, without saving)',
      'error: interrupted again; exiting at once without saving (the checkpoints written so '
      'far are kept)']


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_is_sent_sigterm(tmp_path):
  run = ('()', '--fdl_set=total_steps=150', '--fdl_set=checkpoint.save_interval_steps=1000')
  single = tmp_path / 'single'
  test_sharding.launch_tiny(tmp_path, single, *run)
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  pair = tmp_path / 'pair'

  def start_pair():
    return [test_sharding.launch_tiny(
        tmp_path, pair, *run, f'--coordinator_address=localhost:{port}', '--num_processes=2',
        f'--process_id={i}', process=i) for i in range(2)]

  def logs():
    return '\n\n'.join(f'process {i}:\n{(tmp_path / f"process_{i}.log").read_text()[-3000:]}'
                       for i in range(2))

  processes = start_pair()
  metrics = pair / 'metrics.jsonl'
  deadline = time.time() + 600
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert time.time() < deadline and all(p.poll() is None for p in processes), logs()
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGTERM)  # process 0 hears of it only through the vote
  codes = [process.wait(timeout=600) for process in processes]
  assert codes == [errors.PREEMPTED_STATUS] * 2, logs()
  saved = sorted(int(name) for name in os.listdir(pair / 'checkpoints') if name.isdigit())
  assert len(saved) == 1 and 0 < saved[0] < 150, logs()
  for i, reason in enumerate(('a stop signal to another process', 'SIGTERM')):
    assert f'stopped: {reason}: stopped at step {saved[0]} of 150' in \
        (tmp_path / f'process_{i}.log').read_text(), logs()

  processes = start_pair()
  assert [process.wait(timeout=900) for process in processes] == [0, 0], logs()
  both, one = test_sharding.losses(pair), test_sharding.losses(single)
  assert sorted(both) == sorted(one) == list(range(1, 151))
  np.testing.assert_allclose([both[s] for s in one], list(one.values()), rtol=1e-5)
