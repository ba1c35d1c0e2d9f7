"""Nothing good is lost: finite checkpoints only, verified restores with fallback, one
writer per workdir, checks before the workdir changes, and errors instead of tracebacks."""

import glob
import json
import os
import shutil
import subprocess
import time
import types

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import dit
from lib import checkpoint as ckpt
from lib import errors, paths, train, workdir as workdirs
from lib.config import overrides, presets
from lib.eval import actions
from tests import conftest

CHECKPOINT_EVERY_5 = 'checkpoint.save_interval_steps=5'


def launch(workdir, *args, preset='digits(total_steps=20)', wait=True):
  """launch.py on the tiny digits `preset` of experiments/dit.py, checkpointed every 5 steps."""
  return conftest.launch(f'--fdl_config=experiments/dit.py:{preset}', *conftest.TINY_FLAGS,
                         f'--fdl_set={CHECKPOINT_EVERY_5}', f'--workdir={workdir}', *args,
                         wait=wait)


def tiny_config(total_steps=20):
  config = conftest.tiny_digits(CHECKPOINT_EVERY_5,
                                preset=f'experiments/dit.py:digits(total_steps={total_steps})')
  config.log_every_steps = 5
  config.visualize = None
  config.evaluate = []
  return config


def steps_in(workdir) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) \
      else []


# ------------------------------------------------------------------------------- corruption
def _data_files(step_dir):
  return sorted(glob.glob(f'{step_dir}/default/**/d/*', recursive=True), key=os.path.getsize)


def corrupt(step_dir: str, how: str) -> None:
  """Damages a saved checkpoint folder the ways a disk, a copy or a person does."""
  largest = _data_files(step_dir)[-1]
  if how == 'truncated':
    with open(largest, 'r+b') as f:
      f.truncate(os.path.getsize(largest) // 2)
  elif how == 'garbage':
    with open(largest, 'r+b') as f:
      f.write(np.random.default_rng(0).bytes(os.path.getsize(largest)))
  elif how == 'no_metadata':
    os.remove(os.path.join(step_dir, 'default', '_METADATA'))
  elif how == 'garbage_metadata':
    with open(os.path.join(step_dir, 'default', '_METADATA'), 'w') as f:
      f.write('{"tree_metadata": {"w": ')
  elif how == 'no_manifests':
    for manifest in glob.glob(f'{step_dir}/**/manifest.ocdbt', recursive=True):
      os.remove(manifest)
  elif how == 'emptied':
    for entry in os.listdir(step_dir):
      path = os.path.join(step_dir, entry)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  elif how == 'flipped_bit':
    data = bytearray(open(largest, 'rb').read())
    data[len(data) // 2] ^= 0x10
    open(largest, 'wb').write(bytes(data))
  else:
    raise ValueError(how)


CORRUPTIONS = ['truncated', 'garbage', 'no_metadata', 'garbage_metadata', 'no_manifests', 'emptied',
               'flipped_bit']


def small_state(step):
  return {'step': jnp.int32(step), 'w': jnp.linspace(0.0, 1.0, 4096) * step,
          'half': jnp.full((8,), step, jnp.bfloat16)}


def save_steps(workdir, steps, state=small_state) -> None:
  """Checkpoints `state(step)` of each of `steps` in `workdir`."""
  manager = ckpt.Checkpointing(save_interval_steps=10).manager(str(workdir))
  for step in steps:
    ckpt.save(manager, step, state(step), force=True)
  manager.wait_until_finished()
  manager.close()


@pytest.mark.parametrize('may_set_aside', [True, False], ids=['training', 'read_only'])
@pytest.mark.parametrize('how', CORRUPTIONS)
def test_a_damaged_newest_checkpoint_is_skipped_and_only_training_sets_it_aside(
    tmp_path, how, may_set_aside):
  save_steps(tmp_path, (50, 60))
  corrupt(os.path.join(tmp_path, 'checkpoints', '60'), how)
  manager = ckpt.Checkpointing(save_interval_steps=10).manager(str(tmp_path))
  step, state = ckpt.restore(manager, ckpt.abstract(small_state(0)),
                             may_set_aside=may_set_aside)
  assert step == 50
  np.testing.assert_array_equal(state['w'], small_state(50)['w'])
  aside = os.path.join(tmp_path, ckpt.SET_ASIDE, '60')
  if may_set_aside:
    assert os.path.isdir(aside), 'the damaged checkpoint is moved, never deleted'
    assert open(os.path.join(aside, 'REASON.txt')).read().strip()
    assert manager.all_steps() == [50]
  else:
    assert not os.path.exists(os.path.join(tmp_path, ckpt.SET_ASIDE))
    assert os.path.isdir(os.path.join(tmp_path, 'checkpoints', '60'))  # left in place
  manager.close()


def test_a_flipped_bit_is_caught_by_the_digest(tmp_path):
  manager = ckpt.Checkpointing().manager(str(tmp_path))
  ckpt.save(manager, 7, small_state(7), force=True)
  manager.wait_until_finished()
  corrupt(os.path.join(tmp_path, 'checkpoints', '7'), 'flipped_bit')
  with pytest.raises(errors.CheckpointError, match=r'digest mismatch.*\(left in place\)'):
    ckpt.restore(manager, ckpt.abstract(small_state(0)))
  manager.close()


def test_digest_changes_with_any_single_bit_and_not_with_sharding():
  x = jnp.linspace(-3.0, 3.0, 1000, dtype=jnp.float32)
  digests, _ = ckpt.fingerprint({'x': x})
  bits = np.asarray(x).view(np.uint32).copy()
  for index, bit in ((0, 0), (999, 31), (500, 7)):
    flipped = bits.copy()
    flipped[index] ^= np.uint32(1 << bit)
    other, _ = ckpt.fingerprint({'x': jnp.asarray(flipped.view(np.float32))})
    assert other["['x']"] != digests["['x']"]
  mesh = jax.make_mesh((jax.device_count(),), ('d',))
  sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P('d')))
  assert ckpt.fingerprint({'x': sharded})[0] == digests


