"""Damage is not a mismatch (lib/checkpoint.py `restore`): a checkpoint saved by another config
is a user error and nothing moves; damage is set aside only by a training launch, skipped in
place by sampling and evaluation (as is a step that a training run rotates out while they read
it); a workdir whose checkpoints were all set aside is not silently trained again from step 0."""

import os
import re
import shutil
import time

import fiddle as fdl
import jax.numpy as jnp
import numpy as np
import pytest

from lib import checkpoint as ckpt
from lib import errors, train
from tests import conftest
from tests.test_nothing_lost import corrupt, launch, save_steps, small_state, steps_in, tiny_config


def state_of_width(step, width):
  return {'step': jnp.int32(step), 'params': {'w': jnp.ones((width, 3)) * step},
          'opt_state': {'mu': jnp.zeros((width, 3))}, 'ema': {'w': jnp.ones((width, 3))}}


def everything_under(folder) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, name), folder)
                for root, _, names in os.walk(folder) for name in names)


@pytest.mark.parametrize('may_set_aside', [True, False])
def test_a_checkpoint_of_another_shape_is_a_user_error_and_nothing_moves(tmp_path, may_set_aside):
  save_steps(tmp_path, [5], lambda step: state_of_width(step, 4))
  before = everything_under(tmp_path)
  manager = ckpt.Checkpointing().manager(str(tmp_path))
  with pytest.raises(errors.CheckpointMismatch) as raised:
    ckpt.restore(manager, ckpt.abstract(state_of_width(0, 8)), may_set_aside=may_set_aside)
  manager.close()
  message = str(raised.value)
  assert 'checkpoint 5' in message and '\n' not in message
  assert 'params/w saved float32[4, 3], expected float32[8, 3]' in message
  assert f'--fdl_config_file={tmp_path}/config.json' in message
  assert everything_under(tmp_path) == before
  assert not (tmp_path / ckpt.SET_ASIDE).exists()


def test_another_tree_or_dtype_is_a_mismatch_too(tmp_path):
  save_steps(tmp_path, [5], lambda step: state_of_width(step, 4))
  manager = ckpt.Checkpointing().manager(str(tmp_path))
  extra = state_of_width(0, 4)
  extra['projector'] = {'w': jnp.zeros(3)}
  with pytest.raises(errors.CheckpointMismatch, match=r'projector/w is not saved \(expected '
                                                      r'float32\[3\]\)'):
    ckpt.restore(manager, ckpt.abstract(extra), may_set_aside=True)
  fewer = state_of_width(0, 4)
  del fewer['opt_state']
  with pytest.raises(errors.CheckpointMismatch, match='opt_state/mu is saved but not expected'):
    ckpt.restore(manager, ckpt.abstract(fewer), may_set_aside=True)
  half = state_of_width(0, 4)
  half['ema']['w'] = half['ema']['w'].astype(jnp.bfloat16)
  with pytest.raises(errors.CheckpointMismatch, match=r'ema/w saved float32\[4, 3\], expected '
                                                      r'bfloat16\[4, 3\]'):
    ckpt.restore(manager, ckpt.abstract(half), may_set_aside=True)
  manager.close()
  assert steps_in(tmp_path) == [5] and not (tmp_path / ckpt.SET_ASIDE).exists()


def test_a_partial_restore_compares_only_the_part_it_reads(tmp_path):
  saved = state_of_width(5, 4)
  saved['opt_state']['mu'] = jnp.zeros((7,))  # differs from the target, but is not read
  save_steps(tmp_path, [5], lambda step: saved)
  manager = ckpt.Checkpointing().manager(str(tmp_path))
  target = state_of_width(0, 4)
  part = ckpt.abstract({name: target[name] for name in ('step', 'ema')})
  step, restored = ckpt.restore(manager, part, partial=True)
  assert step == 5 and set(restored) == {'step', 'ema'}
  wider = ckpt.abstract({'step': target['step'], 'ema': {'w': jnp.ones((8, 3))}})
  with pytest.raises(errors.CheckpointMismatch, match=r'ema/w saved float32\[4, 3\]'):
    ckpt.restore(manager, wider, partial=True)
  manager.close()


def test_a_step_removed_while_it_is_read_is_skipped_for_the_newest_present(tmp_path):
  save_steps(tmp_path, (50, 60))
  reader = ckpt.Checkpointing().manager(str(tmp_path), create=False)
  assert reader.all_steps() == [50, 60]
  # A training run rotates step 60 out and saves step 70 after the reader listed the steps.
  shutil.rmtree(tmp_path / 'checkpoints' / '60')
  save_steps(tmp_path, (70,))
  step, state = ckpt.restore(reader, ckpt.abstract(small_state(0)))
  reader.close()
  assert step == 70
  np.testing.assert_array_equal(state['w'], small_state(70)['w'])
  assert steps_in(tmp_path) == [50, 70] and not (tmp_path / ckpt.SET_ASIDE).exists()


