"""Legacy compatibility: diffuse_nnx configs (ml_collections, `*_class` strings) convert to the
native presets' graphs, train with user-registered classes, fail with useful messages, and run
through launch.py --config."""

import copy
import importlib
import json
import os
import subprocess
import sys

import fiddle as fdl
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments.legacy import converter, registry
from lib import nn
from lib.config import REPO_ROOT, presets, review, saved
from tests.conftest import launch
from tests.legacy_configs import dit_imagenet, dit_imagenet_repa

# Differences between a converted diffuse_nnx preset and its native preset that are intended
# (`path: native -> converted` line prefix, reason).
MEANFLOW_FID_AT_CFG_1 = [(
    f'evaluate[0].{field}: {native} -> ',
    'MeanFlow bakes guidance in by training, so the native preset evaluates FID at cfg 1 only; '
    'diffuse_nnx repeats the same samples at cfg 1.5')
    for field, native in (('all_guidance_scales', '(1.0,)'),
                          ('all_eval_samples_nums', '((10000, 50000),)'),
                          ('eval_every_steps', '((25000, 100000),)'))]
MEANFLOW_RECIPE = [
    ('interface.norm_eps: 0.01 -> 1.0',
     "the native MeanFlow presets take Gsunshine/meanflow's adaptive-weight eps 0.01"),
    ('total_steps: 1200960 -> ', "the native MeanFlow presets train the paper's 240 epochs")]
RAE_RECIPE = [(path, "the native RAE presets take RAE's DiTDH-XL training config: lr "
                'held 40 epochs, linear to 2e-5 at epoch 800, 1400 epochs, clipping at 1')
              for path in ('optimizer.schedule', 'optimizer.grad_clip_norm: ', 'total_steps: ')]
REPA_PAPER_DEPTH = (
    'repa.depth: 8 -> 4',
    'diffuse_nnx aligns block 4 at every size; the native L and XL presets align block 8, the '
    'REPA paper\'s value (experiments/dit_repa.py)')
DIFFUSE_NNX_DECODER_PATH = (
    "encoder.decoder_weights: None -> '/home/nm3607/model.pt'",
    'diffuse_nnx hard-codes its RAE decoder file (its `encoder.pretrained_path`, converted to '
    'decoder_weights); the native preset leaves weight files to the caller')
# Every diffuse_nnx preset names its wandb run and project (`exp_name`, `project_name`).
TRACKER_NAMES = [
    ('writers.wandb_name: None (default of lib.hooks.Writers) -> ',
     "diffuse_nnx's exp_name names the tracker run (used once writers.wandb=True)"),
    ("writers.wandb_project: 'fiddlediff' (default of lib.hooks.Writers) -> ",
     "diffuse_nnx's project_name names the tracker project")]

# In every case: diffuse_nnx's presets name folders of its own machines (/mnt/disks/...).
MACHINE_PATHS = [(
    f'{field}: None -> ',
    "diffuse_nnx's presets name folders of its machines; the native presets leave the data and "
    'the FID statistics to the caller')
    for field in ('data.data_dir', 'evaluate[0].reference_stats')]

SAMPLING_GUIDANCE = (
    'sampler.guidance_scale: 1.5 -> ',
    "diffuse_nnx's sampler has no guidance of its own (its evaluation lists scales); the native "
    "presets sample at the family's published best, SiT-XL/2's cfg 1.5 (common.SIT_GUIDANCE)")
REPA_GUIDANCE = [(
    f'sampler.{field}: {native} -> ',
    "diffuse_nnx's sampler has no guidance of its own; the native REPA presets sample at REPA's "
    'published best, cfg 1.8 for t <= 0.7') for field, native in (
        ('guidance_scale', '1.8'), ('guidance_interval', '(0.0, 0.7)'))]
REPA_RECIPE = [(f'{path}: {native} -> ', f"the native REPA presets follow REPA's code: {reason}")
               for path, native, reason in (
    ('data.random_flip', 'False', 'no flips'),
    ('encoder.raw_mean', '(0.0, 0.0, 0.0, 0.0)', 'SD-VAE latents x 0.18215'),
    ('encoder.raw_std', '(1.0, 1.0, 1.0, 1.0)', 'SD-VAE latents x 0.18215'),
    ('encoder.final_std', '0.18215', 'SD-VAE latents x 0.18215'),
    ('optimizer.grad_clip_norm', '1.0', '--max-grad-norm 1'),
    ('sampler.diffusion', "'linear'", 'its Euler-Maruyama, w(t) = 2t'),
    ('sampler.diffusion_norm', '2.0', 'its Euler-Maruyama, w(t) = 2t'),
    ('sampler.t_start', '1.0', 'its Euler-Maruyama starts at t = 1'),
    ('sampler.last_interval', '0.04', 'its grid linspace(1, 0.04, N) then 0'),
    ('evaluate[0].all_guidance_scales', '(1.0, 1.8)', 'FID at its cfg 1.8'),
    ('total_steps', '4000000', 'its 1.42 checkpoint trained 4M steps'))]