def test_a_non_finite_state_is_never_saved(tmp_path):
  manager = ckpt.Checkpointing().manager(str(tmp_path))
  ckpt.save(manager, 5, small_state(5), force=True)
  state = small_state(10)
  state['w'] = state['w'].at[3].set(jnp.nan)
  with pytest.raises(errors.NonFiniteError, match=r"\['w'\].*newest checkpoint, step 5"):
    ckpt.save(manager, 10, state, force=True)
  manager.wait_until_finished()
  assert manager.all_steps() == [5]
  manager.close()


def test_fallback_resumes_exactly_as_an_uninterrupted_run(tmp_path):
  reference = str(tmp_path / 'reference')
  train.train(fdl.build(tiny_config(20)), reference)
  manager = ckpt.Checkpointing().manager(reference, create=False)
  abstract = train.Run(fdl.build(tiny_config(20)), reference).abstract_state()
  _, final = ckpt.restore(manager, abstract, 20)
  manager.close()
  for how in ('truncated', 'emptied'):
    damaged = str(tmp_path / how)
    shutil.copytree(reference, damaged)
    corrupt(os.path.join(damaged, 'checkpoints', '20'), how)
    assert train.train(fdl.build(tiny_config(20)), damaged) == 20  # resumed at 15
    manager = ckpt.Checkpointing().manager(damaged, create=False)
    _, resumed = ckpt.restore(manager, abstract, 20)
    manager.close()
    assert os.path.isdir(os.path.join(damaged, ckpt.SET_ASIDE, '20'))
    jax.tree.map(np.testing.assert_array_equal, resumed, final)


# ------------------------------------------------------------------------------- NaN
def test_skipped_non_finite_updates_keep_the_state_finite_and_are_counted(tmp_path):
  config = tiny_config(6)
  config.skip_nonfinite_updates = 3
  config.optimizer.learning_rate = 1e30  # step 1 applies; every later loss is not finite
  with pytest.raises(errors.NonFiniteError, match='more than skip_nonfinite_updates=3'):
    train.train(fdl.build(config), str(tmp_path / 'run'))
  assert steps_in(tmp_path / 'run') == []
  config.skip_nonfinite_updates = 10
  config.total_steps = 5
  assert train.train(fdl.build(config), str(tmp_path / 'skip')) == 5
  rows = [json.loads(line) for line in open(tmp_path / 'skip' / 'metrics.jsonl')
          if 'train/loss' in line]
  assert rows[-1]['step'] == 5 and rows[-1]['train/skipped_updates'] == 4.0
  assert np.isfinite(rows[-1]['train/loss'])  # the mean over the applied update
  assert steps_in(tmp_path / 'skip') == [5]  # saved: its weights are finite


