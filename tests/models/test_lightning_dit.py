"""LightningDiT: equivalence with a PyTorch reference, importer, parameter counts, switches.

The PyTorch reference (`LightningDiTRef` of `tests/torch_reference.py`, in plain torch from
the facts of hustvl/LightningDiT 2725fed) has the official module tree and state-dict keys.
Every parameter and buffer of the reference is randomised before its state dict is imported,
so adaLN-Zero hides nothing.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib import nn
from lib.models import layers
from lib.weights import lightning
from lib.weights.importer import WeightsMismatch
from lib.models.lightning_dit import LightningDiT
from tests.torch_reference import (count_params, forward, inputs, jax_inputs, max_relative_error,
                                   randomize, randomize_torch, run_torch, state_dict_numpy,
                                   torch_modules)


# ------------------------------------------------------------------------------------- equivalence
CONFIGS = {
    # the released LightningDiT-XL configuration (sinusoidal time embedding)
    'release': dict(),
    # diffuse_nnx's presets' switches, plus qk-norm (RMSNorm), 4-way adaLN and a learnt-sigma head
    'continuous_qknorm_noshift_sigma': dict(continuous_time_embed=True, freq_embed_size=64,
                                            qk_norm=True, adaln_shift=False, learn_sigma=True),
    # plain parts: GELU MLP, LayerNorm (qk LayerNorm with affine), no RoPE
    'gelu_layernorm_norope': dict(swiglu=False, rms_norm=False, use_rope=False, qk_norm=True),
}


def reference_for(config, size=8, patch=2, channels=4, hidden=64, depth=2, heads=4, classes=10,
                  abstract=False):
  """(torch reference, our model); `abstract`: our model unallocated (`nnx.eval_shape`), to
  be filled by the importer, which sets every variable (skips slow eager initialisation)."""
  ref = torch_modules().LightningDiTRef(
      size, patch, channels, hidden, depth, heads, classes,
      learn_sigma=config.get('learn_sigma', False), qk_norm=config.get('qk_norm', False),
      swiglu=config.get('swiglu', True), rope=config.get('use_rope', True),
      rms_norm=config.get('rms_norm', True), wo_shift=not config.get('adaln_shift', True),
      continuous=config.get('continuous_time_embed', False),
      freq=config.get('freq_embed_size', 256))
  build = lambda: LightningDiT(size, channels, classes, patch, hidden, depth, heads, **config,
                               rngs=nnx.Rngs(0))
  return ref, (nnx.eval_shape(build) if abstract else build())


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_matches_torch_reference(name):
  ref, ours = reference_for(CONFIGS[name], abstract=True)
  randomize_torch(ref)
  nnx.update(ours, lightning.import_lightning_dit(state_dict_numpy(ref), ours))
  x, t, y = inputs()
  expected = run_torch(ref, x, t, y)
  got = forward(ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32))
  assert got.shape == expected.shape == (3, 8, 8, 4)
  assert np.abs(expected).max() > 1e-2  # nothing hidden by zero init
  error = max_relative_error(got, expected)
  print(f'{name}: max |diff| = {np.abs(np.asarray(got) - expected).max():.2e}, '
        f'max |out| = {np.abs(expected).max():.3f}, ratio {error:.2e}')
  assert error <= 1e-4


def test_rope_tables_and_layout_match_eva():
  ref = torch_modules().VisionRope(8, 4)  # head_dim 16 on a 4x4 grid
  cos, sin = layers.rope_2d(16, 4)
  np.testing.assert_allclose(cos, ref.freqs_cos.numpy(), atol=1e-6)
  np.testing.assert_allclose(sin, ref.freqs_sin.numpy(), atol=1e-6)
  angles = np.arctan2(sin, cos)
  # token (row 1, col 0): first half rotates (pairs interleaved), second half does not
  freqs = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)
  np.testing.assert_allclose(angles[4, :8], np.repeat(freqs, 2), rtol=1e-5)
  np.testing.assert_allclose(angles[4, 8:], 0.0, atol=1e-6)
  np.testing.assert_allclose(angles[1, :8], 0.0, atol=1e-6)  # (row 0, col 1)
  np.testing.assert_allclose(angles[1, 8:], np.repeat(freqs, 2), rtol=1e-5)
  x = jax.random.normal(jax.random.key(0), (1, 16, 2, 16))
  rotated = layers.apply_rope(x, jnp.asarray(cos), jnp.asarray(sin))
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)  # a rotation
  torch = torch_modules().torch
  expected = ref(torch.from_numpy(np.asarray(x).transpose(0, 2, 1, 3).copy())).numpy()
  np.testing.assert_allclose(np.asarray(rotated).transpose(0, 2, 1, 3), expected, atol=1e-5)


def test_fresh_model_tables_match_reference_init():
  """The constructor's fixed tables are the official ones (pos_embed = MAE sin-cos, RoPE)."""
  ref, ours = reference_for({})
  np.testing.assert_allclose(ours.rope_cos[...], ref.feat_rope.freqs_cos.numpy(), atol=1e-6)
  np.testing.assert_allclose(ours.rope_sin[...], ref.feat_rope.freqs_sin.numpy(), atol=1e-6)
  np.testing.assert_allclose(ours.pos_embed[0], layers.sincos_2d(64, 4), atol=1e-7)


