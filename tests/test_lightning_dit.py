"""LightningDiT: equivalence with a PyTorch reference, importer, parameter counts, switches.

The PyTorch reference below (`torch_modules`) is written here in plain torch from the facts of
the official code (hustvl/LightningDiT 2725fed `models/lightningdit.py`, `swiglu_ffn.py`,
`rmsnorm.py`, `pos_embed.py`; bytetriper/RAE a4d18c4 `src/stage2/models/{DDT,model_utils}.py`
for the Gaussian-Fourier embedding and the DiT-DH model in `test_lightning_ddt.py`): the same
module tree and state-dict keys, fused qkv with bias, RMSNorm in float32, SwiGLU `w12`/`w3`,
EVA-02 interleaved 2-D RoPE tables (rows first), timm `PatchEmbed` as a Conv2d, NCHW in and
out. timm, einops and fairscale are not needed. Every parameter and buffer of the reference
is randomised before its state dict is imported, so adaLN-Zero hides nothing.
"""

import functools
import types

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


# ------------------------------------------------------------------------------------- reference
@functools.cache
def torch_modules() -> types.SimpleNamespace:
  """Plain-torch reference modules (official key layout); skips the test without torch."""
  torch = pytest.importorskip('torch')
  tnn = torch.nn
  F = torch.nn.functional

  class RMSNorm(tnn.Module):
    def __init__(self, dim, eps=1e-6):
      super().__init__()
      self.eps = eps
      self.weight = tnn.Parameter(torch.ones(dim))

    def forward(self, x):
      x32 = x.float()
      return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) \
          * self.weight

  class SwiGLUFFN(tnn.Module):
    def __init__(self, dim, hidden):
      super().__init__()
      self.w12 = tnn.Linear(dim, 2 * hidden)
      self.w3 = tnn.Linear(hidden, dim)

    def forward(self, x):
      x1, x2 = self.w12(x).chunk(2, dim=-1)
      return self.w3(F.silu(x1) * x2)

  class Mlp(tnn.Module):
    def __init__(self, dim, hidden):
      super().__init__()
      self.fc1 = tnn.Linear(dim, hidden)
      self.act = tnn.GELU(approximate='tanh')
      self.fc2 = tnn.Linear(hidden, dim)

    def forward(self, x):
      return self.fc2(self.act(self.fc1(x)))

  class VisionRope(tnn.Module):
    """EVA-02 VisionRotaryEmbeddingFast(dim=head_dim/2, pt_seq_len=n)."""

    def __init__(self, dim, n, theta=10000):
      super().__init__()
      freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[:dim // 2].float() / dim))
      positions = torch.arange(n) / n * n
      angles = torch.einsum('i,f->if', positions, freqs).repeat_interleave(2, dim=-1)
      table = torch.cat([angles[:, None, :].expand(n, n, -1), angles[None, :, :].expand(n, n, -1)],
                        dim=-1).reshape(n * n, -1)
      self.register_buffer('freqs_cos', table.cos())
      self.register_buffer('freqs_sin', table.sin())

    def forward(self, t):
      pairs = t.reshape(*t.shape[:-1], -1, 2)
      rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
      return t * self.freqs_cos + rotated * self.freqs_sin

  class Attention(tnn.Module):
    def __init__(self, dim, heads, qk_norm, rms_norm):
      super().__init__()
      self.heads = heads
      self.qkv = tnn.Linear(dim, 3 * dim, bias=True)
      norm = (lambda: RMSNorm(dim // heads)) if rms_norm else (lambda: tnn.LayerNorm(dim // heads))
      self.q_norm = norm() if qk_norm else tnn.Identity()
      self.k_norm = norm() if qk_norm else tnn.Identity()
      self.proj = tnn.Linear(dim, dim)

    def forward(self, x, rope=None):
      b, n, c = x.shape
      q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(
          2, 0, 3, 1, 4).unbind(0)
      q, k = self.q_norm(q), self.k_norm(k)
      if rope is not None:
        q, k = rope(q), rope(k)
      x = F.scaled_dot_product_attention(q, k, v)
      return self.proj(x.transpose(1, 2).reshape(b, n, c))

  def norm_layer(dim, rms_norm):
    return RMSNorm(dim) if rms_norm else tnn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

  def modulate(x, shift, scale):
    return x * (1 + scale) if shift is None else x * (1 + scale) + shift

  class Block(tnn.Module):
    """LightningDiTBlock / RAE LightningDDTBlock: c (B, D) or per token (B, L, D)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, qk_norm=False, swiglu=True, rms_norm=True,
                 wo_shift=False):
      super().__init__()
      self.norm1 = norm_layer(dim, rms_norm)
      self.norm2 = norm_layer(dim, rms_norm)
      self.attn = Attention(dim, heads, qk_norm, rms_norm)
      hidden = int(dim * mlp_ratio)
      self.mlp = SwiGLUFFN(dim, int(2 / 3 * hidden)) if swiglu else Mlp(dim, hidden)
      self.adaLN_modulation = tnn.Sequential(tnn.SiLU(), tnn.Linear(dim, (4 if wo_shift else 6)
                                                                      * dim))
      self.wo_shift = wo_shift

    def forward(self, x, c, rope=None):
      if c.dim() < x.dim():
        c = c.unsqueeze(1)
      if self.wo_shift:
        scale1, gate1, scale2, gate2 = self.adaLN_modulation(c).chunk(4, dim=-1)
        shift1 = shift2 = None
      else:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
      x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope)
      return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))

  class FinalLayer(tnn.Module):
    def __init__(self, dim, patch, out_channels, rms_norm=True):
      super().__init__()
      self.norm_final = norm_layer(dim, rms_norm)
      self.linear = tnn.Linear(dim, patch * patch * out_channels)
      self.adaLN_modulation = tnn.Sequential(tnn.SiLU(), tnn.Linear(dim, 2 * dim))

    def forward(self, x, c):
      if c.dim() < x.dim():
        c = c.unsqueeze(1)
      shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
      return self.linear(modulate(self.norm_final(x), shift, scale))

  class TimestepEmbedder(tnn.Module):
    """DiT: GLIDE sinusoid [cos, sin], period 10000."""

    def __init__(self, dim, freq=256):
      super().__init__()
      self.freq = freq
      self.mlp = tnn.Sequential(tnn.Linear(freq, dim), tnn.SiLU(), tnn.Linear(dim, dim))

    def forward(self, t):
      half = self.freq // 2
      freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
      args = t[:, None].float() * freqs[None]
      return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

  class GaussianFourierEmbedding(tnn.Module):
    """RAE: fixed W (non-trainable Parameter), [sin, cos](2 pi t W)."""

    def __init__(self, dim, size=256):
      super().__init__()
      self.W = tnn.Parameter(torch.randn(size), requires_grad=False)
      self.mlp = tnn.Sequential(tnn.Linear(2 * size, dim), tnn.SiLU(), tnn.Linear(dim, dim))

    def forward(self, t):
      args = t[:, None] * self.W[None, :] * 2 * torch.pi
      return self.mlp(torch.cat([torch.sin(args), torch.cos(args)], dim=-1))

  class PatchEmbed(tnn.Module):
    def __init__(self, in_channels, dim, patch):
      super().__init__()
      self.proj = tnn.Conv2d(in_channels, dim, patch, patch)

    def forward(self, x):
      return self.proj(x).flatten(2).transpose(1, 2)

  class LabelEmbedder(tnn.Module):
    def __init__(self, num_classes, dim):
      super().__init__()
      self.embedding_table = tnn.Embedding(num_classes + 1, dim)

    def forward(self, y):
      return self.embedding_table(y)

  def unpatchify(x, patch, channels):
    n, tokens, _ = x.shape
    h = int(round(tokens ** 0.5))
    x = x.reshape(n, h, h, patch, patch, channels)
    return torch.einsum('nhwpqc->nchpwq', x).reshape(n, channels, h * patch, h * patch)

  class LightningDiTRef(tnn.Module):
    """hustvl LightningDiT (forward(x NCHW, t, y) in eval mode); `continuous` = RAE's variant."""

    def __init__(self, input_size, patch, in_channels, dim, depth, heads, num_classes,
                 learn_sigma=False, qk_norm=False, swiglu=True, rope=True, rms_norm=True,
                 wo_shift=False, continuous=False, freq=256):
      super().__init__()
      self.patch, self.in_channels = patch, in_channels
      self.out_channels = 2 * in_channels if learn_sigma else in_channels
      self.x_embedder = PatchEmbed(in_channels, dim, patch)
      self.t_embedder = GaussianFourierEmbedding(dim, freq // 2) if continuous else \
          TimestepEmbedder(dim, freq)
      self.y_embedder = LabelEmbedder(num_classes, dim)
      grid = input_size // patch
      self.pos_embed = tnn.Parameter(torch.zeros(1, grid * grid, dim), requires_grad=False)
      self.feat_rope = VisionRope(dim // heads // 2, grid) if rope else None
      self.blocks = tnn.ModuleList([Block(dim, heads, 4.0, qk_norm, swiglu, rms_norm, wo_shift)
                                    for _ in range(depth)])
      self.final_layer = FinalLayer(dim, patch, self.out_channels, rms_norm)

    def forward(self, x, t, y):
      x = self.x_embedder(x) + self.pos_embed
      c = self.t_embedder(t) + self.y_embedder(y)
      for block in self.blocks:
        x = block(x, c, self.feat_rope)
      x = unpatchify(self.final_layer(x, c), self.patch, self.out_channels)
      return x[:, :self.in_channels]

  return types.SimpleNamespace(torch=torch, RMSNorm=RMSNorm, VisionRope=VisionRope, Block=Block,
                               FinalLayer=FinalLayer, PatchEmbed=PatchEmbed,
                               LabelEmbedder=LabelEmbedder,
                               GaussianFourierEmbedding=GaussianFourierEmbedding,
                               unpatchify=unpatchify, LightningDiTRef=LightningDiTRef)


def randomize_torch(module, seed=0):
  """Every parameter and buffer random (norm weights around 1, the rest N(0, 0.1^2))."""
  torch = torch_modules().torch
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
      noise = torch.randn(tensor.shape, generator=generator)
      if name.endswith('.W'):
        tensor.copy_(noise)
      elif 'norm' in name:
        tensor.copy_(1 + 0.1 * noise)
      else:
        tensor.copy_(0.1 * noise)
  return module.eval()


def state_dict_numpy(module) -> dict[str, np.ndarray]:
  return {key: value.detach().numpy().copy() for key, value in module.state_dict().items()}


def run_torch(module, x_nhwc, t, y):
  torch = torch_modules().torch
  with torch.no_grad():
    out = module(torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2).copy()),
                 torch.from_numpy(np.asarray(t)), torch.from_numpy(np.asarray(y)))
  return out.numpy().transpose(0, 2, 3, 1)


def inputs(channels=4, size=8, batch=3, num_classes=10, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
  t = rng.uniform(0, 1, batch).astype(np.float32)
  y = np.array([1, num_classes, 3][:batch], np.int64)  # includes the null class
  return x, t, y


def jax_inputs(**kwargs):
  x, t, y = inputs(**kwargs)
  return jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32)


def max_relative_error(ours, reference) -> float:
  return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


# One compiled program per call signature (faster here than op-by-op dispatch).
forward = nnx.jit(lambda model, *args, **kwargs: model(*args, **kwargs))


def count_params(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


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


def randomize(module, seed=0):
  """Every Param N(0, 0.2^2) (drawn with NumPy: no per-shape compilation)."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(nnx.state(module, nnx.Param))
  nnx.update(module, jax.tree.unflatten(treedef, [
      jnp.asarray(0.2 * rng.standard_normal(x.shape), jnp.float32) for x in leaves]))
  return module


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
  with pytest.raises(ValueError, match='not divisible by patch_size=3'):
    tiny(patch_size=3)
  with pytest.raises(ValueError, match='divisible by 4'):
    tiny(hidden_size=24, num_heads=4)  # head_dim 6: no 2-D RoPE
