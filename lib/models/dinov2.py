"""DINOv2 (Oquab et al., arXiv 2304.07193; registers: Darcet et al., arXiv 2309.16588) in Flax
NNX: the frozen self-supervised feature network behind REPA's alignment target and RAE's
encoder (`lib.encoders.dinov2.DINOv2` is the detector node over it; `lib.weights.dinov2`
imports released weights).

Architecture (ViT-S/B/L/g with patch 14), images NHWC:

    x = conv_{14x14, stride 14}(image)                  (B, N, D) patch tokens, N = (H/14)(W/14)
    x = [cls_token, x] + pos_embed                      pos_embed: learned, (1 + 37*37) rows
    x = [x[:, :1], register_tokens, x[:, 1:]]           registers (0 or 4) carry no position
    for each block:                                     pre-LN, LayerScale on both branches
      x = x + ls1 * attn(norm1(x))                      multi-head, fused qkv with bias
      x = x + ls2 * mlp(norm2(x))                       GELU (erf) MLP, ratio 4; SwiGLU for g/14
    x = norm(x)                                         final LayerNorm (affine optional, RAE drops it)
    patch tokens = x[:, 1 + R:],  CLS = x[:, 0]

Every LayerNorm has eps 1e-6. The g/14 SwiGLU hidden width is `(int(4D * 2/3) + 7) // 8 * 8`
(4096 for D = 1536), fused here as one `w12` Linear (first half gate, second half value):
out = w3(silu(x1) * x2).

Position embeddings. The released table covers a 37x37 grid (518x518 inputs); other grids get a
bicubic (align_corners=False) resample of the patch part (the CLS row is kept). Three variants
exist and they do not agree at 224x224 (rel. ~0.5% on B/14 patch features, see the anchors):
  * HF transformers v5 `interpolate_pos_encoding` (the default here, `interpolate_antialias=None`):
    `size=` target grid, float32; no antialias for `Dinov2Model`, antialias for
    `Dinov2WithRegistersModel`. Interpolation is skipped when the grid already matches.
  * torch-hub official code: ViT-*/14 without registers use `scale_factor=(g + 0.1) / 37`
    (`interpolate_offset=0.1`, sampling step 37 / (g + 0.1) instead of 37 / g), no antialias;
    the `*_reg` models use `size=` with antialias, i.e. the same as HF.
  * REPA / diffuse_nnx's DINO detector: the table is resampled once, before use, to 16x16 with
    timm's `resample_abs_pos_embed` (bicubic, antialias) so that nothing is interpolated at run
    time: `resample_pos_embed` + a model built with `pos_grid=16`.
Resampling uses `resize_matrix`, which reproduces torch's `F.interpolate(mode='bicubic',
align_corners=False)` exactly: cubic convolution a = -0.75 with clamped borders without
antialias; PIL-style a = -0.5 filter stretched by the downsampling factor and renormalised
over the in-range taps with antialias (the two kernels differ even when upsampling).

Weights: `lib.weights.dinov2.import_state_dict` takes the state dict of a Hugging Face `Dinov2Model` /
`Dinov2WithRegistersModel` (transformers v5 names `attention.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`, or the v4 names `attention.attention.{query,key,value}`,
`attention.output.dense`, `mlp.weights_in/out` that the released `facebook/dinov2-*` files
use) or of the official torch-hub models (`blocks.{i}.attn.qkv`, `ls1.gamma`, `norm`, ...).
NNX parameter paths follow the torch-hub names (`blocks/3/attn/qkv/kernel` is
`blocks.3.attn.qkv.weight`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import nn
from lib.models import layers

PATCH_SIZE = 14
PRETRAINED_GRID = 37  # 518 / 14: the grid of the released position tables
LAYER_NORM_EPS = 1e-6
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Hub / HF sizes: hidden width, depth, heads, SwiGLU MLP (only the giant model).
SIZES = {
    'S': dict(hidden_size=384, depth=12, num_heads=6),
    'B': dict(hidden_size=768, depth=12, num_heads=12),
    'L': dict(hidden_size=1024, depth=24, num_heads=16),
    'g': dict(hidden_size=1536, depth=40, num_heads=24, swiglu=True),
}

_normal = nnx.initializers.truncated_normal(stddev=0.02)


# ------------------------------------------------------------------------------------------
# torch-compatible bicubic resampling (separable matrices, built once per static shape)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a (torch: -0.75 plain, -0.5 antialiased)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_matrix(in_size: int, out_size: int, antialias: bool = False,
                  scale: float | None = None) -> np.ndarray:
  """(out_size, in_size) float64 matrix of torch's 1-D `F.interpolate(mode='bicubic',
  align_corners=False, antialias=antialias)` along one axis.

  `scale` is the source step per output pixel: in_size / out_size for `size=` (default), or
  1 / scale_factor when torch is called with `scale_factor=` (as the torch-hub DINOv2 code).
  """
  scale = in_size / out_size if scale is None else float(scale)
  matrix = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    if not antialias:
      # Source coordinate of output i; taps floor(src) - 1 .. floor(src) + 2, indices clamped.
      # float32 arithmetic, as torch's CPU kernel for float inputs.
      src = np.float32(scale) * np.float32(i + 0.5) - np.float32(0.5)
      base = int(np.floor(src))
      frac = np.float64(src - np.float32(base))
      for k in range(-1, 3):
        matrix[i, min(max(base + k, 0), in_size - 1)] += _cubic(np.float64(frac - k), -0.75)
    else:
      # PIL-style: the a = -0.5 filter stretched by max(scale, 1), taps inside the image only,
      # weights renormalised to sum to one.
      # float32 arithmetic, as torch's CPU kernel for float inputs.
      f32 = np.float32
      scale32 = f32(scale)
      support = f32(2.0) * scale32 if scale32 >= 1.0 else f32(2.0)
      inverse = f32(1.0) / scale32 if scale32 >= 1.0 else f32(1.0)
      center = scale32 * f32(i + 0.5)
      low = max(int(center - support + f32(0.5)), 0)
      high = min(int(center + support + f32(0.5)), in_size)
      taps = np.arange(low, high).astype(np.float32)
      weights = _cubic((taps - center + f32(0.5)) * inverse, f32(-0.5)).astype(np.float32)
      total = weights.sum(dtype=np.float32)
      matrix[i, low:high] = weights / total if total != 0 else weights
  return matrix


def resize_bicubic(x: jax.Array, size: tuple[int, int], axes: tuple[int, int] = (1, 2),
                   antialias: bool = False,
                   scales: tuple[float | None, float | None] = (None, None)) -> jax.Array:
  """Resamples the two spatial `axes` of `x` to `size` exactly as torch's bicubic
  `F.interpolate(..., align_corners=False)` (see `resize_matrix`); computed in float32 at
  HIGHEST matmul precision and returned in x's dtype. Static shapes only (jit-friendly)."""
  out = x.astype(jnp.float32)
  for axis, new, scale in zip(axes, size, scales):
    old = x.shape[axis]
    if old == new and scale is None:
      continue  # identity (torch's kernels reduce to it too)
    matrix = jnp.asarray(resize_matrix(old, new, antialias, scale), jnp.float32)
    out = jnp.moveaxis(jnp.tensordot(matrix, jnp.moveaxis(out, axis, 0), axes=1,
                                     precision=jax.lax.Precision.HIGHEST), 0, axis)
  return out.astype(x.dtype)


def resample_pos_embed(pos_embed: jax.Array, grid: tuple[int, int], antialias: bool = False,
                       offset: float = 0.0) -> jax.Array:
  """(1, 1 + M*M, D) table -> (1, 1 + gh*gw, D): the CLS row kept, the M x M patch part
  resampled bicubically to (gh, gw) rows x columns, in float32.

  offset = 0: torch `size=(gh, gw)` (HF v5, timm `resample_abs_pos_embed` with antialias);
  offset > 0: torch-hub `scale_factor=((gh + offset) / M, (gw + offset) / M)`.
  """
  num_positions = pos_embed.shape[1] - 1
  side = math.isqrt(num_positions)
  if side * side != num_positions:
    raise ValueError(f'position table of {num_positions} patch rows is not a square grid')
  cls_row, patch = pos_embed[:, :1], pos_embed[0, 1:].reshape(side, side, -1)
  scales = (None, None) if not offset else tuple(side / (g + offset) for g in grid)
  patch = resize_bicubic(patch.astype(jnp.float32), grid, axes=(0, 1), antialias=antialias,
                         scales=scales).astype(pos_embed.dtype)
  return jnp.concatenate([cls_row, patch.reshape(1, grid[0] * grid[1], -1)], axis=1)


# ------------------------------------------------------------------------------------------
# Network


def _layer_norm(dim: int, affine: bool = True, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, use_bias=affine, use_scale=affine,
                       use_fast_variance=False, dtype=dtype, rngs=rngs)


def swiglu_hidden(hidden_size: int, mlp_ratio: float = 4.0) -> int:
  """DINOv2's SwiGLU width: two thirds of the MLP width rounded up to a multiple of 8."""
  return (int(int(hidden_size * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class LayerScale(nn.Module):
  """x * gamma, gamma (D,) per channel (torch-hub `ls1.gamma`, HF `layer_scale1.lambda1`)."""

  def __init__(self, dim: int, init_value: float = 1e-5):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...].astype(x.dtype)


class Mlp(nn.Module):
  """fc1 -> GELU (exact, erf) -> fc2."""

  def __init__(self, hidden_size: int, mlp_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(hidden_size, mlp_dim, kernel_init=_normal, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, hidden_size, kernel_init=_normal, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x), approximate=False))


class Block(nn.Module):
  """Pre-LN ViT block with LayerScale: x + ls1(attn(norm1 x)), then + ls2(mlp(norm2 x))."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
               swiglu: bool = False, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(hidden_size, dtype=dtype, rngs=rngs)
    self.attn = layers.Attention(hidden_size, num_heads, qkv_bias=True, dtype=dtype, rngs=rngs)
    self.ls1 = LayerScale(hidden_size)
    self.norm2 = _layer_norm(hidden_size, dtype=dtype, rngs=rngs)
    if swiglu:
      self.mlp = layers.SwiGLU(hidden_size, swiglu_hidden(hidden_size, mlp_ratio), dtype=dtype,
                               rngs=rngs)
    else:
      self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), dtype=dtype, rngs=rngs)
    self.ls2 = LayerScale(hidden_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2ViT(nn.Module):
  """The DINOv2 vision transformer (see the module docstring).

  Args:
    hidden_size, depth, num_heads: width, blocks, attention heads (`SIZES`).
    num_register_tokens: 0 (`facebook/dinov2-*`, `dinov2_vit*14`) or 4 (`*-with-registers-*`,
      `dinov2_vit*14_reg`).
    swiglu: SwiGLU MLP (the giant model) instead of the GELU MLP.
    mlp_ratio: MLP width / hidden width.
    pos_grid: side M of the stored position table (37 for the released weights; 16 for a
      table pre-resampled for 224 inputs).
    final_norm_affine: keep the scale and bias of the final LayerNorm (RAE drops them).
    interpolate_antialias: antialiased position-table resampling; None = as transformers v5
      (True exactly when there are registers).
    interpolate_offset: 0 = resample to `size=` (HF); 0.1 = the torch-hub plain models.
    in_channels, patch_size: input channels and patch side.
    dtype: compute dtype; parameters stay float32.

  Call: `model(images (B, H, W, C) normalised, return_cls=False, mask=None)` -> patch tokens
  (B, (H/14)(W/14), D) [and the CLS token (B, D)]; `mask` (B, N) bool replaces those patch
  embeddings by `mask_token` (as HF `bool_masked_pos`). `tokens(...)` gives the whole
  normalised sequence (B, 1 + R + N, D).
  """

  def __init__(self, hidden_size: int = 768, depth: int = 12, num_heads: int = 12,
               num_register_tokens: int = 0, swiglu: bool = False, mlp_ratio: float = 4.0,
               pos_grid: int = PRETRAINED_GRID, final_norm_affine: bool = True,
               interpolate_antialias: bool | None = None, interpolate_offset: float = 0.0,
               in_channels: int = 3, patch_size: int = PATCH_SIZE, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.hidden_size = hidden_size
    self.num_register_tokens = num_register_tokens
    self.patch_size = patch_size
    self.pos_grid = pos_grid
    self.interpolate_antialias = (num_register_tokens > 0 if interpolate_antialias is None
                                  else interpolate_antialias)
    self.interpolate_offset = interpolate_offset
    self.dtype = dtype
    self.patch_embed = layers.PatchEmbed(in_channels, hidden_size, patch_size, dtype=dtype,
                                         rngs=rngs)
    self.cls_token = nnx.Param(_normal(rngs.params(), (1, 1, hidden_size)))
    self.mask_token = nnx.Param(jnp.zeros((1, hidden_size)))
    self.pos_embed = nnx.Param(_normal(rngs.params(), (1, 1 + pos_grid * pos_grid, hidden_size)))
    self.register_tokens = (nnx.Param(_normal(rngs.params(), (1, num_register_tokens,
                                                              hidden_size)))
                            if num_register_tokens else None)
    self.blocks = nnx.List([Block(hidden_size, num_heads, mlp_ratio, swiglu, dtype=dtype,
                                  rngs=rngs) for _ in range(depth)])
    self.norm = _layer_norm(hidden_size, final_norm_affine, dtype=dtype, rngs=rngs)

  @property
  def num_prefix_tokens(self) -> int:
    return 1 + self.num_register_tokens

  def position_table(self, grid: tuple[int, int]) -> jax.Array:
    """(1, 1 + gh*gw, D) position embeddings for a gh x gw patch grid."""
    pos_embed = self.pos_embed[...]
    if tuple(grid) == (self.pos_grid, self.pos_grid):
      return pos_embed
    return resample_pos_embed(pos_embed, grid, self.interpolate_antialias,
                              self.interpolate_offset)

  def embed(self, images: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """(B, H, W, C) -> (B, 1 + R + N, D) input tokens [CLS, registers, patches]."""
    batch, height, width, _ = images.shape
    grid = (height // self.patch_size, width // self.patch_size)
    x = self.patch_embed(images.astype(self.dtype))
    if mask is not None:
      x = jnp.where(mask[..., None], self.mask_token[...].astype(x.dtype), x)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (batch, 1, self.hidden_size))
    x = jnp.concatenate([cls, x], axis=1) + self.position_table(grid).astype(x.dtype)
    if self.register_tokens is not None:
      registers = jnp.broadcast_to(self.register_tokens[...].astype(x.dtype),
                                   (batch, self.num_register_tokens, self.hidden_size))
      x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
    return x

  def tokens(self, images: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """(B, H, W, C) -> (B, 1 + R + N, D) final (normalised) tokens."""
    x = self.embed(images, mask)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)

  def __call__(self, images: jax.Array, return_cls: bool = False,
               mask: jax.Array | None = None):
    x = self.tokens(images, mask)
    patches = x[:, self.num_prefix_tokens:]
    return (patches, x[:, 0]) if return_cls else patches
