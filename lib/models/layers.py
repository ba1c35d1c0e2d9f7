"""Building blocks shared by the DiT family (DiT, LightningDiT, LightningDDT).

Layouts follow facebookresearch/DiT `models.py` so released weights map one to one:
  * time embedding: GLIDE sinusoid, `[cos, sin]` (cos first), period 10000;
  * 2-D position table (MAE `get_2d_sincos_pos_embed`): first D/2 channels encode
    the column (w) index, the second D/2 the row (h); `[sin, cos]` inside each half;
  * patches are flattened in (p, q, c) order (`unpatchify` = einsum nhwpqc->nhpwqc).
Images are NHWC throughout.
"""

import contextlib
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import errors, nn

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


def modulate(x: jax.Array, shift: jax.Array | None, scale: jax.Array) -> jax.Array:
  """adaLN modulation x * (1 + scale) + shift of tokens x (B, N, D), with shift and scale of one
  condition per sample (B, 1, D) or per token (B, N, D); shift None: no shift (4-way adaLN)."""
  x = x * (1 + scale)
  return x if shift is None else x + shift


def unpatchify(x: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """(B, h*w, p*p*C) tokens in (p, q, c) order -> (B, h*p, w*p, C) image."""
  batch, tokens, _ = x.shape
  side = int(math.isqrt(tokens))
  x = x.reshape(batch, side, side, patch_size, patch_size, channels)
  x = jnp.einsum('nhwpqc->nhpwqc', x)
  return x.reshape(batch, side * patch_size, side * patch_size, channels)


def time_condition(t_embedder, dt_embedder, gw_embedder, t: jax.Array,
                   dt: jax.Array | None = None, gw: jax.Array | None = None) -> jax.Array:
  """t_emb(t) [+ dt_emb(dt), MeanFlow's interval t - r, default 0] [+ gw_emb(gw), the
  guidance weight, default 1], for the embedders a network has (None: absent): (B, D)."""
  c = t_embedder(t)
  if dt_embedder is not None:
    c = c + dt_embedder(jnp.zeros_like(t) if dt is None else dt)
  if gw_embedder is not None:
    c = c + gw_embedder(jnp.ones_like(t) if gw is None else gw)
  return c


def check_sizes(input_size: int, patch_size: int, *widths: tuple[str, int, str, int],
                head_multiple: int = 1, position_table: str | None = None,
                mlp_ratio: float = 4.0, class_dropout_prob: float = 0.0,
                dropout_rates: dict[str, float] | None = None, **counts: int) -> None:
  """The size checks of every network, before any parameter is made, each a ValueError that
  names the argument (`num_heads=3 must divide hidden_size=32`; `lib.errors`):
    * `counts` (depth=..., in_channels=..., ...), the sizes, widths and heads are at least 1;
    * mlp_ratio > 0, class_dropout_prob in [0, 1], each of `dropout_rates` in [0, 1);
    * `patch_size` divides `input_size`;
    * each (width name, width, heads name, heads) splits into heads whose dimension
      width / heads is a multiple of `head_multiple` (4 for 2-D RoPE tables);
    * the width named `position_table` (the one with a 2-D sin-cos table) is a multiple of 4."""
  errors.check_positive(input_size=input_size, patch_size=patch_size, **counts,
                        **{name: value for width in widths for name, value in
                           (width[0:2], width[2:4])})
  errors.check_in_range(0, open_low=True, mlp_ratio=mlp_ratio)
  errors.check_in_range(0, 1, class_dropout_prob=class_dropout_prob)
  errors.check_in_range(0, 1, open_high=True, **(dropout_rates or {}))
  errors.check_divides(patch_size=patch_size, input_size=input_size)
  for width_name, width, heads_name, heads in widths:
    errors.check_divides(**{heads_name: heads, width_name: width})
    if (width // heads) % head_multiple:
      raise ValueError(f'{heads_name}={heads} gives {width_name} / {heads_name} = '
                       f'{width // heads} channels a head; 2-D RoPE needs a multiple of '
                       f'{head_multiple}')
    if width_name == position_table:
      check_sincos_width(**{width_name: width})


def check_sincos_width(**width: int) -> None:
  """ValueError('hidden_size=30 must be a multiple of 4 ...') unless the width of a 2-D
  sin-cos table (`sincos_2d`: a sin and a cos half for each axis) is a multiple of 4."""
  (name, value), = width.items()
  if value % 4:
    raise ValueError(f'{name}={value} must be a multiple of 4 (the 2-D sin-cos position table)')


# ------------------------------------------------------------------------------------------
# Hidden tokens. A network offers the output tokens of its blocks to `nnx.capture` (REPA aligns
# one of them); its return value never changes. Each evaluation sows one tuple, so a capture
# around a loss also tells how many times the loss evaluated the network.
BLOCK_OUTPUTS = 'block_outputs'


def sow_block_outputs(network: nnx.Module, outputs: list) -> None:
  """Sows the output tokens (B, N, D) of each of `network`'s blocks in this evaluation, in block
  order, as one `nnx.Intermediate` tuple. Only inside `nnx.capture` (which gives the module
  `__captures__` for the call): elsewhere nothing is stored, so the network's state is the
  same and the call is safe inside jax transformations (MeanFlow's `jax.jvp`)."""
  if hasattr(network, '__captures__'):
    network.sow(nnx.Intermediate, BLOCK_OUTPUTS, tuple(outputs))


def capture_block_outputs(fn: Callable, network: nnx.Module, *args, **kwargs):
  """`fn(network, *args, **kwargs)` and the block outputs of every evaluation of `network`
  inside it: (result, (((B, N, D_1), ..., (B, N, D_depth)) per evaluation, ...)), the second
  empty when `fn` did not evaluate the network."""
  result, sown = nnx.capture(fn, nnx.Intermediate)(network, *args, **kwargs)
  return result, sown[BLOCK_OUTPUTS].get_value() if BLOCK_OUTPUTS in sown else ()


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
  """t (B,) -> (B, D): sinusoid(freq_embed_size) -> Linear -> SiLU -> Linear; kernels
  N(0, 0.02), biases zero (`bias_init='zeros'`, DiT) or torch's default (`'torch'`, DDT)."""

  def __init__(self, hidden_size: int, freq_embed_size: int = 256, max_period: float = 10000.0,
               bias_init: str = 'zeros', *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.freq_embed_size = freq_embed_size
    self.max_period = max_period
    self.linear1, self.linear2 = time_mlp(freq_embed_size, hidden_size, bias_init, dtype=dtype,
                                          rngs=rngs)

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


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v for q, k, v (B, L, H, Dh) -> (B, L, H, Dh).

  GPU/TPU: `jax.nn.dot_product_attention` (fused kernels where the platform has them). CPU:
  `_cpu_attention`, about twice as fast forward and backward on XLA:CPU, and without the
  O(L^2) logits and weights of the whole batch in memory (`benchmarks/README.md`). Inside
  `forward_mode()`, always `jax.nn.dot_product_attention`: `_cpu_attention`'s custom
  gradient is reverse-mode only.
  """
  if jax.default_backend() != 'cpu' or _forward_mode_depth:
    return jax.nn.dot_product_attention(q, k, v)
  return _cpu_attention(q, k, v)


_forward_mode_depth = 0


@contextlib.contextmanager
def forward_mode():
  """Networks traced inside take formulations JAX differentiates in forward mode too, for
  losses that call the network under `jax.jvp` (MeanFlow's du/dt): plain attention and
  LayerNorm instead of their reverse-mode-only custom gradients; a trace-time setting."""
  global _forward_mode_depth
  _forward_mode_depth += 1
  try:
    yield
  finally:
    _forward_mode_depth -= 1


# Batch elements per step of `_cpu_attention`'s loop: their L x L weights (H L^2 floats each)
# should fit in a core's caches; one element is the minimum.
ATTENTION_CHUNK_BYTES = 8 * 2**20


def _batch_chunk(shape: tuple[int, ...]) -> int:
  """The largest divisor of the batch whose chunk's weights fit ATTENTION_CHUNK_BYTES."""
  batch, length, heads, _ = shape
  fits = max(1, ATTENTION_CHUNK_BYTES // (4 * heads * length * length))
  return max(n for n in range(1, min(batch, fits) + 1) if batch % n == 0)


def _attention_one(q, k, v):
  """One batch element, q, k, v (L, H, Dh) -> (out (L, H, Dh), lse (H, L)); logits and
  softmax in float32:  s = (q / sqrt(Dh)) k^T,  lse = log sum_m exp(s_lm),  out = exp(s - lse) v."""
  scaled = q * (1.0 / math.sqrt(q.shape[-1]))
  logits = jnp.einsum('lhd,mhd->hlm', scaled, k, preferred_element_type=jnp.float32)
  top = jnp.max(logits, axis=-1, keepdims=True)
  unnormalised = jnp.exp(logits - top)
  total = jnp.sum(unnormalised, axis=-1, keepdims=True)
  out = jnp.einsum('hlm,mhd->hld', unnormalised.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / total
  return jnp.swapaxes(out, 0, 1).astype(q.dtype), (top + jnp.log(total))[..., 0]


def _attention_one_backward(q, k, v, out, lse, d_out):
  """Flash-attention gradients of one batch element, the weights recomputed from lse:
      p = exp(s - lse),  dv = p^T do,  ds = p (do v^T - rowsum(do * out)),
      dq = ds k / sqrt(Dh),  dk = ds^T (q / sqrt(Dh))."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  scaled = q * scale
  logits = jnp.einsum('lhd,mhd->hlm', scaled, k, preferred_element_type=jnp.float32)
  weights = jnp.exp(logits - lse[..., None])
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).T  # (H, L)
  d_v = jnp.einsum('hlm,lhd->mhd', weights.astype(d_out.dtype), d_out,
                   preferred_element_type=jnp.float32)
  d_weights = jnp.einsum('lhd,mhd->hlm', d_out, v, preferred_element_type=jnp.float32)
  d_logits = weights * (d_weights - row[..., None])
  d_q = jnp.einsum('hlm,mhd->lhd', d_logits.astype(k.dtype), k,
                   preferred_element_type=jnp.float32) * scale
  d_k = jnp.einsum('hlm,lhd->mhd', d_logits.astype(q.dtype), scaled,
                   preferred_element_type=jnp.float32)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


@jax.custom_vjp
def _cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`attention` as a loop over chunks of the batch (`_batch_chunk`), so that each chunk's
  L x L weights stay in cache; the backward pass keeps q, k, v, out and the row log-sum-exp,
  as flash attention does, and recomputes the weights."""
  return _cpu_attention_forward(q, k, v)[0]


def _cpu_attention_forward(q, k, v):
  out, lse = jax.lax.map(lambda qkv: _attention_one(*qkv), (q, k, v),
                         batch_size=_batch_chunk(q.shape))
  return out, (q, k, v, out, lse)


def _cpu_attention_backward(residuals, d_out):
  return jax.lax.map(lambda args: _attention_one_backward(*args), (*residuals, d_out),
                     batch_size=_batch_chunk(d_out.shape))


_cpu_attention.defvjp(_cpu_attention_forward, _cpu_attention_backward)


SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@jax.custom_jvp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU, tanh approximation (`jax.nn.gelu(approximate=True)`, torch `approximate='tanh'`):
      gelu(x) = x Phi(x),  Phi(x) = (1 + tanh(u)) / 2,  u = sqrt(2/pi) (x + 0.044715 x^3).
  Its derivative Phi(x) + x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 0.044715 x^2) / 2 is one
  array, which is all the backward pass keeps (autodiff through tanh keeps four or five)."""
  return x * (0.5 * (1.0 + jnp.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))))


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  tanh = jnp.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
  cdf = 0.5 * (1.0 + tanh)
  slope = cdf + 0.5 * x * (1.0 - tanh * tanh) * SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
  return x * cdf, dx * slope


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout), `attention`.
  num_heads must divide hidden_size."""

  def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool = True, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    errors.check_divides(num_heads=num_heads, hidden_size=hidden_size)
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
    out = attention(q, k, v)
    return self.proj(out.reshape(x.shape))


class Mlp(nn.Module):
  """fc1 Linear(D, mlp_dim) -> GELU(tanh) -> fc2 Linear(mlp_dim, D) (timm names), init as
  `linear(..., init)` (DiT: xavier); with `dropout_rate` (LightningDiT), dropout after the
  activation and after fc2 when `rngs` is passed."""

  def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float = 0.0,
               init: str = 'xavier', *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dropout_rate = dropout_rate
    self.fc1 = linear(hidden_size, mlp_dim, init, dtype=dtype, rngs=rngs)
    self.fc2 = linear(mlp_dim, hidden_size, init, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    h = dropout(gelu_tanh(self.fc1(x)), self.dropout_rate, rngs)
    return dropout(self.fc2(h), self.dropout_rate, rngs)


def layer_norm(hidden_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> 'LayerNorm':
  """LayerNorm without affine parameters, eps 1e-6 (the adaLN blocks' norm)."""
  del hidden_size, rngs  # no parameters
  return LayerNorm(1e-6, dtype=dtype)


def normalize(x: jax.Array, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the last axis (two-pass variance, as torch). Its
  gradient keeps only the output y and 1/std per row (flax's LayerNorm keeps three arrays of
  x's size):  dx = (g - mean(g) - y mean(g y)) / std. That gradient is reverse-mode only;
  inside `forward_mode()` plain autodiff is used instead."""
  if _forward_mode_depth:
    return _normalize(x, eps)[0]
  return _normalize_reverse(x, eps)


def _normalize(x, eps):
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  inverse_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
  return centred * inverse_std, inverse_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalize_reverse(x: jax.Array, eps: float) -> jax.Array:
  return _normalize(x, eps)[0]


def _normalize_forward(x, eps):
  normed, inverse_std = _normalize(x, eps)
  return normed, (normed, inverse_std)


def _normalize_backward(eps, residuals, g):
  del eps
  normed, inverse_std = residuals
  mean_g = jnp.mean(g, axis=-1, keepdims=True)
  mean_gy = jnp.mean(g * normed, axis=-1, keepdims=True)
  return (inverse_std * (g - mean_g - normed * mean_gy),)


_normalize_reverse.defvjp(_normalize_forward, _normalize_backward)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis without affine parameters (`normalize` in float32, the
  result in `dtype`)."""

  def __init__(self, eps: float = 1e-6, *, dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return normalize(x.astype(jnp.float32), self.eps).astype(self.dtype)


def ada_ln(hidden_size: int, chunks: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  """The zero-initialised Linear(D, chunks*D) of adaLN-Zero (SiLU is applied by the caller)."""
  return nnx.Linear(hidden_size, chunks * hidden_size, kernel_init=zeros, bias_init=zeros,
                    dtype=dtype, rngs=rngs)


# ------------------------------------------------------------------------------------------
# LightningDiT / LightningDDT pieces (hustvl/LightningDiT, bytetriper/RAE layouts).
#   * RMSNorm (LLaMA): x * rsqrt(mean(x^2) + eps) computed in float32, cast back, times a
#     weight initialised to ones;
#   * SwiGLU: fused `w12` Linear(D, 2h) -> (x1, x2) -> silu(x1) * x2 -> `w3` Linear(h, D);
#   * 2-D RoPE (EVA-02 `VisionRotaryEmbeddingFast`): interleaved pairs (x0, x1) -> (-x1, x0);
#     first head_dim/2 channels rotate with the row index, the second half with the column;
#   * Gaussian-Fourier time embedding (RAE): fixed W ~ N(0, scale^2), `[sin, cos](2 pi t W)`.


def torch_default_linear(in_features: int, out_features: int, use_bias: bool = True, *,
                         dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  """A Linear initialised like `torch.nn.Linear`'s default: weight, bias ~ U(+-1/sqrt(fan_in))."""
  init = _torch_uniform(in_features)
  return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=init,
                    bias_init=init, dtype=dtype, rngs=rngs)


def _torch_uniform(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), torch's default for Linear weights and biases."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


def time_mlp(freq_embed_size: int, hidden_size: int, bias_init: str = 'zeros', *,
             dtype=jnp.float32, rngs: nnx.Rngs) -> tuple[nnx.Linear, nnx.Linear]:
  """The two Linears (freq_embed_size -> D -> D) of a time embedder: kernels N(0, 0.02), biases
  zero (`bias_init='zeros'`) or torch's default U(+-1/sqrt(fan_in)) (`'torch'`)."""
  if bias_init not in ('zeros', 'torch'):
    raise ValueError(f"bias_init={bias_init!r}; expected 'zeros' or 'torch'")

  def make(fan_in, fan_out):
    init = _torch_uniform(fan_in) if bias_init == 'torch' else zeros
    return nnx.Linear(fan_in, fan_out, kernel_init=normal_002, bias_init=init, dtype=dtype,
                      rngs=rngs)

  return make(freq_embed_size, hidden_size), make(hidden_size, hidden_size)


def linear(in_features: int, out_features: int, init: str = 'xavier', use_bias: bool = True,
           *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  """A Linear with DiT's xavier-uniform/zero init (`init='xavier'`) or torch's default
  (`init='torch'`, what the RAE DiT-DH blocks keep)."""
  if init == 'torch':
    return torch_default_linear(in_features, out_features, use_bias, dtype=dtype, rngs=rngs)
  if init != 'xavier':
    raise ValueError(f"init={init!r}; expected 'xavier' or 'torch'")
  return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=xavier_uniform,
                    bias_init=zeros, dtype=dtype, rngs=rngs)


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout drawing from the `dropout` stream of `rngs`; identity without rngs."""
  if rate == 0.0 or rngs is None:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, eps 1e-6: normalised in float32, then cast to the compute
  dtype and scaled by `scale` (torch `weight`, initialised to ones)."""

  def __init__(self, dim: int, eps: float = 1e-6, *, dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs  # no random initialisation
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return normed.astype(self.dtype) * self.scale[...].astype(self.dtype)


class SwiGLU(nn.Module):
  """w3(silu(x1) * x2), (x1, x2) = split(w12(x)); hidden width `ffn_dim` (LightningDiT:
  int(2/3 * mlp_dim), no rounding). `dropout` applies to w12's output and to the result."""

  def __init__(self, hidden_size: int, ffn_dim: int, dropout_rate: float = 0.0,
               init: str = 'xavier', *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dropout_rate = dropout_rate
    self.w12 = linear(hidden_size, 2 * ffn_dim, init, dtype=dtype, rngs=rngs)
    self.w3 = linear(ffn_dim, hidden_size, init, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    x1, x2 = jnp.split(dropout(self.w12(x), self.dropout_rate, rngs), 2, axis=-1)
    return dropout(self.w3(nnx.silu(x1) * x2), self.dropout_rate, rngs)


def rope_2d(head_dim: int, grid_size: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin tables (grid_size**2, head_dim) of EVA-02's `VisionRotaryEmbeddingFast(
  dim=head_dim // 2, pt_seq_len=grid_size)`, tokens row-major.

  f_i = 1 / theta^(2i / (head_dim/2)), i < head_dim/4, at positions arange(n)/n*n (float32, as
  torch); each angle is repeated for an interleaved pair; channels [0, head_dim/2) take the
  row angles, [head_dim/2, head_dim) the column angles.
  """
  if head_dim % 4:
    raise ValueError(f'2-D RoPE needs a head dimension divisible by 4, got {head_dim}')
  dim = head_dim // 2
  exponents = np.arange(0, dim, 2, dtype=np.float32)[:dim // 2] / np.float32(dim)
  freqs = np.float32(1.0) / np.power(np.float32(theta), exponents)
  positions = np.arange(grid_size, dtype=np.float32) / np.float32(grid_size) * np.float32(grid_size)
  angles = np.repeat(positions[:, None] * freqs[None], 2, axis=-1)  # (n, dim), pairs interleaved
  rows = np.broadcast_to(angles[:, None, :], (grid_size, grid_size, dim))
  cols = np.broadcast_to(angles[None, :, :], (grid_size, grid_size, dim))
  table = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, head_dim)
  return np.cos(table).astype(np.float32), np.sin(table).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, L, H, Dh) rotated by tables (L, Dh): x cos + rotate_half(x) sin, interleaved pairs
  (x0, x1) -> (-x1, x0). Computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  out = x32 * cos[:, None].astype(jnp.float32) + rotated * sin[:, None].astype(jnp.float32)
  return out.astype(x.dtype)


class RopeAttention(nn.Module):
  """LightningDiT attention: fused qkv (with bias; DDT: `qkv_bias=False`) -> optional per-head
  q/k norms (separate modules) -> optional 2-D RoPE on q and k -> softmax(q k^T / sqrt(Dh)) v
  -> proj. num_heads must divide hidden_size.

  q/k norms are RMSNorm (eps 1e-6) with `rms_norm`, else affine LayerNorm with torch's
  eps 1e-5, as the official code. `attention` is used unless attention weight dropout is
  active (train time with `attn_w_dropout > 0`).
  """

  def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False,
               rms_norm: bool = True, attn_w_dropout: float = 0.0, attn_o_dropout: float = 0.0,
               init: str = 'xavier', qkv_bias: bool = True, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    errors.check_divides(num_heads=num_heads, hidden_size=hidden_size)
    self.num_heads = num_heads
    self.attn_w_dropout = attn_w_dropout
    self.attn_o_dropout = attn_o_dropout
    head_dim = hidden_size // num_heads
    self.qkv = linear(hidden_size, 3 * hidden_size, init, qkv_bias, dtype=dtype, rngs=rngs)
    self.proj = linear(hidden_size, hidden_size, init, dtype=dtype, rngs=rngs)
    if not qk_norm:
      self.q_norm = self.k_norm = None
    elif rms_norm:
      self.q_norm = RMSNorm(head_dim, dtype=dtype)
      self.k_norm = RMSNorm(head_dim, dtype=dtype)
    else:
      self.q_norm = nnx.LayerNorm(head_dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
      self.k_norm = nnx.LayerNorm(head_dim, epsilon=1e-5, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    batch, length, dim = x.shape
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if self.attn_w_dropout > 0 and rngs is not None:
      logits = jnp.einsum('blhd,bmhd->bhlm', q, k) / math.sqrt(q.shape[-1])
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      out = jnp.einsum('bhlm,bmhd->blhd', dropout(weights, self.attn_w_dropout, rngs), v)
    else:
      out = attention(q, k, v)
    return dropout(self.proj(out.reshape(batch, length, dim)), self.attn_o_dropout, rngs)


class FourierTimeEmbedder(nn.Module):
  """Gaussian-Fourier time embedding (RAE `GaussianFourierEmbedding`): t (B,) -> (B, D),
  `[sin(2 pi t W), cos(2 pi t W)]` (sin first) -> Linear -> SiLU -> Linear.

  W (freq_embed_size/2,) ~ N(0, scale^2) is drawn once from `rngs` and fixed: a `Buffer`,
  neither trained nor averaged (torch keeps it as a non-trainable Parameter `W`, an importer
  copies it). MLP kernels N(0, 0.02); biases zero (`bias_init='zeros'`, LightningDiT) or
  torch's default (`'torch'`, RAE DiT-DH, which does not re-initialise them).
  """

  def __init__(self, hidden_size: int, freq_embed_size: int = 512, scale: float = 1.0,
               bias_init: str = 'zeros', *, dtype=jnp.float32, rngs: nnx.Rngs):
    if freq_embed_size % 2:
      raise ValueError(f'freq_embed_size={freq_embed_size} must be even (sin and cos halves)')
    self.W = nn.Buffer(scale * jax.random.normal(rngs.params(), (freq_embed_size // 2,),
                                                 jnp.float32))
    self.linear1, self.linear2 = time_mlp(freq_embed_size, hidden_size, bias_init, dtype=dtype,
                                          rngs=rngs)

  def __call__(self, t: jax.Array) -> jax.Array:
    args = t.astype(jnp.float32)[:, None] * self.W[...][None] * 2 * math.pi
    embedding = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    return self.linear2(nnx.silu(self.linear1(embedding)))


# ------------------------------------------------------------------------------------------
# MCG-NJU DDT pieces (`decoupled_improved_dit.py` layouts).
#   * patches flattened in (c, p, q) order, as `F.unfold` / `F.fold` on NCHW;
#   * SwiGLU with separate `w1`, `w3` (gate and value) and `w2` (out), no biases (LLaMA);
#   * 2-D RoPE of `precompute_freqs_cis_2d`: per frequency, a column (x) pair then a row (y)
#     pair; positions linspace(0, scale, n) on each axis.


def patchify_cpq(x: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, (H/p)*(W/p), C*p*p) tokens, row-major, each vector in (c, p, q)
  order (what `F.unfold(x_nchw, p, stride=p).transpose(1, 2)` gives)."""
  batch, height, width, channels = x.shape
  p = patch_size
  x = x.reshape(batch, height // p, p, width // p, p, channels)
  x = jnp.einsum('nhpwqc->nhwcpq', x)
  return x.reshape(batch, (height // p) * (width // p), channels * p * p)


def unpatchify_cpq(x: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
  """The inverse of `patchify_cpq` (`F.fold` of non-overlapping patches):
  (B, (H/p)*(W/p), C*p*p) -> (B, H, W, C)."""
  batch, _, dim = x.shape
  p = patch_size
  channels = dim // (p * p)
  x = x.reshape(batch, height // p, width // p, channels, p, p)
  x = jnp.einsum('nhwcpq->nhpwqc', x)
  return x.reshape(batch, height, width, channels)


class SplitSwiGLU(nn.Module):
  """w2(silu(w1(x)) * w3(x)) with separate Linears (LLaMA / MCG-NJU DDT `FeedForward`);
  hidden width `ffn_dim` (DDT: int(2 * mlp_dim / 3)); `use_bias=False` as DDT. Init as
  `linear(..., init)` (DDT keeps torch's default)."""

  def __init__(self, hidden_size: int, ffn_dim: int, use_bias: bool = False,
               init: str = 'torch', *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.w1 = linear(hidden_size, ffn_dim, init, use_bias, dtype=dtype, rngs=rngs)
    self.w3 = linear(hidden_size, ffn_dim, init, use_bias, dtype=dtype, rngs=rngs)
    self.w2 = linear(ffn_dim, hidden_size, init, use_bias, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w2(nnx.silu(self.w1(x)) * self.w3(x))


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps)` in float32, value for value: a float32 step, the
  first half start + i*step and the second half end - (steps-1-i)*step, each rounded once
  (fused multiply-add, here exact in float64)."""
  if steps == 1:
    return np.array([start], np.float32)
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
  index = np.arange(steps, dtype=np.float64)
  first = np.float64(start32) + step * index
  second = np.float64(end32) - step * (steps - 1 - index)
  return np.where(index < steps // 2, first, second).astype(np.float32)


def rope_2d_xy(head_dim: int, height: int, width: int, theta: float = 10000.0,
               scale: float = 16.0) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin tables (height*width, head_dim) of MCG-NJU DDT's
  `precompute_freqs_cis_2d(head_dim, height, width, theta, scale)`, for `apply_rope`.

  f_j = 1 / theta^(4j / head_dim), j < head_dim/4; column positions linspace(0, scale, width),
  row positions linspace(0, scale, height) (float32, as torch), tokens row-major. The complex
  pairs (channels 2k, 2k+1) alternate: pair 2j rotates by x * f_j (column), pair 2j+1 by
  y * f_j (row). The positions do not depend on the grid's training size: a 16x16 grid has
  spacing 16/15, a 32x32 grid 16/31.
  """
  if head_dim % 4:
    raise ValueError(f'DDT 2-D RoPE needs a head dimension divisible by 4, got {head_dim}')
  exponents = np.arange(0, head_dim, 4, dtype=np.float32)[:head_dim // 4] / np.float32(head_dim)
  freqs = np.float32(1.0) / np.power(np.float32(theta), exponents)
  xs = torch_linspace_f32(0.0, scale, width)
  ys = torch_linspace_f32(0.0, scale, height)
  rows, cols = np.meshgrid(ys, xs, indexing='ij')
  x_angles = cols.reshape(-1)[:, None] * freqs[None]  # (N, head_dim/4)
  y_angles = rows.reshape(-1)[:, None] * freqs[None]
  pairs = np.stack([x_angles, y_angles], axis=-1).reshape(height * width, head_dim // 2)
  table = np.repeat(pairs, 2, axis=-1).astype(np.float32)  # both channels of a pair
  return np.cos(table).astype(np.float32), np.sin(table).astype(np.float32)
