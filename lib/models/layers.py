"""Building blocks shared by the DiT family (DiT, LightningDiT, LightningDDT).

Layouts follow facebookresearch/DiT `models.py` so released weights map one to one:
  * time embedding: GLIDE sinusoid, `[cos, sin]` (cos first), period 10000;
  * 2-D position table (MAE `get_2d_sincos_pos_embed`): first D/2 channels encode
    the column (w) index, the second D/2 the row (h); `[sin, cos]` inside each half;
  * patches are flattened in (p, q, c) order (`unpatchify` = einsum nhwpqc->nhpwqc).
Images are NHWC throughout.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import nn

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
normal_002 = nnx.initializers.normal(stddev=0.02)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of scalar times. t: (B,) -> (B, dim), `[cos, sin]`.

  freqs_i = exp(-ln(max_period) * i / (dim/2)), i < dim/2 (odd dim zero-padded).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """(M,) positions -> (M, dim) `[sin, cos]` with omega_i = 1 / 10000^(2i/dim)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum('m,d->md', positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
  """Fixed 2-D sin-cos table (grid_size**2, dim), tokens in row-major order.

  As in MAE/DiT: `meshgrid(w, h)`, so the first dim/2 channels embed the column
  index and the last dim/2 the row index.
  """
  if dim % 4:
    raise ValueError(f'the 2-D sin-cos table needs hidden_size divisible by 4, got {dim}')
  coords = np.arange(grid_size, dtype=np.float64)
  column, row = np.meshgrid(coords, coords)  # column varies along axis 1 (w)
  return np.concatenate([sincos_1d(dim // 2, column), sincos_1d(dim // 2, row)], axis=1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation x * (1 + scale) + shift; shift/scale (B, D) broadcast over tokens."""
  return x * (1 + scale[:, None]) + shift[:, None]


def unpatchify(x: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """(B, h*w, p*p*C) tokens in (p, q, c) order -> (B, h*p, w*p, C) image."""
  batch, tokens, _ = x.shape
  side = int(math.isqrt(tokens))
  x = x.reshape(batch, side, side, patch_size, patch_size, channels)
  x = jnp.einsum('nhwpqc->nhpwqc', x)
  return x.reshape(batch, side * patch_size, side * patch_size, channels)


class PatchEmbed(nn.Module):
  """Conv(k=s=p) patchify: (B, H, W, C) -> (B, (H/p)*(W/p), D).

  Initialised like a Linear on its flattened (p*p*C, D) view (xavier uniform), as DiT.
  """

  def __init__(self, in_channels: int, hidden_size: int, patch_size: int, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.proj = nnx.Conv(
        in_channels, hidden_size, kernel_size=(patch_size, patch_size),
        strides=(patch_size, patch_size), padding='VALID', dtype=dtype,
        kernel_init=nnx.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1),
        bias_init=zeros, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.proj(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class TimestepEmbedder(nn.Module):
  """t (B,) -> (B, D): sinusoid(freq_embed_size) -> Linear -> SiLU -> Linear."""

  def __init__(self, hidden_size: int, freq_embed_size: int = 256, max_period: float = 10000.0,
               *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.freq_embed_size = freq_embed_size
    self.max_period = max_period
    self.linear1 = nnx.Linear(freq_embed_size, hidden_size, kernel_init=normal_002,
                              bias_init=zeros, dtype=dtype, rngs=rngs)
    self.linear2 = nnx.Linear(hidden_size, hidden_size, kernel_init=normal_002,
                              bias_init=zeros, dtype=dtype, rngs=rngs)

  def __call__(self, t: jax.Array) -> jax.Array:
    embedding = timestep_embedding(t, self.freq_embed_size, self.max_period)
    return self.linear2(nnx.silu(self.linear1(embedding)))


class LabelEmbedder(nn.Module):
  """Class labels (B,) -> (B, D) with a learned null class at index `num_classes`.

  Classifier-free guidance uses the null row; at train time labels are replaced by
  it with probability `dropout_prob` when a `label_dropout` rng stream is given.
  """

  def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.dropout_prob = dropout_prob
    self.embedding = nnx.Embed(num_classes + 1, hidden_size, embedding_init=normal_002,
                               dtype=dtype, rngs=rngs)

  def __call__(self, labels: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    if rngs is not None and self.dropout_prob > 0:
      drop = jax.random.uniform(rngs.label_dropout(), labels.shape) < self.dropout_prob
      labels = jnp.where(drop, self.num_classes, labels)
    return self.embedding(labels)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout).

  Uses `jax.nn.dot_product_attention`, so GPUs get fused kernels.
  """

  def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool = True, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if hidden_size % num_heads:
      raise ValueError(f'hidden_size={hidden_size} must be divisible by num_heads={num_heads}')
    self.num_heads = num_heads
    self.qkv = nnx.Linear(hidden_size, 3 * hidden_size, use_bias=qkv_bias,
                          kernel_init=xavier_uniform, bias_init=zeros, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(hidden_size, hidden_size, kernel_init=xavier_uniform,
                           bias_init=zeros, dtype=dtype, rngs=rngs)

  def qkv_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, L, D) -> q, k, v each (B, L, H, D/H)."""
    batch, length, dim = x.shape
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = self.qkv_heads(x)
    out = jax.nn.dot_product_attention(q, k, v)
    return self.proj(out.reshape(x.shape))


class Mlp(nn.Module):
  """Linear(D, hidden) -> GELU(tanh) -> Linear(hidden, D)."""

  def __init__(self, hidden_size: int, mlp_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(hidden_size, mlp_dim, kernel_init=xavier_uniform, bias_init=zeros,
                          dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, hidden_size, kernel_init=xavier_uniform, bias_init=zeros,
                          dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x), approximate=True))


def layer_norm(hidden_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm without affine parameters, eps 1e-6 (the adaLN blocks' norm)."""
  return nnx.LayerNorm(hidden_size, epsilon=1e-6, use_bias=False, use_scale=False,
                       dtype=dtype, rngs=rngs)


def ada_ln(hidden_size: int, chunks: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  """The zero-initialised Linear(D, chunks*D) of adaLN-Zero (SiLU is applied by the caller)."""
  return nnx.Linear(hidden_size, chunks * hidden_size, kernel_init=zeros, bias_init=zeros,
                    dtype=dtype, rngs=rngs)
