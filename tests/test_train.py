"""End to end on the digits preset: train, checkpoint, resume exactly, preempt, sample."""

import json
import os
import signal
import time

import numpy as np
import pytest

from lib import errors
from tests.conftest import DIGITS, TINY_FLAGS, launch

pytestmark = pytest.mark.slow  # every test trains in launch.py interpreters

# The tiny digits run, logged every step, checkpointed every 5 steps (3 kept), its first grid
# with reconstructions, 3 warmup steps.
RUN = (DIGITS, *TINY_FLAGS, '--fdl_set=log_every_steps=1',
       '--fdl_set=checkpoint.save_interval_steps=5', '--fdl_set=checkpoint.max_to_keep=3',
       '--fdl_set=visualize.reconstructions=True', '--fdl_set=optimizer.schedule.warmup_steps=3')


def train(workdir, *args, wait=True):
  """launch.py on the tiny digits run in `workdir`; a run waited for must succeed."""
  result = launch(*RUN, f'--workdir={workdir}', *args, wait=wait)
  if wait:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def losses(workdir) -> dict[int, float]:
  """step -> training loss; a resumed run's records replace the killed run's."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'train/loss' in record:
        out[record['step']] = record['train/loss']
  return out


def losses_so_far(workdir) -> dict[int, float]:
  return losses(workdir) if os.path.exists(os.path.join(workdir, 'metrics.jsonl')) else {}


def checkpoints(workdir) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit()) \
      if os.path.isdir(folder) else []


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 40-step run."""
  workdir = tmp_path_factory.mktemp('reference')
  train(workdir, '--fdl_set=total_steps=40')
  return workdir


def test_run_writes_config_metrics_checkpoints_and_samples(reference):
  assert sorted(losses(reference)) == list(range(1, 41))
  assert checkpoints(reference) == [30, 35, 40]  # max_to_keep=3
  for name in ('config.json', 'config.txt'):
    assert os.path.getsize(os.path.join(reference, name)) > 0
  assert 'total_steps = 40' in open(os.path.join(reference, 'config.txt')).read()
  assert os.path.exists(os.path.join(reference, 'samples', 'step_00000040_cfg3.png'))
  assert os.path.exists(os.path.join(reference, 'samples', 'step_00000001_reconstructions.png'))
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(reference))
  values = list(losses(reference).values())
  assert all(np.isfinite(values)) and np.mean(values[-10:]) < np.mean(values[:10])


def test_sigkill_loses_only_the_steps_since_the_last_checkpoint(reference, tmp_path):
  process = train(tmp_path, '--fdl_set=total_steps=40', wait=False)
  deadline = time.time() + 300
  while not checkpoints(tmp_path) and time.time() < deadline:
    time.sleep(0.02)
  assert process.poll() is None, 'the run finished before it could be killed'
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = checkpoints(tmp_path)
  assert killed_at and max(killed_at) < 40
  train(tmp_path, '--fdl_set=total_steps=40')
  assert losses(tmp_path) == losses(reference)


def start_and_wait_for_training(workdir, *args):
  """The tiny 40-step run without scheduled checkpoints, once it has logged a step."""
  process = train(workdir, '--fdl_set=total_steps=40',
                  '--fdl_set=checkpoint.save_interval_steps=1000', *args, wait=False)
  deadline = time.time() + 300
  while not losses_so_far(workdir) and time.time() < deadline:  # training has started
    time.sleep(0.02)
  assert process.poll() is None, process.stderr.read()[-3000:]
  return process


@pytest.mark.parametrize('stop_signal', [signal.SIGTERM, signal.SIGINT, signal.SIGUSR2])
def test_a_stop_signal_saves_its_step_exits_75_and_the_relaunch_resumes(reference, tmp_path,
                                                                       stop_signal):
  process = start_and_wait_for_training(tmp_path)
  process.send_signal(stop_signal)
  assert process.wait(timeout=300) == errors.PREEMPTED_STATUS
  stderr = process.stderr.read()
  assert 'Traceback' not in stderr, stderr[-3000:]
  saved = checkpoints(tmp_path)
  assert len(saved) == 1 and 0 < saved[0] < 40  # the checkpoint of the step it stopped at
  assert (f'stopped: {signal.Signals(stop_signal).name}: stopped at step {saved[0]} of 40 and '
          'saved its checkpoint') in stderr
  train(tmp_path, '--fdl_set=total_steps=40')
  assert losses(tmp_path) == losses(reference)


def test_sample_mode_writes_npz_and_grid(reference):
  # without --guidance_scale: the preset's sampling guidance (the digits demo's 3)
  result = train(reference, '--mode=sample', '--num_samples=6', '--labels=3,7')
  with np.load(os.path.join(reference, 'samples.npz')) as samples:
    assert samples['images'].dtype == np.uint8 and samples['images'].shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(samples['labels'], [3, 7, 3, 7, 3, 7])
  assert os.path.exists(os.path.join(reference, 'samples.png'))
  assert 'Wrote 6 samples of step 40 (guidance 3)' in result.stderr


def test_sample_mode_without_checkpoint_fails_clearly(tmp_path):
  result = launch(*RUN, f'--workdir={tmp_path}', '--mode=sample')
  assert result.returncode != 0 and 'no checkpoint in' in result.stderr