def test_all_damaged_checkpoints_refuse_step_0_unless_restarting_from_scratch(tmp_path):
  experiment = fdl.build(tiny_config(5))
  run = train.Run(experiment, str(tmp_path))
  manager = experiment.checkpoint.manager(str(tmp_path))
  ckpt.save(manager, 5, run.initial_state(), force=True)
  manager.wait_until_finished()
  corrupt(os.path.join(tmp_path, 'checkpoints', '5'), 'truncated')
  aside = tmp_path / ckpt.SET_ASIDE
  for found in ('set aside now', 'set aside before'):
    with pytest.raises(errors.CheckpointError) as raised:
      run.restore_or_init(manager)
    message = str(raised.value)
    assert 'refusing to start again at step 0' in message, found
    assert str(aside) in message and '--restart_from_scratch' in message, found
    assert steps_in(tmp_path) == [] and os.listdir(aside) == ['5']
  run.restart_from_scratch = True
  assert run.restore_or_init(manager) == 0
  manager.close()
  assert os.listdir(aside) == ['5']  # still kept


# ------------------------------------------------------------------------------- launches
@pytest.mark.slow
def test_a_launch_with_another_network_exits_2_and_moves_nothing(tmp_path):
  trained = launch(tmp_path, preset='digits(total_steps=10)')
  assert trained.returncode == 0, trained.stderr[-2000:]
  before = everything_under(tmp_path / 'checkpoints')
  config = (tmp_path / 'config.json').read_text()
  wider = '--fdl_set=network.hidden_size=64'
  for args in (['--mode=sample', wider], ['--accept_config_change', wider]):
    result = launch(tmp_path, *args, preset='digits(total_steps=20)')
    assert result.returncode == 2, (args, result.stderr[-2000:])
    assert 'Traceback' not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(error) == 1 and error == result.stderr.strip().splitlines()[-1:]
    assert 'does not fit the launched config' in error[0]
    assert 'buffers/pos_embed saved float32[1, 16, 32], expected float32[1, 16, 64]' in error[0]
    assert everything_under(tmp_path / 'checkpoints') == before
    assert not (tmp_path / ckpt.SET_ASIDE).exists()
    assert (tmp_path / 'config.json').read_text() == config


@pytest.mark.slow
def test_a_relaunch_after_all_checkpoints_were_damaged_needs_restart_from_scratch(tmp_path):
  trained = launch(tmp_path, preset='digits(total_steps=5)')
  assert trained.returncode == 0, trained.stderr[-2000:]
  corrupt(os.path.join(tmp_path, 'checkpoints', '5'), 'garbage')
  for _ in range(2):  # sets it aside, then finds it set aside
    refused = launch(tmp_path, preset='digits(total_steps=5)')
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f'kept in {tmp_path / ckpt.SET_ASIDE}' in refused.stderr
    # the error message (TensorStore's reads abandoned by the failed restore may print
    # 'Event loop is closed' reports around it)
    assert refused.stderr.count('error:') == 1
    message = refused.stderr[refused.stderr.index('error:'):]
    assert 'refusing to start again at step 0' in message and '--restart_from_scratch' in message
    assert steps_in(tmp_path) == [] and os.listdir(tmp_path / ckpt.SET_ASIDE) == ['5']
  restarted = launch(tmp_path, '--restart_from_scratch', preset='digits(total_steps=5)')
  assert restarted.returncode == 0, restarted.stderr[-2000:]
  assert steps_in(tmp_path) == [5] and os.listdir(tmp_path / ckpt.SET_ASIDE) == ['5']


@pytest.mark.slow
def test_sampling_while_training_rotates_its_one_checkpoint_never_fails_or_moves_a_file(
    tmp_path):
  workdir = tmp_path / 'run'
  log = open(tmp_path / 'train.log', 'w')
  trainer = conftest.launch(
      '--fdl_config=experiments/dit.py:digits(total_steps=100000)', *conftest.TINY_FLAGS,
      '--fdl_set=checkpoint.save_interval_steps=1', '--fdl_set=checkpoint.max_to_keep=1',
      '--fdl_set=checkpoint.keep_period=None', f'--workdir={workdir}', wait=False, stderr=log)
  try:
    deadline = time.time() + 300
    while ckpt.latest_step(str(workdir)) is None and trainer.poll() is None and \
        time.time() < deadline:
      time.sleep(0.2)
    sampled = []
    for _ in range(3):  # each samples the newest step, which the trainer replaces meanwhile
      result = conftest.launch('--mode=sample', f'--workdir={workdir}', '--num_samples=4')
      assert result.returncode == 0, result.stderr[-3000:]
      sampled.append(re.search(r'Wrote 4 samples of step (\d+)', result.stderr).group(1))
      assert not (workdir / ckpt.SET_ASIDE).exists()
    assert trainer.poll() is None, open(tmp_path / 'train.log').read()[-3000:]
  finally:
    trainer.kill()
    trainer.wait()
    log.close()
  assert len(set(sampled)) == 3, sampled  # three checkpoints of a training run, in turn
  assert not (workdir / ckpt.SET_ASIDE).exists()
