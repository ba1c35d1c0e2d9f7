"""Released weights sample what the release samples: importing carries its conventions.

Each test writes a random-weight checkpoint in an official layout (the torch references of
`test_import_dit.py` and `test_lightning_dit.py`, every parameter randomised), imports it the
way a user does (`launch.py --mode=import`'s `import_release`, or `init_from` through
`launch.resolve_config`'s `releases.apply_init_from`), and compares the velocity the sampler
integrates (`sampler.field`, t = 1 noise -> t = 0 data) at several times with the reference
model's own prediction under its own convention, converted to that direction:

  willisma/SiT, hustvl/LightningDiT   s = 1 - t at the data end:  dx/dt = -v_ref(x, 1 - t)
  sihyun-yu/REPA                      t = 1 noise, as ours:       dx/dt =  v_ref(x, t)
  facebookresearch/DiT (DDPM eps)     step k = 999 t:             dx/dt = L'/2 (x - eps_ref / s)
      with log abar linear between DiT's steps (linear betas 1e-4 .. 0.02), s = sqrt(1 - abar)
"""

import argparse
import os

import fiddle as fdl
import jax.numpy as jnp
import numpy as np
import pytest

from lib.config import overrides, presets, saved
from lib.experiment import ConfigError
from lib.import_release import import_release
from lib.weights import files, registry, releases
from lib.train import Run
from tests.weights import test_import_dit as dit_reference
from tests.models import test_lightning_dit as lightning_reference

torch = pytest.importorskip('torch')

TIMES = (0.07, 0.3, 0.55, 0.8, 0.97)
SMALL = ['data.image_size=64', 'data.num_classes=10', 'network.hidden_size=64',
         'network.depth=2', 'network.num_heads=4', 'evaluate=[]']


def small_config(preset: str, *extra: str) -> fdl.Config:
  """`preset` shrunk to the references' size: 8x8x4 latents, 10 classes, width 64, depth 2."""
  config = presets.load_preset(preset)
  for assignment in SMALL + list(extra):
    overrides.apply_override(config, assignment)
  return config


def inputs():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 8, 8, 4)).astype(np.float32)  # NHWC
  y = np.array([2, 0, 9, 10])  # the last one is the null class
  return x, y


def sampler_velocity(experiment, workdir, x, y, t) -> np.ndarray:
  """What the run's sampler integrates at time t, from the EMA weights of its checkpoint."""
  run = Run(experiment, str(workdir))
  manager = experiment.checkpoint.manager(str(workdir))
  run.restore_or_init(manager)
  manager.close()
  model = run.network(run.ema_params(), run.state['buffers'])
  field = experiment.sampler.field(experiment.interface, model)
  return np.asarray(field(jnp.asarray(x), jnp.asarray(y, jnp.int32), t))


def torch_out(reference, x, t, y) -> np.ndarray:
  """The reference's first 4 output channels (NHWC) at times t (B,)."""
  with torch.no_grad():
    out = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                    torch.from_numpy(np.asarray(t, np.float32)), torch.from_numpy(y))
  out = getattr(out, 'sample', out)
  return out.numpy()[:, :4].transpose(0, 2, 3, 1)


def dit_release(tmp_path, name: str, **extra) -> tuple[object, str]:
  """A random DiT-layout reference with a learned-sigma head, saved as `name`; `extra`
  entries (training `args`, REPA projectors) are added to the saved dict."""
  reference = dit_reference._reference(out_channels=8, seed=5)
  state_dict = {k: torch.from_numpy(v) for k, v in
                dit_reference.diffusers_to_official(reference).items()}
  state_dict.update(extra.pop('keys', {}))
  path = str(tmp_path / name)
  torch.save({'ema': state_dict, **extra} if extra else state_dict, path)
  return reference, path


def assert_close(got, want):
  scale = float(np.abs(want).max())
  assert scale > 0.1, 'the reference output is (nearly) zero'
  error = float(np.abs(got - want).max()) / scale
  assert error <= 2e-4, f'max |ours - reference| / max |reference| = {error:.3g}'


# ------------------------------------------------------------------------------- flow matching
def test_sit_release_imported_by_the_command_samples_sit_velocity(tmp_path):
  reference, path = dit_release(tmp_path, 'SiT-XL-2-256x256.pt')
  workdir = tmp_path / 'run'
  _, changed = import_release(path, small_config('experiments/dit.py:s2'),
                                             str(workdir))
  assert any('interface.network_time' in line for line in changed)
  loaded = saved.load_config_file(str(workdir / 'config.json'))
  assert loaded.interface.network_time == 'data_at_1' and loaded.network.learn_sigma
  assert loaded.encoder.final_std == 0.18215 and tuple(loaded.encoder.raw_std) == (1.0,) * 4
  provenance = open(workdir / 'config.txt').read()
  assert f'--checkpoint={path} (willisma/SiT release conventions)' in provenance

  experiment = fdl.build(loaded)
  x, y = inputs()
  for t in TIMES:
    want = -torch_out(reference, x, np.full(4, 1 - t), y)  # dx/ds = data - noise; s = 1 - t
    assert_close(sampler_velocity(experiment, workdir, x, y, t), want)


def test_repa_release_keeps_time_running_from_noise(tmp_path):
  projectors = {'projectors.0.0.weight': torch.zeros(16, 64)}
  reference, path = dit_release(tmp_path, 'last.pt', keys=projectors)
  config = small_config('experiments/dit.py:s2', f'init_from={path}')
  release, _ = releases.apply(config, path, f'init_from={path}')
  assert release.name == 'sihyun-yu/REPA' and config.encoder.final_std == 0.18215
  experiment = fdl.build(config)
  x, y = inputs()
  for t in TIMES[:2]:
    assert_close(sampler_velocity(experiment, tmp_path / 'run', x, y, t),
                 torch_out(reference, x, np.full(4, t), y))


