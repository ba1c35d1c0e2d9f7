"""DINOv2 (Oquab et al., arXiv 2304.07193; registers: Darcet et al., arXiv 2309.16588) in Flax
NNX: the frozen self-supervised feature network behind REPA's alignment target and RAE's
encoder, with an importer for released weights and a `DINOv2` feature-extractor wrapper.

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

Weights: `import_state_dict` takes the state dict of a Hugging Face `Dinov2Model` /
`Dinov2WithRegistersModel` (transformers v5 names `attention.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`, or the v4 names `attention.attention.{query,key,value}`,
`attention.output.dense`, `mlp.weights_in/out` that the released `facebook/dinov2-*` files
use) or of the official torch-hub models (`blocks.{i}.attn.qkv`, `ls1.gamma`, `norm`, ...).
NNX parameter paths follow the torch-hub names (`blocks/3/attn/qkv/kernel` is
`blocks.3.attn.qkv.weight`).
"""

import math
import re
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import nn, paths
from lib.models import layers
from lib.models.checkpoint_io import key_problems, read_state_dict

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


# ------------------------------------------------------------------------------------------
# Importer

_HF_PREFIXES = ('dinov2_with_registers.', 'dinov2.')
_LAYOUTS = {'hub': 'torch-hub (facebookresearch/dinov2)',
            'hf_v5': 'Hugging Face transformers v5', 'hf_v4': 'Hugging Face transformers v4'}


def _hub_key(path: tuple) -> str:
  """NNX state path -> torch-hub key (`blocks.3.attn.qkv.weight`)."""
  names = {'kernel': 'weight', 'scale': 'weight'}
  return '.'.join(names.get(str(part), str(part)) for part in path)


def _to_torch_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
  """NNX parameter shape -> torch shape: conv HWIO -> OIHW, linear (in, out) -> (out, in)."""
  if path[-1] == 'kernel':
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(reversed(shape))
  return tuple(shape)


def _from_torch_layout(path: tuple, array: np.ndarray) -> np.ndarray:
  if path[-1] == 'kernel':
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
  return array


def _hf_keys(hub_key: str, layout: str) -> list[str]:
  """torch-hub key -> the HF key(s) holding it (several when HF splits a fused matrix)."""
  if layout == 'hub':
    return [hub_key]
  v5 = layout == 'hf_v5'
  block = re.fullmatch(r'blocks\.(\d+)\.(.+)', hub_key)
  if block is None:
    for hub, hf in (('cls_token', 'embeddings.cls_token'),
                    ('mask_token', 'embeddings.mask_token'),
                    ('register_tokens', 'embeddings.register_tokens'),
                    ('pos_embed', 'embeddings.position_embeddings'),
                    ('patch_embed.proj.', 'embeddings.patch_embeddings.projection.'),
                    ('norm.', 'layernorm.')):
      if hub_key.startswith(hub):
        return [hf + hub_key[len(hub):]]
    raise KeyError(hub_key)
  index, rest = block.groups()
  prefix = f'encoder.layer.{index}.'
  module, _, leaf = rest.rpartition('.')
  if module == 'attn.qkv':
    names = ('q_proj', 'k_proj', 'v_proj') if v5 else ('query', 'key', 'value')
    stem = 'attention.' if v5 else 'attention.attention.'
    return [f'{prefix}{stem}{name}.{leaf}' for name in names]
  if module == 'mlp.w12':
    return ([f'{prefix}mlp.gate_proj.{leaf}', f'{prefix}mlp.up_proj.{leaf}'] if v5
            else [f'{prefix}mlp.weights_in.{leaf}'])
  renamed = {'attn.proj': 'attention.o_proj' if v5 else 'attention.output.dense',
             'ls1': 'layer_scale1', 'ls2': 'layer_scale2',
             'mlp.w3': 'mlp.down_proj' if v5 else 'mlp.weights_out'}.get(module, module)
  leaf = 'lambda1' if leaf == 'gamma' else leaf
  return [f'{prefix}{renamed}.{leaf}']


def detect_layout(keys) -> str:
  """'hub', 'hf_v5' or 'hf_v4' from the key names of a state dict."""
  keys = list(keys)
  if any(k.startswith(('embeddings.', 'encoder.layer.')) for k in keys):
    v4 = any('.attention.attention.' in k or '.attention.output.dense.' in k
             or '.mlp.weights_in.' in k for k in keys)
    return 'hf_v4' if v4 else 'hf_v5'
  if any(k.startswith(('blocks.', 'cls_token', 'pos_embed', 'patch_embed.')) for k in keys):
    return 'hub'
  raise ValueError('not a DINOv2 state dict: expected Hugging Face keys (embeddings.*, '
                   'encoder.layer.*) or torch-hub keys (cls_token, blocks.*); got '
                   + ', '.join(sorted(keys)[:8]))