# ------------------------------------------------------------------------------------- importer
def _reference_state_dict():
  ref, ours = reference_for({}, abstract=True)
  return randomize_torch(ref), ours


def test_importer_names_missing_unexpected_and_misshaped_keys():
  ref, ours = _reference_state_dict()
  state = state_dict_numpy(ref)
  del state['blocks.1.attn.qkv.bias']
  state['blocks.7.mlp.w12.weight'] = np.zeros((2, 2), np.float32)
  state['final_layer.linear.weight'] = np.zeros((5, 64), np.float32)
  with pytest.raises(WeightsMismatch) as error:
    lightning.import_lightning_dit(state, ours)
  message = str(error.value)
  assert 'missing keys (1): blocks.1.attn.qkv.bias' in message
  assert 'unexpected keys (1): blocks.7.mlp.w12.weight' in message
  assert 'final_layer.linear.weight: checkpoint (5, 64), network (16, 64)' in message


def test_importer_rejects_other_switches():
  ref, _ = _reference_state_dict()
  ours = nnx.eval_shape(lambda: LightningDiT(8, 4, 10, 2, 64, 2, 4, qk_norm=True,
                                             adaln_shift=False, rngs=nnx.Rngs(0)))
  with pytest.raises(WeightsMismatch, match='q_norm.weight') as error:
    lightning.import_lightning_dit(state_dict_numpy(ref), ours)
  assert 'adaLN_modulation.1.weight: checkpoint (384, 64)' in str(error.value)


def test_meanflow_embedders_are_fresh_and_may_be_missing():
  ref, _ = _reference_state_dict()
  ours = LightningDiT(8, 4, 10, 2, 64, 2, 4, take_dt=True, take_gw=True, rngs=nnx.Rngs(0))
  t_kernel = ours.t_embedder.linear1.kernel[...]
  assert not np.allclose(t_kernel, ours.dt_embedder.linear1.kernel[...])
  assert not np.allclose(ours.dt_embedder.linear1.kernel[...], ours.gw_embedder.linear1.kernel[...])
  with pytest.raises(WeightsMismatch, match=r'dt_embedder\.mlp\.\{0,2\}\.weight'):
    lightning.import_lightning_dit(state_dict_numpy(ref), ours)
  nnx.update(ours, lightning.import_lightning_dit(state_dict_numpy(ref), ours,
                                                  allow_missing=('dt_embedder', 'gw_embedder')))
  x, t, y = jax_inputs()
  a = forward(ours, x, t, y, dt=jnp.zeros(3), gw=jnp.ones(3))
  np.testing.assert_array_equal(a, forward(ours, x, t, y))  # defaults dt = 0, gw = 1
  b = forward(ours, x, t, y, dt=jnp.full(3, 0.5), gw=jnp.full(3, 2.0))
  assert float(jnp.abs(a - b).max()) > 1e-4


