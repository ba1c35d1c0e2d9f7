"""Importing facebookresearch/DiT-layout checkpoints (DiT, SiT, REPA releases) into our DiT.

The reference is diffusers' `DiTTransformer2DModel`, an independent DiT implementation whose
weights diffusers converts from the official checkpoints. Its state dict is mapped back to
the official `models.py` key layout here (`diffusers_to_official`), so the test checks the
importer against the layout of the released files, not against our own export code.

diffusers -> official DiT (facebookresearch/DiT `models.py`, timm module names):

    pos_embed.proj.{weight,bias}                        x_embedder.proj.{weight,bias}
    pos_embed.pos_embed (buffer, not in state_dict)     pos_embed  (1, N, D)
    transformer_blocks.0.norm1.emb.timestep_embedder
        .linear_1.* / .linear_2.*                       t_embedder.mlp.0.* / t_embedder.mlp.2.*
    transformer_blocks.0.norm1.emb.class_embedder
        .embedding_table.weight                         y_embedder.embedding_table.weight
      (diffusers keeps one copy of the t/y embedders per block, all equal after conversion;
       the test ties them to block 0's, which the diffusers final layer also uses)
    transformer_blocks.{i}.norm1.linear.*               blocks.{i}.adaLN_modulation.1.*
    transformer_blocks.{i}.attn1.to_{q,k,v}.*           blocks.{i}.attn.qkv.*  (cat q|k|v, dim 0)
    transformer_blocks.{i}.attn1.to_out.0.*             blocks.{i}.attn.proj.*
    transformer_blocks.{i}.ff.net.0.proj.*              blocks.{i}.mlp.fc1.*
    transformer_blocks.{i}.ff.net.2.*                   blocks.{i}.mlp.fc2.*
    proj_out_1.*                                        final_layer.adaLN_modulation.1.*
    proj_out_2.*                                        final_layer.linear.*

Two diffusers defaults differ from the official model and are set to the official values:
the timestep sinusoid uses frequencies exp(-ln(1e4) i / (half - 1)) (`downscale_freq_shift=1`;
official: / half), and the MLP LayerNorm has eps 1e-5 (`norm_eps`; official: 1e-6).

diffusers takes NCHW inputs and raw float timesteps; the official DiT feeds integer t in
[0, 999], SiT/REPA raw t in [0, 1], ours raw t: the comparison feeds the same numbers to both.
"""

import argparse
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib.config import REPO_ROOT, overrides, presets
from lib.models import dit, layers
from lib.weights import dit as dit_weights
from lib.weights import files, importer, registry
from lib.weights.torch_layout import from_torch, torch_shape
from tests.conftest import DIGITS, TINY_FLAGS

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

HEADS, HEAD_DIM, DEPTH, PATCH, SIZE, CHANNELS, CLASSES = 4, 16, 2, 2, 8, 4, 10
HIDDEN = HEADS * HEAD_DIM


def _reference(out_channels: int | None = None, seed: int = 0):
  """A small diffusers DiT with official numerics and every parameter randomised (adaLN-Zero
  would otherwise zero the output), embedders tied across blocks."""
  torch.manual_seed(seed)
  model = diffusers.DiTTransformer2DModel(
      num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CHANNELS,
      out_channels=out_channels, num_layers=DEPTH, sample_size=SIZE, patch_size=PATCH,
      num_embeds_ada_norm=CLASSES, norm_type='ada_norm_zero', norm_eps=1e-6).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      fan_in = parameter[0].numel() if parameter.ndim > 1 else 1
      std = 1.0 / math.sqrt(fan_in) if parameter.ndim > 1 else 0.2
      if 'norm1.linear' in name or 'proj_out_1' in name:
        std *= 2.0  # sizeable shifts, scales and gates
      parameter.copy_(torch.randn_like(parameter) * std)
    first = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks:
      block.norm1.emb.load_state_dict(first.state_dict())
      block.norm1.emb.time_proj.downscale_freq_shift = 0  # the official frequencies
  return model