def _strip_hf_prefix(key: str) -> str:
  for prefix in _HF_PREFIXES:
    if key.startswith(prefix):
      return key[len(prefix):]
  return key


def import_state_dict(state_dict: dict[str, np.ndarray], abstract_state: nnx.State,
                      final_norm_affine: bool = True) -> nnx.State:
  """Fills `abstract_state` (of a `DINOv2ViT`) from a HF or torch-hub DINOv2 state dict
  ({key: array in torch layout}; the layout is detected from the names).

  `mask_token` may be absent (HF `use_mask_token=False`; zeros then). With
  `final_norm_affine=False` the file's final-LayerNorm scale and bias are ignored.

  Raises:
    ValueError: naming every missing, unexpected and mis-shaped key, in the file's names.
  """
  given = {_strip_hf_prefix(key): np.asarray(value) for key, value in state_dict.items()}
  layout = detect_layout(given)
  if not final_norm_affine:
    for leaf in ('weight', 'bias'):
      for key in _hf_keys(f'norm.{leaf}', layout):
        given.pop(key, None)
  optional = set(_hf_keys('mask_token', layout))
  plan = []  # (path, variable, file keys, torch shape of each part)
  for path, variable in nnx.to_flat_state(abstract_state):
    keys = _hf_keys(_hub_key(path), layout)
    shape = _to_torch_shape(path, variable.shape)
    part = (shape[0] // len(keys), *shape[1:])
    plan.append((path, variable, keys, part))
  expected = {key: part for _, _, keys, part in plan for key in keys}
  problems = key_problems({key: value.shape for key, value in given.items()}, expected,
                          tuple(optional))
  if problems:
    raise ValueError(f'the state dict ({_LAYOUTS[layout]} names) does not match this DINOv2 '
                     '(check size, registers, swiglu and the position grid): '
                     + '; '.join(problems))
  flat = []
  for path, variable, keys, part in plan:
    if all(key in given for key in keys):
      array = np.concatenate([given[key] for key in keys], axis=0)
      array = _from_torch_layout(path, array)
    else:  # an optional key (mask_token)
      array = np.zeros(variable.shape, np.float32)
    flat.append((path, variable.replace(jnp.asarray(array, variable.dtype))))
  return nnx.from_flat_state(flat)


def export_hub_state_dict(state: nnx.State) -> dict[str, np.ndarray]:
  """The inverse of `import_state_dict` for the torch-hub layout (testing, conversion)."""
  out = {}
  for path, variable in nnx.to_flat_state(state):
    array = np.asarray(variable[...])
    if path[-1] == 'kernel':
      array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    out[_hub_key(path)] = array
  return out


# ------------------------------------------------------------------------------------------
# Feature extractor


class DINOv2:
  """Frozen DINOv2 patch features: REPA's alignment target, RAE's encoder.

    images (B, H, W, 3): uint8 [0, 255] or float [-1, 1]
    -> [0, 1] -> ImageNet mean/std -> bicubic resize to `resolution` (torch, no antialias)
    -> DINOv2 -> patch tokens (B, (resolution/14)^2, D), e.g. (B, 256, 768) for B/14 at 224.

  REPA normalises and then resizes (256 -> 224), RAE resizes first; the order does not matter
  (up to float rounding) because the bicubic weights sum to one, so the per-channel affine
  normalisation commutes with the resize; this keeps REPA's order.

  Args:
    weights_path: local weights file: HF `model.safetensors` / `pytorch_model.bin` of
      facebook/dinov2-{small,base,large,giant} or facebook/dinov2-with-registers-*, or a
      torch-hub `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`; only `load()` reads it.
    size: 'S', 'B', 'L' or 'g' (`SIZES`).
    registers: the with-registers models (4 register tokens).
    resolution: input side after resizing; a multiple of 14.
    pos_embed: position-table variant (module docstring): 'hf' (transformers v5, run-time
      resample), 'hub' (torch-hub official code), 'resampled' (REPA: resampled once at load with
      antialias to the resolution's grid).
    final_norm_affine: keep the final LayerNorm's scale and bias (RAE: False).
    antialias: antialiased image resize (REPA, RAE and diffuse_nnx: False).
    dtype: compute dtype name ('float32', 'bfloat16').

  `load() -> state`, `features(state, images, return_cls=False)` are pure functions of the
  explicit state (usable inside jit).
  """

  def __init__(self, weights_path: str | None = None, size: str = 'B', registers: bool = False,
               resolution: int = 224, pos_embed: Literal['hf', 'hub', 'resampled'] = 'hf',
               final_norm_affine: bool = True, antialias: bool = False,
               dtype: str = 'float32'):
    if size not in SIZES:
      raise ValueError(f'DINOv2 size={size!r}; expected one of {", ".join(SIZES)}')
    if resolution % PATCH_SIZE:
      raise ValueError(f'DINOv2 resolution={resolution} is not a multiple of the patch size '
                       f'{PATCH_SIZE} (224 gives 16x16 tokens)')
    if pos_embed not in ('hf', 'hub', 'resampled'):
      raise ValueError(f"DINOv2 pos_embed={pos_embed!r}; expected 'hf', 'hub' or 'resampled'")
    self.weights_path = weights_path
    self.size = size
    self.registers = registers
    self.resolution = resolution
    self.pos_embed = pos_embed
    self.final_norm_affine = final_norm_affine
    self.antialias = antialias
    self.dtype = dtype
    self.feature_dim = SIZES[size]['hidden_size']
    self.grid = resolution // PATCH_SIZE
    self.num_tokens = self.grid ** 2
    self._graphdef = None

  def _architecture(self, pos_grid: int | None = None) -> dict:
    config = dict(SIZES[self.size])
    config.setdefault('pos_grid', PRETRAINED_GRID)
    if pos_grid is not None:
      config['pos_grid'] = pos_grid
    registers = 4 if self.registers else 0
    if self.pos_embed == 'hub':
      antialias, offset = (True, 0.0) if registers else (False, 0.1)
    else:
      antialias, offset = None, 0.0
    return dict(config, num_register_tokens=registers, final_norm_affine=self.final_norm_affine,
                interpolate_antialias=antialias, interpolate_offset=offset)

  def _abstract(self, pos_grid: int | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    if pos_grid is None and self.pos_embed == 'resampled':
      pos_grid = self.grid
    config = self._architecture(pos_grid)
    model = nnx.eval_shape(lambda: DINOv2ViT(**config, dtype=jnp.dtype(self.dtype),
                                             rngs=nnx.Rngs(0)))
    return nnx.split(model)

  def model(self, state: nnx.State) -> DINOv2ViT:
    """The network holding `state` (traceable: usable inside jit)."""
    if self._graphdef is None:
      self._graphdef, _ = self._abstract()
    return nnx.merge(self._graphdef, state)

  def load(self) -> nnx.State:
    """The weights from `weights_path` (pos table resampled once for pos_embed='resampled')."""
    if self.weights_path is None:
      raise ValueError('DINOv2.weights_path is not set: set it to a local DINOv2 weights file, '
                       'e.g. `model.safetensors` of facebook/dinov2-base (or '
                       'facebook/dinov2-with-registers-base with registers=True), or the '
                       'torch-hub `dinov2_vitb14_pretrain.pth`')
    if not paths.is_file(self.weights_path, 'DINOv2.weights_path'):
      raise FileNotFoundError(f'DINOv2.weights_path={self.weights_path!r} does not exist; '
                              'expected a DINOv2 `model.safetensors`, `pytorch_model.bin` or '
                              'torch-hub `.pth` file')
    stored_grid = self._architecture()['pos_grid']
    _, abstract = self._abstract(pos_grid=stored_grid)
    state = import_state_dict(read_state_dict(self.weights_path), abstract,
                              self.final_norm_affine)
    if self.pos_embed == 'resampled' and self.grid != stored_grid:
      # timm `resample_abs_pos_embed(..., new_size=(g, g))`: bicubic with antialias.
      table = state['pos_embed']
      state['pos_embed'] = table.replace(resample_pos_embed(table[...], (self.grid, self.grid),
                                                            antialias=True))
    self._graphdef, _ = self._abstract()
    return state

  def preprocess(self, images: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float [-1, 1] (B, H, W, 3) -> normalised (B, res, res, 3) float32."""
    if images.shape[-1] != 3:
      raise ValueError(f'DINOv2 takes (B, H, W, 3) RGB images, got {images.shape}')
    if images.dtype == jnp.uint8:
      x = images.astype(jnp.float32) / 255.0
    else:
      x = (images.astype(jnp.float32) + 1.0) / 2.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    if x.shape[1:3] != (self.resolution, self.resolution):
      x = resize_bicubic(x, (self.resolution, self.resolution), antialias=self.antialias)
    return x

  def features(self, state: nnx.State, images: jax.Array, return_cls: bool = False):
    """Patch tokens (B, num_tokens, feature_dim) [and the CLS token (B, feature_dim)]."""
    return self.model(state)(self.preprocess(images), return_cls=return_cls)
