"""What a run draws, traces and evaluates beyond training: grids of the EMA and of the trained
weights (also when a run starts or resumes), a profile of early steps, evaluation of the loaded
weights before training continues, and sampling / evaluating a chosen checkpoint."""

import glob
import json
import os
import shutil

import fiddle as fdl
import numpy as np
import pytest
from PIL import Image

from experiments import fiddlers
from lib import errors, evaluate, hooks, sample, train
from lib.config import presets


def tiny_digits(total_steps: int) -> fdl.Config:
  config = presets.load_preset('experiments/dit.py:digits')
  fiddlers.tiny(config, total_steps=total_steps, batch_size=16)
  config.checkpoint.max_to_keep = 2
  config.visualize.guidance_scales = (1.0, 3.0)
  config.visualize.every_steps = 1000  # grids at the start and at the end only
  config.evaluate = [fdl.Config(hooks.ValidationLoss, every_steps=1000, batch_size=64,
                                on_load=True)]
  config.profile = fdl.Config(hooks.Profile, first_profile=1, num_profile_steps=2,
                              profile_duration_ms=None)
  return config


def records(workdir) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


def grid(workdir, name) -> np.ndarray:
  return np.asarray(Image.open(os.path.join(workdir, 'samples', name)))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A fresh 4-step run; checkpoints of steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp('run'))
  assert train.train(fdl.build(tiny_digits(4)), workdir) == 4
  return workdir


def test_grids_of_ema_and_trained_weights_from_the_start(run):
  names = sorted(os.listdir(os.path.join(run, 'samples')))
  assert names == [f'step_{step:08d}_{kind}.png' for step in (0, 4)
                   for kind in ('cfg1', 'cfg3', 'trained_cfg1')]
  # The EMA starts as a copy of the initial weights, then lags behind them.
  np.testing.assert_array_equal(grid(run, 'step_00000000_cfg1.png'),
                                grid(run, 'step_00000000_trained_cfg1.png'))
  assert not np.array_equal(grid(run, 'step_00000004_cfg1.png'),
                            grid(run, 'step_00000004_trained_cfg1.png'))


def test_profile_traces_early_steps(run):
  assert glob.glob(os.path.join(run, 'plugins', 'profile', '*', '*.xplane.pb'))


def test_evaluate_on_load_before_training_continues(run, tmp_path):
  fresh = [r['step'] for r in records(run) if 'eval/loss' in r]
  assert fresh == []  # on_load does not evaluate a fresh initialisation
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(run, resumed)
  assert train.train(fdl.build(tiny_digits(6)), resumed) == 6
  new = records(resumed)[len(records(run)):]
  evaluated = [i for i, r in enumerate(new) if 'eval/loss' in r]
  trained = [i for i, r in enumerate(new) if 'train/loss' in r]
  assert [new[i]['step'] for i in evaluated] == [4] and evaluated[0] < trained[0]
  assert [new[i]['step'] for i in trained] == [5, 6]


def test_sample_and_eval_choose_the_checkpoint(run, tmp_path):
  experiment = fdl.build(tiny_digits(4))
  images = {}
  for step in (2, 4):
    with np.load(sample.sample(experiment, run, 8, step=step)) as samples:
      images[step] = samples['images']
  assert not np.array_equal(images[2], images[4])
  with np.load(sample.sample(experiment, run, 8)) as samples:  # the newest
    np.testing.assert_array_equal(samples['images'], images[4])
  with pytest.raises(errors.CheckpointError, match=r'no checkpoint of step 3 in .*checkpoints; '
                                              r'its checkpoints: 2, 4 \(choose one with --step'):
    sample.sample(experiment, run, 8, step=3)
  evaluated = str(tmp_path / 'evaluated')
  shutil.copytree(run, evaluated)
  scalars = evaluate.evaluate(experiment, evaluated, step=2)
  assert [r['step'] for r in records(evaluated) if 'eval/loss' in r] == [2]
  assert set(scalars) == {'eval/loss', 'eval/loss_ema'}
  with pytest.raises(errors.CheckpointError, match=r'its checkpoints: 2, 4'):
    evaluate.evaluate(experiment, evaluated, step=5)


def test_a_trace_still_recording_when_the_run_ends_is_written_and_stopped(tmp_path):
  config = tiny_digits(2)
  config.profile.num_profile_steps = 50  # still recording at the last step
  config.visualize = None
  train.train(fdl.build(config), str(tmp_path))
  assert glob.glob(os.path.join(tmp_path, 'plugins', 'profile', '*', '*.xplane.pb'))
  import jax
  jax.profiler.start_trace(str(tmp_path / 'again'))  # raises if the run left one running
  jax.profiler.stop_trace()