SIZES = {'S': 's2', 'B': 'b2', 'L': 'l2', 'XL': 'xl2'}
CASES = [  # (legacy file, options, native preset, allowed differences)
    *[('dit_imagenet', f'imagenet_256-{size}_2', f'experiments/dit.py:{preset}',
       [SAMPLING_GUIDANCE] + TRACKER_NAMES) for size, preset in SIZES.items()],
    ('dit_imagenet', 'imagenet_64-B_2', 'experiments/dit.py:b2(image_size=64)',
     [SAMPLING_GUIDANCE] + TRACKER_NAMES),
    *[('lightning_dit_imagenet', f'imagenet_256-{size}_2',
       f'experiments/lightning_dit.py:{preset}', [SAMPLING_GUIDANCE] + TRACKER_NAMES)
      for size, preset in SIZES.items()],
    *[('lightning_ddt_imagenet', f'imagenet_256-{size}_2',
       f'experiments/lightning_ddt.py:{SIZES[size]}', [SAMPLING_GUIDANCE] + TRACKER_NAMES)
      for size in ('S', 'XL')],
    *[('mf_imagenet', f'imagenet_256-{size}_2', f'experiments/meanflow.py:{preset}',
       MEANFLOW_FID_AT_CFG_1 + MEANFLOW_RECIPE + TRACKER_NAMES) for size, preset in SIZES.items()],
    *[('dit_imagenet_repa', f'imagenet_raw_256-{size}_2', f'experiments/dit_repa.py:{preset}',
       REPA_GUIDANCE + REPA_RECIPE + ([REPA_PAPER_DEPTH] if size in ('L', 'XL') else []) + TRACKER_NAMES)
      for size, preset in SIZES.items()],
    ('rae_imagenet', 'imagenet_raw_256-XL_1', 'experiments/rae.py:xl1',
     [DIFFUSE_NNX_DECODER_PATH] + RAE_RECIPE + TRACKER_NAMES),
]


def legacy_config(name: str, options: str) -> ml_collections.ConfigDict:
  return importlib.import_module(f'tests.legacy_configs.{name}').get_config(options)


@pytest.mark.parametrize('name,options,native,allowed', CASES,
                         ids=[f'{case[0]}:{case[1]}' for case in CASES])
def test_diffuse_nnx_preset_converts_to_its_native_preset(name, options, native, allowed):
  if not os.path.exists(os.path.join(REPO_ROOT, native.split(':')[0])):
    pytest.skip(f'{native.split(":")[0]} is not written yet')
  converted = converter.convert(legacy_config(name, options))
  allowed = allowed + MACHINE_PATHS
  # Effective values: a native preset that states `take_gw=False` and a converted config that
  # leaves it at the default do not differ.
  lines = review.diff_lines(presets.load_preset(native), converted)
  unexplained = [line for line in lines if not any(line.startswith(p) for p, _ in allowed)]
  assert not unexplained, '\n'.join(unexplained)
  assert all(any(line.startswith(p) for line in lines) for p, _ in allowed), lines
  fdl.build(converted)  # derived sizes agree
  assert saved.normalized(converted) == converted  # saves and reloads as a run's config.json


def test_local_detector_weights_carry_over_and_hub_ids_do_not():
  config = dit_imagenet_repa.get_config('imagenet_raw_256-B_2')
  assert converter.convert(config).repa.detector.weights_path is None  # 'facebook/dinov2-base'
  config.repa.detector.pretrained_path = '/weights/dinov2-base/model.safetensors'
  assert converter.convert(config).repa.detector.weights_path == \
      '/weights/dinov2-base/model.safetensors'