def diffusers_to_official(model) -> dict[str, np.ndarray]:
  """The diffusers DiT state dict in the facebookresearch/DiT key layout (module docstring)."""
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  emb = 'transformer_blocks.0.norm1.emb.'
  out = {
      'x_embedder.proj.weight': sd['pos_embed.proj.weight'],
      'x_embedder.proj.bias': sd['pos_embed.proj.bias'],
      'pos_embed': model.pos_embed.pos_embed.detach().numpy().copy(),
      'y_embedder.embedding_table.weight': sd[emb + 'class_embedder.embedding_table.weight'],
      'final_layer.adaLN_modulation.1.weight': sd['proj_out_1.weight'],
      'final_layer.adaLN_modulation.1.bias': sd['proj_out_1.bias'],
      'final_layer.linear.weight': sd['proj_out_2.weight'],
      'final_layer.linear.bias': sd['proj_out_2.bias'],
  }
  for ours, theirs in (('mlp.0', 'linear_1'), ('mlp.2', 'linear_2')):
    for leaf in ('weight', 'bias'):
      out[f't_embedder.{ours}.{leaf}'] = sd[emb + f'timestep_embedder.{theirs}.{leaf}']
  for i in range(len(model.transformer_blocks)):
    block = f'transformer_blocks.{i}.'
    for leaf in ('weight', 'bias'):
      out[f'blocks.{i}.attn.qkv.{leaf}'] = np.concatenate(
          [sd[block + f'attn1.to_{name}.{leaf}'] for name in 'qkv'], axis=0)
      for ours, theirs in (('attn.proj', 'attn1.to_out.0'), ('mlp.fc1', 'ff.net.0.proj'),
                           ('mlp.fc2', 'ff.net.2'), ('adaLN_modulation.1', 'norm1.linear')):
        out[f'blocks.{i}.{ours}.{leaf}'] = sd[block + f'{theirs}.{leaf}']
  return out


def _ours(learn_sigma: bool = False, depth: int = DEPTH) -> dit.DiT:
  return dit.DiT(input_size=SIZE, in_channels=CHANNELS, num_classes=CLASSES, patch_size=PATCH,
                 hidden_size=HIDDEN, depth=depth, num_heads=HEADS, learn_sigma=learn_sigma,
                 rngs=nnx.Rngs(0))


def _inputs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, CHANNELS, SIZE, SIZE)).astype(np.float32)  # NCHW
  t = np.array([0.0, 0.37, 1.0, 500.0, 999.0], np.float32)  # SiT-style and DiT-style values
  y = np.array([3, 0, 9, 7, CLASSES], np.int64)  # the last one is the null class
  return x, t, y


def _compare(reference, model: dit.DiT) -> float:
  """max |ours - reference| / max |reference| on the same inputs (first C channels)."""
  x, t, y = _inputs()
  with torch.no_grad():
    want = reference(torch.from_numpy(x), timestep=torch.from_numpy(t),
                     class_labels=torch.from_numpy(y)).sample.numpy()
  want = want[:, :CHANNELS].transpose(0, 2, 3, 1)  # NCHW -> NHWC, the prediction channels
  got = np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                         jnp.asarray(y, jnp.int32)))
  scale = float(np.abs(want).max())
  assert scale > 0.1, 'the reference output is (nearly) zero: the randomisation failed'
  return float(np.abs(got - want).max()) / scale


@pytest.mark.parametrize('learn_sigma', [False, True])
def test_import_matches_diffusers_reference(learn_sigma):
  reference = _reference(out_channels=2 * CHANNELS if learn_sigma else None)
  model = _ours(learn_sigma)
  nnx.update(model, dit_weights.import_dit(diffusers_to_official(reference), nnx.state(model)))
  relative = _compare(reference, model)
  print(f'learn_sigma={learn_sigma}: max |diff| / max |ref| = {relative:.2e}')
  assert relative <= 1e-4