# ------------------------------------------------------------------------------------- counts
# Exact counts of the official torch modules (hustvl 2725fed `LightningDiT_*`, RAE a4d18c4
# `lightningDiT.py`), counted here by instantiating them on torch's meta device (timm's
# PatchEmbed stubbed as a Conv2d): `sum(p.numel() for p in model.parameters())` includes the
# frozen pos_embed (and RAE's fixed W); our Params exclude those buffers.
@pytest.mark.parametrize('kwargs,params,torch_total', [
    # hustvl LightningDiT-XL/1 on VA-VAE f16d32 latents (16x16x32): 675.26M (anchors, §3b)
    (dict(input_size=16, in_channels=32, patch_size=1), 674_961_824, 675_256_736),
    # diffuse_nnx's LightningDiT-XL/2 (Fourier time embedding 512, SwiGLU, RMSNorm) on SD-VAE
    # 32x32x4 = RAE `lightningDiT.py` XL/2 (trainable 675_219_856); diffuse_nnx's analytic 675.22M
    # also counts its fixed Fourier W (256) as a Param
    (dict(input_size=32, in_channels=4, patch_size=2, continuous_time_embed=True,
          freq_embed_size=512), 675_219_856, 675_515_024),
    # diffuse_nnx's LightningDiT-B/2 (130.53M) = RAE `lightningDiT.py` B/2
    (dict(input_size=32, in_channels=4, patch_size=2, hidden_size=768, depth=12, num_heads=12,
          continuous_time_embed=True, freq_embed_size=512), 130_531_600, 130_728_464),
])
def test_official_parameter_counts(kwargs, params, torch_total):
  model = nnx.eval_shape(lambda: LightningDiT(num_classes=1000, **kwargs, rngs=nnx.Rngs(0)))
  assert count_params(model) == params
  fixed = model.pos_embed.size + (model.t_embedder.W.size if hasattr(model.t_embedder, 'W') else 0)
  assert count_params(model) + fixed == torch_total
  assert model.blocks[0].mlp.w3.kernel.shape == (int(2 / 3 * 4 * kwargs.get('hidden_size', 1152)),
                                                 kwargs.get('hidden_size', 1152))


def test_reference_module_counts_like_official_xl1():
  """The reference written above has the official module's parameters (counted on meta)."""
  torch = torch_modules().torch
  with torch.device('meta'):
    ref = torch_modules().LightningDiTRef(16, 1, 32, 1152, 28, 16, 1000)
  assert sum(p.numel() for p in ref.parameters()) == 675_256_736
  assert sum(b.numel() for b in ref.buffers()) == 2 * 256 * 72


def test_swiglu_hidden_width_is_unrounded():
  model = nnx.eval_shape(lambda: LightningDiT(8, 4, 10, 2, 1024, 1, 16, rngs=nnx.Rngs(0)))
  assert model.blocks[0].mlp.w3.kernel.shape == (2730, 1024)  # int(2/3 * 4096)


# ------------------------------------------------------------------------------------- switches
def tiny(**kwargs):
  args = dict(input_size=8, in_channels=4, num_classes=10, patch_size=2, hidden_size=64,
              depth=2, num_heads=4)  # the reference tests' sizes (shared compile caches)
  return LightningDiT(**{**args, **kwargs}, rngs=nnx.Rngs(0))


def test_fresh_model_outputs_zero_and_init_follows_official():
  model = tiny()
  out = forward(model, *jax_inputs())
  assert out.shape == (3, 8, 8, 4)
  np.testing.assert_array_equal(out, 0.0)
  qkv = model.blocks[0].attn.qkv.kernel[...]
  bound = np.sqrt(6 / (64 + 192))  # xavier on the fused (D, 3D) matrix
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.8 * bound
  np.testing.assert_array_equal(model.blocks[0].norm1.scale[...], 1.0)
  assert model.blocks[0].attn.q_norm is None