@pytest.mark.slow
def test_a_diverging_run_keeps_its_good_checkpoints_and_names_the_newest(tmp_path):
  first = launch(tmp_path, '--fdl_set=log_every_steps=10')
  assert first.returncode == 0, first.stderr[-2000:]
  assert steps_in(tmp_path) == [15, 20]
  result = launch(tmp_path, '--fdl_set=log_every_steps=50', '--accept_config_change',
                  '--fdl_set=optimizer.learning_rate=1e9', preset='digits(total_steps=60)')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith('error: step 2') and 'training loss nan' in message
  assert 'the newest checkpoint, step 20' in message
  assert steps_in(tmp_path) == [15, 20]


# ------------------------------------------------------------------------------- one writer
def test_a_held_workdir_is_refused_with_the_holder(tmp_path):
  with workdirs.WorkdirLock(str(tmp_path)):
    with pytest.raises(errors.WorkdirBusy, match=f'process {os.getpid()}'):
      workdirs.WorkdirLock(str(tmp_path)).acquire()
  workdirs.WorkdirLock(str(tmp_path)).acquire()  # released on exit


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
  dead = subprocess.run(['sh', '-c', 'echo $$'], capture_output=True, text=True).stdout.strip()
  (tmp_path / 'lock').write_text(json.dumps({'host': 'h', 'pid': int(dead), 'started': 't'}))
  lock = workdirs.WorkdirLock(str(tmp_path))
  lock.acquire()
  assert f'process {dead}' in caplog.text
  assert json.loads((tmp_path / 'lock').read_text())['pid'] == os.getpid()
  lock.release()


@pytest.mark.slow
def test_a_second_launch_on_a_training_workdir_is_refused_at_once(tmp_path):
  first = launch(tmp_path, '--fdl_set=log_every_steps=1', preset='digits(total_steps=150)',
                 wait=False)
  deadline = time.time() + 120
  while not os.path.exists(tmp_path / 'metrics.jsonl') and time.time() < deadline:
    time.sleep(0.2)
  started = time.time()
  second = launch(tmp_path, '--fdl_set=log_every_steps=1', preset='digits(total_steps=150)')
  assert second.returncode == 2 and time.time() - started < 30
  assert 'is in use by another training launch' in second.stderr
  assert f'process {first.pid}' in second.stderr
  assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
  rows = [json.loads(line)['step'] for line in open(tmp_path / 'metrics.jsonl')
          if 'train/loss' in line]
  assert rows == list(range(1, 151))