def test_every_parameter_is_imported():
  reference = _reference()
  state_dict = diffusers_to_official(reference)
  model = _ours()
  params = dit_weights.import_dit(state_dict, nnx.state(model, nnx.Param))
  flat = dict(nnx.to_flat_state(params))
  assert len(flat) == len(state_dict) - 1  # all but pos_embed
  np.testing.assert_array_equal(flat[('blocks', 1, 'attn', 'qkv', 'kernel')][...],
                                state_dict['blocks.1.attn.qkv.weight'].T)
  np.testing.assert_array_equal(flat[('x_embedder', 'proj', 'kernel')][...],
                                state_dict['x_embedder.proj.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat[('y_embedder', 'embedding', 'embedding')][...],
                                state_dict['y_embedder.embedding_table.weight'])
  # The independent reference's position table is our fixed one.
  np.testing.assert_allclose(state_dict['pos_embed'][0], layers.sincos_2d(HIDDEN, SIZE // PATCH),
                             atol=1e-6)


def test_mismatch_errors_name_every_key():
  state_dict = diffusers_to_official(_reference())
  del state_dict['blocks.1.mlp.fc2.bias']
  state_dict['blocks.1.attn.extra.weight'] = np.zeros((3, 3), np.float32)
  state_dict['y_embedder.embedding_table.weight'] = np.zeros((1001, HIDDEN), np.float32)
  with pytest.raises(ValueError) as error:
    dit_weights.import_dit(state_dict, nnx.state(_ours()))
  message = str(error.value)
  assert 'missing keys (1): blocks.1.mlp.fc2.bias' in message
  assert 'unexpected keys (1): blocks.1.attn.extra.weight' in message
  assert f'mis-shaped keys (1): y_embedder.embedding_table.weight: checkpoint (1001, {HIDDEN}), ' \
         f'network ({CLASSES + 1}, {HIDDEN})' in message
  assert 'label_rows=1001' in message and f'label_rows={CLASSES + 1}' in message


def test_learned_sigma_head_into_plain_network_is_refused():
  state_dict = diffusers_to_official(_reference(out_channels=2 * CHANNELS))
  with pytest.raises(ValueError) as error:
    dit_weights.import_dit(state_dict, nnx.state(_ours()))
  message = str(error.value)
  assert 'final_layer.linear.weight: checkpoint (32, 64), network (16, 64)' in message
  assert 'checkpoint: hidden_size=64' in message and 'learn_sigma=True' in message
  assert 'network:    hidden_size=64' in message and 'learn_sigma=False' in message


def test_depth_mismatch_folds_block_indices():
  state_dict = diffusers_to_official(_reference())
  with pytest.raises(ValueError) as error:
    dit_weights.import_dit(state_dict, nnx.state(_ours(depth=5)))
  message = str(error.value)
  assert 'missing keys (30): blocks.{2-4}.adaLN_modulation.1.bias, ' in message
  assert 'depth=2' in message and 'depth=5' in message


def test_repa_projectors_are_skipped_and_pos_embed_checked(caplog):
  reference = _reference()
  state_dict = diffusers_to_official(reference)
  state_dict['projectors.0.0.weight'] = np.zeros((2048, HIDDEN), np.float32)
  state_dict['projectors.0.2.bias'] = np.zeros((2048,), np.float32)
  model = _ours()
  with caplog.at_level('INFO'):
    nnx.update(model, dit_weights.import_dit(state_dict, nnx.state(model)))
  assert any('projectors.' in record.getMessage() for record in caplog.records)
  assert _compare(reference, model) <= 1e-4

  swapped = dict(state_dict)  # row/column halves exchanged: another layout
  half = HIDDEN // 2
  swapped['pos_embed'] = np.concatenate([state_dict['pos_embed'][..., half:],
                                         state_dict['pos_embed'][..., :half]], axis=-1)
  with pytest.raises(ValueError, match='pos_embed of the checkpoint'):
    dit_weights.import_dit(swapped, nnx.state(model))
  dit_weights.import_dit(swapped, nnx.state(model), on_pos_embed_mismatch='warn')


def test_read_state_dict_unwraps_training_checkpoints(tmp_path):
  state_dict = {'blocks.0.attn.qkv.weight': torch.randn(6, 2, dtype=torch.float16),
                'y_embedder.embedding_table.weight': torch.randn(3, 2, dtype=torch.bfloat16)}
  path = tmp_path / 'checkpoint.pt'
  torch.save({'model': {'module.' + k: torch.zeros_like(v) for k, v in state_dict.items()},
              'ema': {'module.' + k: v for k, v in state_dict.items()},
              'opt': {'state': {}}, 'args': argparse.Namespace(model='SiT-XL/2'), 'steps': 7},
             path)
  loaded = files.read_state_dict(str(path))
  assert sorted(loaded) == sorted(state_dict)
  for key, value in state_dict.items():
    assert loaded[key].dtype == np.float32
    np.testing.assert_array_equal(loaded[key], value.float().numpy())
  (tmp_path / 'weights.onnx').write_bytes(b'')
  with pytest.raises(ValueError, match='unknown weights file type'):
    files.read_state_dict(str(tmp_path / 'weights.onnx'))


# ------------------------------------------------------------------------------- end to end
TINY = [DIGITS, *TINY_FLAGS, '--fdl_set=log_every_steps=1', '--fdl_set=visualize=None',
        '--fdl_set=evaluate=[]',
        # the random test releases have no name of a release: their time convention is stated
        '--fdl_set=interface.network_time=data_at_0']


def _tiny_experiment(*extra: str):
  import fiddle as fdl
  config = presets.load_preset('experiments/dit.py:digits')
  for flag in TINY[1:] + list(extra):
    overrides.apply_override(config, flag.removeprefix('--fdl_set='))
  return config, fdl.build(config)


def _random_release(experiment, path, seed: int = 1) -> dict[str, np.ndarray]:
  """A random official-layout checkpoint for `experiment`'s network, saved as a SiT-style
  training checkpoint ({'ema', 'model', 'args'}, DDP `module.` prefixes) at `path`."""
  abstract = nnx.eval_shape(experiment.make_network)
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key_path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    shape = torch_shape(str(key_path[-1]), variable.shape)
    state_dict[dit_weights.official_key(key_path)] = \
        (rng.normal(size=shape) * 0.1).astype(np.float32)
  side = experiment.latent_shape[0] // abstract.patch_size
  hidden = state_dict['x_embedder.proj.weight'].shape[0]
  state_dict['pos_embed'] = layers.sincos_2d(hidden, side)[None].astype(np.float32)
  torch.save({'ema': {'module.' + k: torch.from_numpy(v) for k, v in state_dict.items()},
              'model': {}, 'args': argparse.Namespace(model='tiny')}, path)
  return state_dict


def _run(*args, timeout=600):
  result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow
def test_import_command_writes_a_checkpoint_that_sample_mode_accepts(tmp_path):
  from lib import checkpoint as ckpt
  from lib.train import Run

  config, experiment = _tiny_experiment()
  release = tmp_path / 'release.pt'
  state_dict = _random_release(experiment, release)
  workdir = tmp_path / 'imported'
  _run('launch.py', '--mode=import', f'--checkpoint={release}', *TINY,
       f'--workdir={workdir}', '--step=7')
  for name in ('config.json', 'config.txt', 'imported_from.json'):
    assert os.path.getsize(workdir / name) > 0

  run = Run(experiment, str(workdir))
  manager = experiment.checkpoint.manager(str(workdir))
  step, state = ckpt.restore(manager, run.abstract_state())
  manager.close()
  assert step == 7 and int(state['step']) == 7
  flat = dict(nnx.to_flat_state(state['params']))
  np.testing.assert_array_equal(flat[('blocks', 0, 'attn', 'qkv', 'kernel')][...],
                                state_dict['blocks.0.attn.qkv.weight'].T)
  for a, b in zip(jax.tree.leaves(state['params']), jax.tree.leaves(state['ema'])):
    np.testing.assert_array_equal(a, b)
  assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(state['opt_state'])
             if jnp.issubdtype(leaf.dtype, jnp.floating))

  _run('launch.py', f'--workdir={workdir}', '--mode=sample', '--num_samples=4')
  with np.load(workdir / 'samples.npz') as samples:
    assert samples['images'].shape == (4, 8, 8, 1) and samples['images'].dtype == np.uint8

  result = subprocess.run([sys.executable, 'launch.py', '--mode=import',
                           f'--checkpoint={release}', *TINY, f'--workdir={workdir}'],
                          cwd=REPO_ROOT, capture_output=True, text=True)
  assert result.returncode == 2 and 'already holds checkpoints' in result.stderr


def test_import_mode_needs_a_checkpoint_and_reports_one_that_does_not_fit(tmp_path):
  from lib import errors, import_release

  _, experiment = _tiny_experiment()
  release = tmp_path / 'release.pt'
  _random_release(experiment, release)
  config, _ = _tiny_experiment('network.depth=2')
  workdir = tmp_path / 'imported'
  with pytest.raises(errors.UsageError, match='--mode=import needs --checkpoint=FILE'):
    import_release.run(None, config, workdir, None)
  with pytest.raises(errors.UserError, match=r'does not match this DiT: missing keys \(10\): '
                                             r'blocks\.1\.adaLN_modulation\.1\.bias'):
    import_release.run(str(release), config, workdir, None)
  assert not workdir.exists()


@pytest.mark.slow
def test_init_from_starts_a_run_from_the_imported_weights(tmp_path):
  from lib.train import Run

  _, plain = _tiny_experiment()
  release = tmp_path / 'release.pt'
  state_dict = _random_release(plain, release, seed=2)
  _, experiment = _tiny_experiment(f'init_from={release}', 'total_steps=1')
  assert experiment.init_from == str(release)

  run = Run(experiment, str(tmp_path / 'fresh'))
  manager = experiment.checkpoint.manager(run.workdir)
  assert run.restore_or_init(manager) == 0
  flat = dict(nnx.to_flat_state(run.state['params']))
  for key_path, variable in flat.items():
    leaf = str(key_path[-1])
    want = from_torch(leaf, state_dict[dit_weights.official_key(key_path)])
    np.testing.assert_array_equal(variable[...], want)
  for a, b in zip(jax.tree.leaves(run.state['params']), jax.tree.leaves(run.state['ema'])):
    np.testing.assert_array_equal(a, b)

  # The first logged loss of a launched run is the loss of the imported weights.
  run.load_encoder()
  batch = next(experiment.data.batches(0, 0, 1))
  _, metrics = run._train_step(run.state, run.encoder_state,
                               {k: jnp.asarray(v) for k, v in batch.items()})
  workdir = tmp_path / 'launched'
  _run('launch.py', *TINY, f'--fdl_set=init_from={release}', '--fdl_set=total_steps=1',
       f'--workdir={workdir}')
  with open(workdir / 'metrics.jsonl') as f:
    first = next(json.loads(line) for line in f if 'train/loss' in line)
  assert first['step'] == 1
  np.testing.assert_allclose(first['train/loss'], float(metrics['loss']), rtol=1e-5)

  # A workdir with a checkpoint resumes it; init_from is not read again.
  resumed = Run(experiment, str(workdir))
  manager = experiment.checkpoint.manager(str(workdir))
  release.unlink()
  assert resumed.restore_or_init(manager) == 1
  manager.close()


def test_init_from_needs_an_importer_for_the_network():
  import fiddle as fdl

  from lib import nn
  from lib.experiment import ConfigError

  class Other(nn.Module):  # no importer registered

    def __init__(self, input_size: int, in_channels: int, num_classes: int, *, rngs):
      del input_size, in_channels, num_classes, rngs

  config, _ = _tiny_experiment('init_from=/nowhere/release.pt')
  config.network = fdl.Partial(Other)
  with pytest.raises(ConfigError, match='no weight importer for network class'):
    fdl.build(config)
  assert registry.importer_for(fdl.build(_tiny_experiment()[0]).network) is \
      dit_weights.import_dit


def test_importer_lookup_accepts_unbuilt_config_nodes():
  from lib.models import lightning_dit
  config = presets.load_preset('experiments/lightning_dit.py:s2')
  assert importer.network_class(config.network) is lightning_dit.LightningDiT
  assert registry.importer_for(config.network) is \
      registry.IMPORTERS[lightning_dit.LightningDiT]
