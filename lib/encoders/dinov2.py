"""DINOv2 features as a frozen detector node (`lib.models.dinov2.DINOv2ViT`)."""

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lib import paths
from lib.encoders.base import FrozenNode
from lib.models.dinov2 import (IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE, PRETRAINED_GRID, SIZES,
                               DINOv2ViT, resample_pos_embed, resize_bicubic)
from lib.weights.dinov2 import import_state_dict
from lib.weights.files import read_state_dict




class DINOv2(FrozenNode):
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

  def network(self, pos_grid: int | None = None) -> DINOv2ViT:
    """The network; its position table covers `pos_grid` (default: the one `model` uses, the
    resolution's grid for pos_embed='resampled', else the released one)."""
    if pos_grid is None and self.pos_embed == 'resampled':
      pos_grid = self.grid
    return DINOv2ViT(**self._architecture(pos_grid), dtype=jnp.dtype(self.dtype),
                     rngs=nnx.Rngs(0))

  def load(self) -> nnx.State:
    """The weights from `weights_path` (pos table resampled once for pos_embed='resampled')."""
    paths.require_file('DINOv2.weights_path', self.weights_path,
                 'a local DINOv2 weights file, e.g. `model.safetensors` of facebook/dinov2-base '
                 '(or facebook/dinov2-with-registers-base with registers=True), or the '
                 'torch-hub `dinov2_vitb14_pretrain.pth`')
    stored_grid = self._architecture()['pos_grid']
    stored = nnx.eval_shape(lambda: self.network(pos_grid=stored_grid))
    state = import_state_dict(read_state_dict(self.weights_path), stored,
                              self.final_norm_affine)
    if self.pos_embed == 'resampled' and self.grid != stored_grid:
      # timm `resample_abs_pos_embed(..., new_size=(g, g))`: bicubic with antialias.
      table = state['pos_embed']
      state['pos_embed'] = table.replace(resample_pos_embed(table[...], (self.grid, self.grid),
                                                            antialias=True))
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