# ------------------------------------------------------------------------------- checks first
def test_workdir_must_be_a_usable_directory(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(errors.UserError, match='is an existing file'):
    workdirs.check_usable(str(tmp_path / 'file'))
  workdirs.check_usable(str(tmp_path / 'new' / 'run'))
  assert not (tmp_path / 'new').exists()


def test_messages_show_paths_as_paths_not_as_python_objects(tmp_path):
  """launch.py passes a resolved `paths.Path`; the message shows '/x/file', not PosixGPath."""
  (tmp_path / 'file').write_text('x')
  for given, shown in ((tmp_path / 'file', tmp_path / 'file'),
                       (tmp_path / 'file' / 'run', tmp_path / 'file')):
    with pytest.raises(errors.UserError) as refusal:
      workdirs.check_usable(paths.resolve(str(given), '--workdir'))
    assert f"--workdir='{given}'" in str(refusal.value) and f"'{shown}'" in str(refusal.value)
    assert 'Path(' not in str(refusal.value)


def test_hooks_that_cannot_take_the_data_are_refused_before_training(tmp_path):
  three_channels = types.SimpleNamespace(data=types.SimpleNamespace(num_classes=10, channels=3))
  with pytest.raises(errors.UserError, match='10-class greyscale digits.*3 channels'):
    actions.DigitsQuality().check(three_channels)


@pytest.mark.slow
def test_a_failed_launch_leaves_the_workdir_as_it_was(tmp_path):
  bad = launch(tmp_path, '--fdl_set=init_from=/nonexistent/DiT-XL-2-256x256.pt')
  assert bad.returncode == 2 and 'Traceback' not in bad.stderr
  assert "init_from='/nonexistent/DiT-XL-2-256x256.pt' is not a file" in bad.stderr
  assert not os.path.exists(tmp_path / 'config.json')
  good = launch(tmp_path)
  assert good.returncode == 0, good.stderr[-2000:]
  sampled = launch(tmp_path / 'missing', '--mode=sample')
  assert sampled.returncode == 2 and 'no checkpoint' in sampled.stderr
  assert not os.path.exists(tmp_path / 'missing')


# ------------------------------------------------------------------------------- messages
@pytest.mark.parametrize('spec, message', [
    ('experiments/dit.py:digits(total_steps="ten")', 'total_steps expects int'),
])
def test_preset_arguments_are_type_checked(spec, message):
  with pytest.raises(errors.UsageError, match=message):
    presets.load_preset(spec)


@pytest.mark.parametrize('assignment, message', [
    ('log_every_steps=0', r'log_every_steps=0; expected a positive number'),
    ('checkpoint.save_interval_steps=0',
     r'checkpoint.save_interval_steps=0; expected a positive number'),
    ('visualize.every_steps=0', r'visualize.every_steps=0; expected a positive number'),
    ('evaluate[1].num_samples=-1', r'evaluate\[1\].num_samples=-1; expected a positive'),
])
def test_values_out_of_range_name_their_path(assignment, message):
  config = dit.digits()
  overrides.apply_override(config, assignment)
  with pytest.raises(errors.UserError, match=message):
    presets.build(config)


def test_a_malformed_dataset_json_is_named(tmp_path):
  from lib.data import latents

  np.save(tmp_path / 'a.npy', np.zeros((4, 4, 4), np.float32))
  (tmp_path / 'dataset.json').write_text('{"labels": [["a.npy", 0]')
  source = latents.LatentFolder(data_dir=str(tmp_path), image_size=32, num_classes=10)
  with pytest.raises(ValueError, match='dataset.json is not valid JSON'):
    source.check()


def test_a_truncated_image_met_while_training_is_named(tmp_path):
  from PIL import Image
  from lib.data import images

  folder = tmp_path / 'train' / 'n0'
  folder.mkdir(parents=True)
  for i in range(4):
    Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(folder / f'{i}.JPEG')
  data = (folder / '2.JPEG').read_bytes()
  (folder / '2.JPEG').write_bytes(data[:len(data) // 3])
  source = images.ImageFolder(data_dir=str(tmp_path), image_size=32, batch_size=4,
                              num_classes=1, random_flip=False)
  with pytest.raises(errors.DataError, match=r'step 1 failed: .*cannot decode .*2\.JPEG'):
    train.next_batch(source.batches(0), 0)


@pytest.mark.slow
@pytest.mark.parametrize('args, message', [
    (['--fdl_config=experiments/dit.py:digits(total_steps="ten")', '--print_config'],
     'total_steps expects int'),
    (['--fdl_config=experiments/dit.py:digits', '--fdl_set=log_every_steps=0', '--workdir=W'],
     'log_every_steps=0; expected a positive number'),
    (['--fdl_config=experiments/dit.py:digits', '--workdir=W', '--mode=sample',
      '--labels=3,x'], '--labels=3,x: expected comma-separated integer class labels'),
    (['--fdl_config=experiments/dit.py:digits', '--workdir=W', '--mode=sample',
      '--num_samples=0'], '--num_samples=0; expected a positive count'),
    (['--fdl_config=experiments/dit.py:digits', '--workdir=W', '--mode=sample',
      '--guidance_scale=nan'], '--guidance_scale=nan; expected a finite number'),
    (['--fdl_config=experiments/dit.py:digits', '--workdir=FILE'], 'is an existing file'),
    (['--config=tests/legacy_configs/dit_imagenet.py:imagenet_256-B_2',
      '--config.nonexistent=3', '--print_config'], "has no field 'nonexistent'"),
    (['--fdl_config=experiments/dit.py:digits', '--workdir=W', '--checkpoint=model.pt'],
     '--checkpoint=model.pt is read by --mode=import only'),
    (['--fdl_config=experiments/dit.py:digits', '--mode=import', '--checkpoint=model.pt'],
     '--mode=import needs --workdir=DIR, the run to create'),
    (['--fdl_config=experiments/dit.py:digits', '--workdir=W', '--mode=sample',
      '--restart_from_scratch'], '--restart_from_scratch is read by --mode=train only'),
])
def test_bad_values_exit_2_with_one_message(tmp_path, args, message):
  (tmp_path / 'FILE').write_text('not a folder')
  args = [a.replace('=W', f'={tmp_path / "run"}').replace('=FILE', f'={tmp_path / "FILE"}')
          for a in args]
  result = conftest.launch(*args, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert message in result.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'run').exists()
