"""Shared pieces of the torch-equivalence tests: plain-torch reference modules of the DiT
family in the official key layouts, and the helpers every equivalence test uses (random
weights on both sides, NHWC <-> NCHW runs, inputs, relative error, parameter counts).

`torch_modules()` is written in plain torch from the facts of the official code
(hustvl/LightningDiT 2725fed `models/lightningdit.py`, `swiglu_ffn.py`, `rmsnorm.py`,
`pos_embed.py`; bytetriper/RAE a4d18c4 `src/stage2/models/{DDT,model_utils}.py` for the
Gaussian-Fourier embedding; facebookresearch/DiT for the sinusoidal time embedding): the same
module tree and state-dict keys, fused qkv with bias, RMSNorm in float32, SwiGLU `w12`/`w3`,
EVA-02 interleaved 2-D RoPE tables (rows first), timm `PatchEmbed` as a Conv2d, NCHW in and
out. timm, einops and fairscale are not needed. The model references (LightningDiT here,
DiT-DH in tests/models/test_lightning_ddt.py, MCG-NJU DDT in tests/models/test_ddt.py) build on its blocks.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


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
    """DiT: GLIDE sinusoid [cos, sin], period 10000 (MCG-NJU DDT: 10)."""

    def __init__(self, dim, freq=256, max_period=10000.0):
      super().__init__()
      self.freq, self.max_period = freq, max_period
      self.mlp = tnn.Sequential(tnn.Linear(freq, dim), tnn.SiLU(), tnn.Linear(dim, dim))

    def forward(self, t):
      half = self.freq // 2
      freqs = torch.exp(-np.log(self.max_period) * torch.arange(half, dtype=torch.float32)
                        / half)
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
                               LabelEmbedder=LabelEmbedder, TimestepEmbedder=TimestepEmbedder,
                               modulate=modulate,
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


def randomize(module, seed=0):
  """Every Param N(0, 0.2^2) (drawn with NumPy: no per-shape compilation)."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(nnx.state(module, nnx.Param))
  nnx.update(module, jax.tree.unflatten(treedef, [
      jnp.asarray(0.2 * rng.standard_normal(x.shape), jnp.float32) for x in leaves]))
  return module
