"""Sampling and evaluating a checkpoint (lib/sample.py, lib/evaluate.py) read only the weights
they use through lib/checkpoint.py's one restore: never the optimizer's moments; what they read
is verified against the recorded digests."""

import json
import os

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import fiddlers
from lib import checkpoint as ckpt
from lib import errors, evaluate, hooks, sample, train
from lib.config import presets


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_xl_sampling_restores_a_quarter_of_the_training_state(tmp_path):
  """DiT-XL/2, abstractly: a training state is the weights, Adam's two moments and the EMA;
  sampling restores the EMA and the fixed arrays, evaluation the trained weights as well."""
  run = train.Run(presets.build(presets.load_preset('experiments/dit.py:xl2')), str(tmp_path))
  full = run.abstract_state()
  sampled, evaluated = (run.abstract_state(parts) for parts in (sample.RESTORED,
                                                                   evaluate.RESTORED))
  assert set(full) == {'step', 'params', 'opt_state', 'ema', 'buffers'}
  assert set(sampled) == {'step', 'ema', 'buffers'}
  assert set(evaluated) == {'step', 'params', 'ema', 'buffers'}
  weights = nbytes(full['params'])
  assert weights == 674_816_272 * 4 and nbytes(full['ema']) == weights
  fixed = nbytes(full['step']) + nbytes(full['buffers'])
  assert nbytes(full) - fixed >= 4 * weights  # weights, EMA and two moments (and counters)
  assert nbytes(sampled) == weights + fixed
  assert nbytes(evaluated) == 2 * weights + fixed


def small_state():
  return {'step': jnp.int32(3), 'params': {'w': jnp.linspace(0.0, 1.0, 512)},
          'opt_state': {'mu': jnp.full((512,), 0.5), 'nu': jnp.full((512,), 0.25)},
          'ema': {'w': jnp.linspace(0.0, 2.0, 512)}}


def record_digest(step_dir, path: str, change: int) -> None:
  """Adds `change` to the digest the checkpoint recorded for the array at `path`."""
  file = os.path.join(step_dir, '_CHECKPOINT_METADATA')
  metadata = json.load(open(file))
  digests = metadata['custom_metadata']['digests']
  digests[path] = (digests[path] + change) % 2**32
  json.dump(metadata, open(file, 'w'))


def test_a_partial_restore_reads_and_verifies_only_its_part(tmp_path):
  state = small_state()
  manager = ckpt.Checkpointing().manager(str(tmp_path))
  ckpt.save(manager, 3, state, force=True)
  manager.wait_until_finished()
  part = ckpt.abstract({name: state[name] for name in ('step', 'ema')})
  step, restored = ckpt.restore(manager, part, partial=True)
  assert step == 3 and set(restored) == {'step', 'ema'}
  np.testing.assert_array_equal(restored['ema']['w'], state['ema']['w'])
  # The optimizer's arrays are not read, so their digests are not compared ...
  record_digest(os.path.join(tmp_path, 'checkpoints', '3'), "['opt_state']['mu']", 1)
  assert ckpt.restore(manager, part, partial=True)[0] == 3
  # ... while every array that is read is.
  record_digest(os.path.join(tmp_path, 'checkpoints', '3'), "['ema']['w']", 1)
  with pytest.raises(errors.CheckpointError, match=r"digest mismatch"):
    ckpt.restore(manager, part, partial=True)
  manager.close()


def test_sample_and_evaluate_restore_no_optimizer_state(tmp_path, monkeypatch):
  config = presets.load_preset('experiments/dit.py:digits')
  fiddlers.tiny(config, total_steps=1, batch_size=8)
  config.evaluate = [fdl.Config(hooks.ValidationLoss, every_steps=1000, batch_size=16)]
  experiment = presets.build(config)
  workdir = str(tmp_path)
  saved = train.Run(experiment, workdir).initial_state()
  manager = experiment.checkpoint.manager(workdir)
  ckpt.save(manager, 1, saved, force=True)
  manager.close()
  restored = []
  restore = ckpt.restore
  monkeypatch.setattr(ckpt, 'restore', lambda *args, **kwargs: restored.append(
      restore(*args, **kwargs)) or restored[-1])
  with np.load(sample.sample(experiment, workdir, 4)) as samples:
    assert samples['images'].shape == (4, 8, 8, 1)  # 8x8 greyscale digits
  assert set(evaluate.evaluate(experiment, workdir)) == {'eval/loss', 'eval/loss_ema'}
  (_, sampled), (_, evaluated) = restored
  assert set(sampled) == set(sample.RESTORED) and 'opt_state' not in evaluated
  assert set(evaluated) == set(evaluate.RESTORED)
  for name in evaluate.RESTORED:
    for got, want in zip(jax.tree.leaves(evaluated[name]), jax.tree.leaves(saved[name])):
      np.testing.assert_array_equal(got, want)
  assert nbytes(sampled) < nbytes(saved) / 3