def test_lightning_dit_release_gets_its_time_and_embedding(tmp_path):
  """hustvl/LightningDiT: t = 1 at the data and DiT's sinusoidal time embedding (256), where
  the preset (diffuse_nnx's) has a 512-wide Gaussian-Fourier one."""
  modules = lightning_reference.torch_modules()
  reference = lightning_reference.randomize_torch(modules.LightningDiTRef(8, 2, 4, 64, 2, 4, 10))
  path = str(tmp_path / 'lightningdit-xl-imagenet256-64ep.pt')
  torch.save({'ema': reference.state_dict(), 'config': {'model': {'model_type': 'tiny'}}}, path)
  config = small_config('experiments/lightning_dit.py:s2', f'init_from={path}')
  assert config.network.continuous_time_embed and config.network.freq_embed_size == 512
  releases.apply_init_from(config)
  assert config.interface.network_time == 'data_at_1'
  assert not config.network.continuous_time_embed and config.network.freq_embed_size == 256
  experiment = fdl.build(config)
  x, y = inputs()
  for t in TIMES:
    want = -torch_out(reference, x, np.full(4, 1 - t), y)
    assert_close(sampler_velocity(experiment, tmp_path / 'run', x, y, t), want)


# ------------------------------------------------------------------------------- DDPM
def dit_velocity(reference, x, y, t: float) -> np.ndarray:
  """facebookresearch/DiT's probability-flow velocity at t, from its eps prediction at the
  (fractional) step 999 t and its linear beta schedule."""
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  log_alpha_bar = np.cumsum(np.log(1 - betas))
  tau = 999 * t
  k = min(int(np.floor(tau)), 998)
  slope = log_alpha_bar[k + 1] - log_alpha_bar[k]
  log_value = log_alpha_bar[k] + (tau - k) * slope
  s = np.sqrt(1 - np.exp(log_value))
  eps = torch_out(reference, x, np.full(4, tau), y)
  return 0.5 * 999 * slope * (x - eps / s)


def test_dit_release_is_sampled_as_ddpm_noise_prediction(tmp_path):
  args = argparse.Namespace(model='DiT-XL/2', image_size=256, global_batch_size=256)
  reference, path = dit_release(tmp_path, '0400000.pt', args=args)
  assert files.read_contents(path).args['model'] == 'DiT-XL/2'
  config = small_config('experiments/dit.py:s2', f'init_from={path}')
  releases.apply_init_from(config)
  assert fdl.get_callable(config.interface).__name__ == 'DDPM'
  experiment = fdl.build(config)
  x, y = inputs()
  for t in TIMES:
    assert_close(sampler_velocity(experiment, tmp_path / 'run', x, y, t),
                 dit_velocity(reference, x, y, t))


# ------------------------------------------------------------------------------- refusals
def test_unknown_dit_layout_checkpoint_is_refused_until_the_convention_is_stated(tmp_path):
  _, path = dit_release(tmp_path, 'model.pt')
  config = small_config('experiments/dit.py:s2', f'init_from={path}')
  with pytest.raises(ConfigError) as error:
    releases.apply_init_from(config)
  assert '--fdl_set=interface.network_time=data_at_1' in str(error.value)
  assert 'DiT-XL-2-256x256.pt' in str(error.value)

  config = small_config('experiments/dit.py:s2', f'init_from={path}',
                        'interface.network_time=data_at_1')
  releases.apply_init_from(config)
  assert config.network.learn_sigma  # what the weights show is still set
  assert config.encoder.final_std == 0.5  # the latent scaling is the user's to choose
  assert fdl.build(config).interface.network_time == 'data_at_1'


def test_flag_contradicting_the_release_is_refused(tmp_path):
  _, path = dit_release(tmp_path, 'SiT-XL-2-256x256.pt')
  config = small_config('experiments/dit.py:s2', 'interface.network_time=data_at_0')
  with pytest.raises(ConfigError, match=r"willisma/SiT release, which needs "
                     r"interface.network_time='data_at_1'; --fdl_set=interface.network_time="
                     r"data_at_0 contradicts it"):
    releases.apply(config, path, f'init_from={path}')


def test_import_refuses_an_experiment_built_without_the_conventions(tmp_path):
  _, path = dit_release(tmp_path, 'SiT-XL-2-256x256.pt')
  experiment = fdl.build(small_config('experiments/dit.py:s2', 'network.learn_sigma=True'))
  with pytest.raises(ConfigError) as error:
    registry.import_file(path, experiment)
  message = str(error.value)
  assert "interface.network_time is 'data_at_0', the release needs 'data_at_1'" in message
  assert 'encoder.final_std is 0.5, the release needs 0.18215' in message


def test_a_file_that_is_not_a_checkpoint_is_refused_clearly(tmp_path):
  path = tmp_path / 'notes.pt'
  path.write_text('not a checkpoint')
  config = small_config('experiments/dit.py:s2', f'init_from={path}')
  with pytest.raises(ConfigError, match=f'cannot read the weights file {path}: '):
    releases.apply_init_from(config)


def test_a_missing_init_from_file_leaves_the_config_for_a_resuming_run(tmp_path):
  config = small_config('experiments/dit.py:s2', f'init_from={tmp_path / "gone.pt"}')
  before = saved.dump_config(config)
  releases.apply_init_from(config)
  assert saved.dump_config(config) == before
  assert os.path.basename(config.init_from) == 'gone.pt'
