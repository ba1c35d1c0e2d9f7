"""RAE latents: normalised DINOv2-with-registers patch features, decoded by the ViT-MAE decoder
of `lib.models.rae` (the whole computation is described there)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import paths
from lib.encoders.base import FrozenNode
from lib.encoders.dinov2 import DINOv2
from lib.models import dinov2
from lib.models.rae import DECODER_DEFAULTS, ViTMAEDecoder, check_decoder_sizes
from lib.weights.files import read_state_dict
from lib.weights.rae import import_decoder_state_dict


def normalize(z: jax.Array, mean: jax.Array, var: jax.Array, eps: float) -> jax.Array:
  """Raw DINOv2 features -> RAE latents: (z - mean) / sqrt(var + eps)."""
  return (z - mean) / jnp.sqrt(var + eps)


def denormalize(z: jax.Array, mean: jax.Array, var: jax.Array, eps: float) -> jax.Array:
  """The inverse of `normalize`: z * sqrt(var + eps) + mean."""
  return z * jnp.sqrt(var + eps) + mean




def read_stats(path: str, channels: int, grid: int) -> tuple[jax.Array, jax.Array]:
  """RAE latent statistics -> (mean, var), each (grid, grid, channels) float32 (HWC).

  The file (`stat.pt` torch pickle or `.npz`) holds `var` and optionally `mean` (absent or
  None: zero), each (channels, grid, grid) in CHW order as RAE's `calculate_stat.py` saves.
  """
  arrays = read_state_dict(path)
  want = (channels, grid, grid)
  if 'var' not in arrays:
    raise ValueError(f'{path}: no `var` entry; expected RAE latent stats {{"mean": None or '
                     f'{want}, "var": {want}}} (CHW), got {", ".join(sorted(arrays))}')
  arrays.setdefault('mean', np.zeros(want, np.float32))
  for name in ('mean', 'var'):
    if tuple(arrays[name].shape) != want:
      raise ValueError(f'{path}: `{name}` has shape {tuple(arrays[name].shape)}, expected {want} '
                       '(channels, grid, grid) of this RAE encoder')
  if (arrays['var'] < 0).any():
    raise ValueError(f'{path}: `var` has negative entries')
  return tuple(jnp.asarray(arrays[name].transpose(1, 2, 0), jnp.float32)
               for name in ('mean', 'var'))


_HF_SIZE_NAMES = {'S': 'small', 'B': 'base', 'L': 'large', 'g': 'giant'}


class RAE(FrozenNode):
  """RAE latents: normalised DINOv2-with-registers patch features (module docstring).

    state = rae.load()                      {'encoder', 'decoder', 'mean', 'var'}
    z = rae.encode(state, images, key)      (B, H, W, 3) uint8 -> (B, 16, 16, 768)
    images = rae.decode(state, z)           -> (B, 256, 256, 3) uint8

  Deterministic: no noise augmentation, `key` is unused. All methods are pure functions of
  `state` (usable inside jit).

  Args:
    encoder_weights: local HF `model.safetensors` of facebook/dinov2-with-registers-{size}.
    decoder_weights: local RAE decoder state dict, e.g. `ViTXL_n08/model.pt`.
    stats_path: local RAE latent stats `stat.pt` (or `.npz`), see `read_stats`.
    encoder_size: DINOv2 size ('S', 'B', 'L', 'g'); its width is `latent_channels`.
    encoder_resolution: DINOv2 input side r (a multiple of 14); latent grid g = r / 14.
    decoder: overrides of `DECODER_DEFAULTS` (hidden_size, num_layers, num_heads, mlp_dim,
      patch_size); decoded images are g * patch_size pixels wide.
    eps: added to the variance in the normalisation.
    dtype: compute dtype name of both networks ('float32', 'bfloat16').
  """

  def __init__(self, encoder_weights: str | None = None, decoder_weights: str | None = None,
               stats_path: str | None = None, encoder_size: str = 'B',
               encoder_resolution: int = 224, decoder: dict | None = None, eps: float = 1e-5,
               dtype: str = 'float32'):
    unknown = sorted(set(decoder or {}) - set(DECODER_DEFAULTS))
    if unknown:
      raise ValueError(f'encoder.decoder: unknown keys {", ".join(unknown)}; expected some of '
                       f'{", ".join(DECODER_DEFAULTS)}')
    self.dinov2 = DINOv2(encoder_weights, size=encoder_size, registers=True,
                                resolution=encoder_resolution, pos_embed='hf',
                                final_norm_affine=False, dtype=dtype)
    self.encoder_weights = encoder_weights
    self.decoder_weights = decoder_weights
    self.stats_path = stats_path
    self.encoder_resolution = encoder_resolution
    self.eps = eps
    self.dtype = dtype
    self.decoder_config = dict(DECODER_DEFAULTS, **(decoder or {}))
    try:
      check_decoder_sizes(**self.decoder_config)
    except ValueError as e:
      raise ValueError(f'encoder.decoder: {e}') from None
    self.latent_channels = self.dinov2.feature_dim
    self.grid = self.dinov2.grid
    self.downsample_factor = self.decoder_config['patch_size']
    self.image_size = self.grid * self.downsample_factor

  def network(self) -> ViTMAEDecoder:
    """The decoder (`model(state['decoder'])` holds its weights; `self.dinov2` the encoder's)."""
    return ViTMAEDecoder(self.latent_channels, **self.decoder_config, grid_size=self.grid,
                         dtype=jnp.dtype(self.dtype), rngs=nnx.Rngs(0))

  def load(self) -> dict:
    """{'encoder': DINOv2 state, 'decoder': decoder state, 'mean', 'var': (g, g, C)}."""
    paths.require_file('encoder.encoder_weights', self.encoder_weights,
                  'the Hugging Face `model.safetensors` of facebook/dinov2-with-registers-'
                  + _HF_SIZE_NAMES.get(self.dinov2.size, self.dinov2.size))
    paths.require_file('encoder.decoder_weights', self.decoder_weights,
                  'an RAE decoder state dict, e.g. decoders/dinov2/wReg_base/ViTXL_n08/model.pt '
                  'of nyu-visionx/RAE-collections')
    paths.require_file('encoder.stats_path', self.stats_path,
                  'RAE latent stats, e.g. stats/dinov2/wReg_base/imagenet1k/stat.pt of '
                  'nyu-visionx/RAE-collections ({"mean": None or (C, g, g), "var": (C, g, g)})')
    decoder = import_decoder_state_dict(read_state_dict(self.decoder_weights),
                                        self.abstract_state())
    mean, var = read_stats(self.stats_path, self.latent_channels, self.grid)
    return {'encoder': self.dinov2.load(), 'decoder': decoder, 'mean': mean, 'var': var}

  def latent_shape(self, image_size: int, channels: int) -> tuple[int, int, int]:
    if channels != 3:
      raise ValueError(f'data.channels={channels}: RAE encodes RGB images (3 channels)')
    if image_size != self.image_size:
      raise ValueError(
          f'data.image_size={image_size}: this RAE decodes {self.image_size}x{self.image_size} '
          f'images (decoder patch_size {self.downsample_factor} x latent grid {self.grid} = '
          f'encoder_resolution {self.encoder_resolution} / 14); set data.image_size='
          f'{self.image_size} or change encoder.encoder_resolution / decoder patch_size')
    return (self.grid, self.grid, self.latent_channels)

  def features(self, state: dict, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) uint8 -> raw (unnormalised) DINOv2 patch features (B, g, g, C) float32."""
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'RAE.encode takes (B, H, W, 3) uint8 images, got {images.shape} '
                       f'{images.dtype}')
    x = images.astype(jnp.float32) / 255.0
    side = self.encoder_resolution
    if x.shape[1:3] != (side, side):
      x = dinov2.resize_bicubic(x, (side, side))
    x = ((x - jnp.asarray(dinov2.IMAGENET_MEAN, jnp.float32))
         / jnp.asarray(dinov2.IMAGENET_STD, jnp.float32))
    tokens = self.dinov2.model(state['encoder'])(x)
    return tokens.astype(jnp.float32).reshape(x.shape[0], self.grid, self.grid, -1)

  def encode(self, state: dict, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """(B, H, W, 3) uint8 -> (B, g, g, C) normalised latents."""
    del key  # deterministic
    return normalize(self.features(state, images), state['mean'], state['var'], self.eps)

  def decode(self, state: dict, z: jax.Array) -> jax.Array:
    """(B, g, g, C) normalised latents -> (B, g*P, g*P, 3) uint8."""
    z = denormalize(z.astype(jnp.float32), state['mean'], state['var'], self.eps)
    x = self.model(state['decoder'])(z).astype(jnp.float32)
    x = (x * jnp.asarray(dinov2.IMAGENET_STD, jnp.float32)
         + jnp.asarray(dinov2.IMAGENET_MEAN, jnp.float32))
    return (jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)