# ------------------------------------------------------------------------------- user classes
class TinyDenoiser(nn.Module):
  """A small MLP velocity network, the kind of class a user brings (network contract:
  `network(x, t, y, rngs=None)` and `num_classes`)."""

  def __init__(self, input_size: int, in_channels: int, num_classes: int,
               hidden_size: int = 32, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    size = input_size * input_size * in_channels
    self.inputs = nnx.Linear(size + 1, hidden_size, rngs=rngs)
    self.labels = nnx.Embed(num_classes + 1, hidden_size, rngs=rngs)
    self.outputs = nnx.Linear(hidden_size, size, rngs=rngs)

  def __call__(self, x, t, y, rngs=None):
    flat = jnp.concatenate([x.reshape(x.shape[0], -1), t.reshape(-1, 1)], axis=-1)
    return self.outputs(nnx.silu(self.inputs(flat) + self.labels(y))).reshape(x.shape)


@pytest.fixture
def restored_registry(monkeypatch):
  """The registry as it was before the test, whatever the test registers."""
  monkeypatch.setattr(registry, '_TARGETS', copy.deepcopy(registry._TARGETS))


def tiny_legacy_config() -> ml_collections.ConfigDict:
  """A legacy config in diffuse_nnx's layout naming the registered network, on the digits."""
  return ml_collections.ConfigDict(dict(
      trainer='DiT_ImageNet', seed=0, dtype='float32', total_steps=4, log_every_steps=1,
      save_every_steps=1000, visualize_every_steps=1000,
      data_class='digits', data=dict(batch_size=32, image_size=8, seed=0, num_workers=8),
      encoder_class='RGB', encoder=dict(),
      network_class='tiny_denoiser', network=dict(
          input_size=8, in_channels=1, num_classes=10, hidden_size=16, enable_dropout=True,
          mlp_dropout=0.0),
      interface_class='sit', interface=dict(train_time_dist_type='logitnormal', x_sigma=0.5),
      learning_rate=1e-3, learning_rate_schedule='cosine', warmup_steps=2,
      optimizer_class='adam', optimizer=dict(b2=0.99),
      sampler_class='euler', sampler=dict(num_sampling_steps=2, sampling_time_dist='uniform'),
      ema_class='ema', ema=dict(decay=0.9),
      checkpoint=dict(options=dict(save_interval_steps=1000, max_to_keep=1)),
      visualize=dict(on=False), eval=dict(on=False),
      sharding=dict(mesh=[('data', -1)], data_axis='data', strategy=[('.*', 'replicate')])))


def test_registered_network_trains_through_the_normal_trainer(tmp_path, restored_registry):
  from lib import train

  registry.register('network', 'tiny_denoiser', TinyDenoiser)
  config = converter.convert(tiny_legacy_config())
  assert config.network.__arguments__ == {'hidden_size': 16}  # derived sizes left to Experiment
  assert fdl.get_callable(config.optimizer.schedule).__name__ == 'cosine'
  assert train.train(fdl.build(config), str(tmp_path)) == 4
  with open(tmp_path / 'metrics.jsonl') as f:
    losses = [record['train/loss'] for record in map(json.loads, f) if 'train/loss' in record]
  assert len(losses) == 4 and np.all(np.isfinite(losses)), losses


@pytest.mark.slow
def test_registry_imports_lazily_and_refuses_a_taken_name(restored_registry):
  code = ('import sys; from experiments.legacy import registry\n'
          'assert registry.resolve("ema", "ema").__name__ == "EMA"\n'
          'assert not [m for m in sys.modules if m.startswith("lib.models")], "model imported"\n')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO_ROOT)
  with pytest.raises(registry.RegistryError, match="network 'dit' is already registered as "
                                                   'lib.models.dit:DiT'):
    registry.register('network', 'dit', TinyDenoiser)
  assert registry.register('network', 'tiny_denoiser', TinyDenoiser) is TinyDenoiser
  assert registry.register('network', 'tiny_denoiser', TinyDenoiser) is TinyDenoiser  # again

  @registry.register('ema', 'frozen')
  class Frozen:
    pass

  assert registry.resolve('ema', 'frozen') is Frozen


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize('field,value,message', [
    ('network_class', 'ditt', "network_class='ditt': unknown network 'ditt'; registered network "
                              "names: dit, lightning_ddt, lightning_dit \\("),
    ('sampler_class', 'rk4', "sampler_class='rk4': unknown sampler 'rk4'; registered sampler "
                             "names: euler, euler-maruyama, euler_jump, heun"),
    ('network.dpeth', 4, "network.dpeth: unexpected field 'dpeth' for DiT; accepted fields: "
                         r".*depth.* \(closest: depth"),
    ('learning_rat', 1e-3, "learning_rat: unexpected field 'learning_rat' for the experiment; "
                           r"accepted fields: .* \(closest: learning_rate"),
    ('sampler.sampling_time_kwargs', {'t_begin': 1.0},
     "sampler.sampling_time_kwargs.t_begin: unexpected field 't_begin' for Heun; accepted "
     "fields: .*t_start"),
    ('network.mlp_dropout', 0.1, r'network.mlp_dropout=0.1 has no counterpart: DiT always '
                                 r'behaves as mlp_dropout=0.0'),
    ('interface.train_time_dist_type', 'lognormal',
     "interface.train_time_dist_type='log_normal': SiT.time_dist must be one of 'uniform', "
     "'logit_normal'"),
    ('sharding.strategy', [('.*', 'shard_everything')],
     "sharding.strategy\\[0\\]='shard_everything': expected 'replicate' or 'fsdp"),
])
def test_errors_name_the_field_and_the_alternatives(field, value, message):
  config = dit_imagenet.get_config('imagenet_256-B_2').to_dict()
  *parents, name = field.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[name] = value
  with pytest.raises(converter.LegacyConfigError, match=message):
    converter.convert(config)


# ------------------------------------------------------------------------------- launch.py
@pytest.mark.slow
def test_launch_prints_a_converted_config_with_overrides():
  result = launch('--config=tests/legacy_configs/dit_imagenet.py:imagenet_256-B_2',
                  '--config.optimizer.b2=0.95', '--fdl_set=network.depth=6', '--print_config')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert 'optimizer.b2 = 0.95' in lines and 'network.depth = 6' in lines
  assert 'network = Partial[lib.models.dit.DiT]' in lines


@pytest.mark.slow
def test_launch_refuses_config_with_fdl_config():
  result = launch('--config=tests/legacy_configs/dit_imagenet.py:imagenet_256-B_2',
                  '--fdl_config=experiments/dit.py:b2', '--print_config')
  assert result.returncode == 2
  assert 'give one of --fdl_config, --fdl_config_file and --config' in result.stderr