def test_qk_norms_are_separate_modules():
  model = tiny(qk_norm=True)
  attn = model.blocks[0].attn
  assert attn.q_norm is not attn.k_norm
  paths = {path for path, _ in nnx.to_flat_state(nnx.state(attn, nnx.Param))}
  assert {('q_norm', 'scale'), ('k_norm', 'scale')} <= paths
  attn.q_norm.scale[...] = jnp.full(16, 2.0)
  np.testing.assert_array_equal(attn.k_norm.scale[...], 1.0)


def test_adaln_without_shift_is_four_way():
  assert tiny(adaln_shift=False).blocks[0].adaLN_modulation.kernel.shape == (64, 256)
  assert tiny().blocks[0].adaLN_modulation.kernel.shape == (64, 384)


def test_fourier_time_embedding_is_fixed_buffer_sin_first():
  model = tiny(continuous_time_embed=True, freq_embed_size=16)
  embedder = model.t_embedder
  assert isinstance(embedder.W, nn.Buffer) and embedder.W.shape == (8,)
  assert all('W' not in path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  np.testing.assert_array_equal(embedder.linear1.bias[...], 0.0)
  t = jnp.array([0.0, 0.3])
  args = np.asarray(t)[:, None] * np.asarray(embedder.W[...])[None] * 2 * np.pi
  features = np.concatenate([np.sin(args), np.cos(args)], axis=-1)
  expected = embedder.linear2(nnx.silu(embedder.linear1(jnp.asarray(features))))
  np.testing.assert_allclose(embedder(t), expected, atol=1e-6)


def test_dropouts_only_with_rngs():
  model = randomize(tiny(depth=1, mlp_dropout=0.5, attn_o_dropout=0.5, attn_w_dropout=0.5))
  x, t, y = jax_inputs()
  plain = randomize(tiny(depth=1))  # the same weights without dropout
  np.testing.assert_array_equal(forward(model, x, t, y), forward(plain, x, t, y))
  a = forward(model, x, t, y, rngs=nnx.Rngs(dropout=0, label_dropout=0))
  b = forward(model, x, t, y, rngs=nnx.Rngs(dropout=1, label_dropout=0))
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_explicit_attention_path_matches_fused():
  """The attention-weight dropout path (explicit softmax) equals dot_product_attention."""
  model = randomize(tiny(depth=1, attn_w_dropout=1e-9))
  x, t, y = jax_inputs()
  explicit = forward(model, x, t, y, rngs=nnx.Rngs(dropout=0, label_dropout=0))
  fused = forward(model, x, t, y)
  np.testing.assert_allclose(explicit, fused, atol=1e-5 * float(jnp.abs(fused).max()))


def test_label_dropout_and_null_class():
  model = randomize(tiny(class_dropout_prob=1.0))
  x, t, _ = jax_inputs()
  dropped = forward(model, x, t, jnp.array([1, 2, 3]), rngs=nnx.Rngs(label_dropout=0))
  null = forward(model, x, t, jnp.array([10, 10, 10]))
  np.testing.assert_allclose(dropped, null, atol=1e-6)
  assert float(jnp.abs(forward(model, x, t, jnp.array([1, 2, 3])) - dropped).max()) > 1e-3


def test_bfloat16_compute_keeps_float32_params():
  model = randomize(tiny(dtype='bfloat16', qk_norm=True))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype('float32')}
  x, t, y = jax_inputs()
  out = forward(model, x, t, y)
  ref = randomize(tiny(qk_norm=True))(x, t, y)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.abs(ref).max()))


def test_invalid_sizes():
  with pytest.raises(ValueError, match='patch_size=3 must divide input_size'):
    tiny(patch_size=3)
  with pytest.raises(ValueError, match='2-D RoPE needs a multiple of 4'):
    tiny(hidden_size=24, num_heads=4)  # head_dim 6: no 2-D RoPE
