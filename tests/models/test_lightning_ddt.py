"""LightningDDT (RAE DiT-DH): equivalence with a PyTorch reference, importer, counts, switches.

The PyTorch reference `DiTwDDTHeadRef` is written here in plain torch from the facts of
bytetriper/RAE a4d18c4 `src/stage2/models/DDT.py::DiTwDDTHead` (and `model_utils.py`), on the
block modules of `tests/torch_reference.py`: Gaussian-Fourier time embedding (fixed W,
sin first), c = silu(t + y) with every adaLN applying SiLU again, encoder on `s_embedder(x) +
pos_embed`, s = silu(t + s) per token, `s_projector` (Identity when the widths agree),
decoder on `x_embedder(x)` conditioned per token, one `blocks` list numbering encoder blocks
first, `enc_feat_rope`/`dec_feat_rope`, patch size 1. Every parameter and buffer is
randomised before the state dict is imported.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib import nn
from lib.weights import lightning
from lib.weights.importer import WeightsMismatch
from lib.models.lightning_ddt import LightningDDT
from tests.torch_reference import (count_params, forward, inputs, jax_inputs, max_relative_error,
                                   randomize, randomize_torch, run_torch, state_dict_numpy,
                                   torch_modules)


def ddt_reference_class():
  ns = torch_modules()
  torch, tnn = ns.torch, ns.torch.nn

  class DiTwDDTHeadRef(tnn.Module):
    def __init__(self, input_size, in_channels, hidden=(64, 96), depth=(2, 1), heads=(4, 4),
                 num_classes=10, qk_norm=False, swiglu=True, rms_norm=True, wo_shift=False):
      super().__init__()
      self.num_encoder_blocks = depth[0]
      self.x_embedder = ns.PatchEmbed(in_channels, hidden[1], 1)
      self.s_embedder = ns.PatchEmbed(in_channels, hidden[0], 1)
      self.s_projector = tnn.Linear(hidden[0], hidden[1]) if hidden[0] != hidden[1] else \
          tnn.Identity()
      self.t_embedder = ns.GaussianFourierEmbedding(hidden[0])
      self.y_embedder = ns.LabelEmbedder(num_classes, hidden[0])
      self.final_layer = ns.FinalLayer(hidden[1], 1, in_channels, rms_norm)
      self.pos_embed = tnn.Parameter(torch.zeros(1, input_size ** 2, hidden[0]),
                                     requires_grad=False)
      self.enc_feat_rope = ns.VisionRope(hidden[0] // heads[0] // 2, input_size)
      self.dec_feat_rope = ns.VisionRope(hidden[1] // heads[1] // 2, input_size)
      self.blocks = tnn.ModuleList([
          ns.Block(hidden[0] if i < depth[0] else hidden[1], heads[0] if i < depth[0] else heads[1],
                   4.0, qk_norm, swiglu, rms_norm, wo_shift) for i in range(sum(depth))])
      self.in_channels = in_channels

    def forward(self, x, t, y):
      t = self.t_embedder(t)
      c = tnn.functional.silu(t + self.y_embedder(y))
      s = self.s_embedder(x) + self.pos_embed
      for i in range(self.num_encoder_blocks):
        s = self.blocks[i](s, c, self.enc_feat_rope)
      s = tnn.functional.silu(t.unsqueeze(1).repeat(1, s.shape[1], 1) + s)
      s = self.s_projector(s)
      x = self.x_embedder(x)
      for i in range(self.num_encoder_blocks, len(self.blocks)):
        x = self.blocks[i](x, s, self.dec_feat_rope)
      return ns.unpatchify(self.final_layer(x, s), 1, self.in_channels)

  return DiTwDDTHeadRef


def build_pair(hidden=(64, 96), depth=(2, 1), heads=(4, 4), abstract=False, **switches):
  """(torch reference, our model); `abstract`: ours unallocated, for the importer to fill."""
  ref = ddt_reference_class()(8, 4, hidden, depth, heads, 10,
                              qk_norm=switches.get('qk_norm', False),
                              swiglu=switches.get('swiglu', True),
                              rms_norm=switches.get('rms_norm', True),
                              wo_shift=not switches.get('adaln_shift', True))
  build = lambda: LightningDDT(8, 4, 10, 1, hidden[0], heads[0], depth[0], hidden[1], heads[1],
                               depth[1], **switches, rngs=nnx.Rngs(0))
  return ref, (nnx.eval_shape(build) if abstract else build())


@pytest.mark.parametrize('name,kwargs', [
    ('rae_widths_differ', dict()),
    ('equal_widths_no_projector', dict(hidden=(64, 64), heads=(4, 2))),
    ('qknorm_noshift_gelu', dict(qk_norm=True, adaln_shift=False, swiglu=False)),
])
def test_matches_torch_reference(name, kwargs):
  ref, ours = build_pair(**kwargs, abstract=True)
  randomize_torch(ref)
  nnx.update(ours, lightning.import_lightning_ddt(state_dict_numpy(ref), ours))
  x, t, y = inputs()
  expected = run_torch(ref, x, t, y)
  got = forward(ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32))
  assert got.shape == expected.shape == (3, 8, 8, 4)
  assert np.abs(expected).max() > 1e-2
  error = max_relative_error(got, expected)
  print(f'{name}: max |diff| = {np.abs(np.asarray(got) - expected).max():.2e}, '
        f'max |out| = {np.abs(expected).max():.3f}, ratio {error:.2e}')
  assert error <= 1e-4


@pytest.fixture(scope='module')
def fresh():
  """The default small LightningDDT, freshly initialised (built once: eager init is slow)."""
  return build_pair()


def test_equal_widths_have_no_projector():
  _, ours = build_pair(hidden=(64, 64), heads=(4, 4), abstract=True)
  assert ours.s_projector is None  # (the forward pass is checked against torch above)
  assert 's_projector' not in {path[0] for path, _ in nnx.to_flat_state(nnx.state(ours))}


def test_fresh_tables_and_init_follow_rae(fresh):
  ref, ours = fresh
  np.testing.assert_allclose(ours.enc_rope_cos[...], ref.enc_feat_rope.freqs_cos.numpy(),
                             atol=1e-6)
  np.testing.assert_allclose(ours.dec_rope_sin[...], ref.dec_feat_rope.freqs_sin.numpy(),
                             atol=1e-6)
  assert ours.enc_rope_cos.shape == (64, 16) and ours.dec_rope_cos.shape == (64, 24)
  np.testing.assert_array_equal(forward(ours, *jax_inputs()), 0.0)  # adaLN-Zero
  # RAE keeps torch's default Linear init in the blocks: U(+-1/sqrt(fan_in)), biases too
  qkv = ours.encoder_blocks[0].attn.qkv
  assert 0.8 / 8 < float(jnp.abs(qkv.kernel[...]).max()) <= 1 / 8
  assert 0.8 / 8 < float(jnp.abs(qkv.bias[...]).max()) <= 1 / 8
  assert float(jnp.abs(ours.t_embedder.linear1.bias[...]).max()) > 0
  assert isinstance(ours.t_embedder.W, nn.Buffer) and ours.t_embedder.W.shape == (256,)
  xavier = LightningDDT(8, 4, 10, 1, 64, 4, 2, 96, 4, 1, xavier_init=True, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(xavier.encoder_blocks[0].attn.qkv.bias[...], 0.0)
  np.testing.assert_array_equal(xavier.t_embedder.linear1.bias[...], 0.0)


def test_decoder_is_conditioned_per_token_on_the_encoder(fresh):
  ours = randomize(nnx.clone(fresh[1]), seed=3)
  x, t, y = jax_inputs()
  base = forward(ours, x, t, y)
  # the encoder's output matters: change one encoder weight
  kernel = ours.encoder_blocks[1].mlp.w3.kernel
  kernel[...] = kernel[...] + 0.5
  assert float(jnp.abs(forward(ours, x, t, y) - base).max()) > 1e-3


def test_importer_errors_name_keys():
  ref, ours = build_pair(abstract=True)
  state = state_dict_numpy(randomize_torch(ref))
  del state['blocks.2.mlp.w3.bias']  # the decoder block
  state['blocks.3.norm1.weight'] = np.ones(96, np.float32)
  state['s_projector.weight'] = np.zeros((96, 32), np.float32)
  with pytest.raises(WeightsMismatch) as error:
    lightning.import_lightning_ddt(state, ours)
  message = str(error.value)
  assert 'missing keys (1): blocks.2.mlp.w3.bias' in message
  assert 'unexpected keys (1): blocks.3.norm1.weight' in message
  assert 's_projector.weight: checkpoint (96, 32), network (96, 64)' in message
  # a checkpoint with a projector does not fit equal widths (and vice versa)
  _, equal = build_pair(hidden=(96, 96), heads=(4, 4), abstract=True)
  with pytest.raises(WeightsMismatch, match='unexpected keys.*s_projector'):
    lightning.import_lightning_ddt(state_dict_numpy(ref), equal)


def test_meanflow_embedders():
  ref, _ = build_pair()
  ours = LightningDDT(8, 4, 10, 1, 64, 4, 2, 96, 4, 1, take_dt=True, take_gw=True,
                      rngs=nnx.Rngs(0))
  assert not np.allclose(ours.dt_embedder.W[...], ours.t_embedder.W[...])
  nnx.update(ours, lightning.import_lightning_ddt(state_dict_numpy(randomize_torch(ref)), ours,
                                                  allow_missing=('dt_embedder', 'gw_embedder')))
  x, t, y = jax_inputs()
  a = forward(ours, x, t, y)
  np.testing.assert_array_equal(a, forward(ours, x, t, y, dt=jnp.zeros(3), gw=jnp.ones(3)))
  assert float(jnp.abs(forward(ours, x, t, y, dt=jnp.full(3, 0.5)) - a).max()) > 1e-4


def test_patch_two_and_bfloat16():
  model = LightningDDT(8, 4, 10, 2, 64, 4, 1, 96, 4, 1, dtype='bfloat16', rngs=nnx.Rngs(0))
  assert model.final_layer.linear.kernel.shape == (96, 16)
  assert model.enc_rope_cos.shape == (16, 16)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype('float32')}
  out = forward(model, *jax_inputs())
  assert out.shape == (3, 8, 8, 4) and out.dtype == jnp.float32


# ------------------------------------------------------------------------------------- counts
# Exact counts of RAE's torch `DiTwDDTHead` (a4d18c4), counted here by instantiating it on
# torch's meta device (timm's PatchEmbed stubbed as a Conv2d): parameters() = trainable +
# frozen pos_embed + the fixed Fourier W (256). diffuse_nnx's analytic numbers (838.38M, S 196.36M)
# are trainable + W. Our Params are the trainable ones (pos_embed and W are buffers).
@pytest.mark.parametrize('size_args,params,torch_total', [
    (dict(), 838_380_628, 838_675_796),                                             # DiT-DH-XL
    (dict(encoder_hidden_size=384, encoder_num_heads=6, num_encoder_blocks=12),    # DiT-DH-S
     196_357_204, 196_455_764),
])
def test_rae_parameter_counts(size_args, params, torch_total):
  model = nnx.eval_shape(lambda: LightningDDT(16, 768, 1000, 1, **size_args, rngs=nnx.Rngs(0)))
  assert count_params(model) == params
  assert count_params(model) + model.pos_embed.size + model.t_embedder.W.size == torch_total
  assert model.decoder_blocks[0].mlp.w3.kernel.shape == (5461, 2048)  # int(2/3 * 8192)


def test_reference_module_counts_like_rae_xl():
  torch = torch_modules().torch
  with torch.device('meta'):
    ref = ddt_reference_class()(16, 768, (1152, 2048), (28, 2), (16, 16), 1000)
  assert sum(p.numel() for p in ref.parameters()) == 838_675_796


def test_seed_sd_vae_presets_counts():
  """diffuse_nnx's `imagenet_256-XL_2` / `-S_2` DDT on 32x32x4 SD-VAE latents (patch 2)."""
  for size_args, expected in [(dict(), 834_433_380),
                              (dict(encoder_hidden_size=384, encoder_num_heads=6,
                                    num_encoder_blocks=12), 192_987_492)]:
    model = nnx.eval_shape(lambda: LightningDDT(32, 4, 1000, 2, **size_args, rngs=nnx.Rngs(0)))
    assert count_params(model) == expected
