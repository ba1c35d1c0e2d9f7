"""SD-VAE latents (`lib.models.sd_vae.AutoencoderKL`), normalised per channel as EDM2 does."""

import jax
import jax.numpy as jnp
from flax import nnx

from lib import paths
from lib.encoders.base import FrozenNode
from lib.models.sd_vae import AutoencoderKL
from lib.weights.files import read_state_dict
from lib.weights.sd_vae import import_diffusers_state_dict


class StabilityVAE(FrozenNode):
  """SD-VAE latents, normalised per channel as EDM2 does.

  z_norm = (z - raw_mean) / raw_std * final_std + final_mean, z the raw VAE latent (no
  0.18215 factor); `decode` inverts it. `encode` takes either uint8 RGB pixels (runs the VAE
  encoder) or pre-extracted posterior moments (B, h, w, 2 * latent_channels) =
  [mean, std], float32 (a `kind = 'posterior'` data source), and samples z = mean + eps * std
  (or takes the mean when `sample_posterior=False`).

  Args:
    weights_path: local diffusers `diffusion_pytorch_model.safetensors` (or `.bin`), e.g.
      from stabilityai/sd-vae-ft-mse; only `load()` reads it.
    raw_mean, raw_std: per-channel statistics of the raw latents of the dataset.
    final_mean, final_std: statistics of the normalised latents.
    sample_posterior: sample the posterior (training) or take its mean.
    block_out_channels, layers_per_block, norm_num_groups: architecture (SD-VAE defaults).
  """
  latent_channels = 4

  def __init__(self, weights_path: str | None = None,
               raw_mean: tuple[float, ...] = (0.865, -0.278, 0.216, 0.374),
               raw_std: tuple[float, ...] = (4.86, 5.32, 3.94, 3.99),
               final_mean: float = 0.0, final_std: float = 0.5, sample_posterior: bool = True,
               block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
               layers_per_block: int = 2, norm_num_groups: int = 32):
    if len(raw_mean) != self.latent_channels or len(raw_std) != self.latent_channels:
      raise ValueError(f'encoder.raw_mean / raw_std need {self.latent_channels} values, got '
                       f'{len(raw_mean)} / {len(raw_std)}')
    self.weights_path = weights_path
    self.raw_mean = tuple(raw_mean)
    self.raw_std = tuple(raw_std)
    self.final_mean = final_mean
    self.final_std = final_std
    self.sample_posterior = sample_posterior
    self.block_out_channels = tuple(block_out_channels)
    self.layers_per_block = layers_per_block
    self.norm_num_groups = norm_num_groups
    self.downsample_factor = 2 ** (len(block_out_channels) - 1)

  def network(self) -> AutoencoderKL:
    return AutoencoderKL(3, self.block_out_channels, self.layers_per_block,
                         self.norm_num_groups, self.latent_channels, rngs=nnx.Rngs(0))

  def load(self) -> nnx.State:
    """The VAE weights from `weights_path`, without allocating random ones first."""
    paths.require_file('encoder.weights_path', self.weights_path,
                 'a local diffusers AutoencoderKL weights file, '
                 '`diffusion_pytorch_model.safetensors` (or .bin), e.g. from '
                 'stabilityai/sd-vae-ft-mse')
    return import_diffusers_state_dict(read_state_dict(self.weights_path),
                                       self.abstract_state())

  def latent_shape(self, image_size: int, channels: int) -> tuple[int, int, int]:
    if image_size % self.downsample_factor:
      raise ValueError(f'data.image_size={image_size} is not divisible by '
                       f'encoder.downsample_factor={self.downsample_factor}')
    side = image_size // self.downsample_factor
    return (side, side, self.latent_channels)

  def _scale_bias(self) -> tuple[jax.Array, jax.Array]:
    """z_norm = z * scale + bias."""
    scale = self.final_std / jnp.asarray(self.raw_std, jnp.float32)
    return scale, self.final_mean - jnp.asarray(self.raw_mean, jnp.float32) * scale

  def encode(self, state: nnx.State, batch: jax.Array, key: jax.Array | None = None
             ) -> jax.Array:
    """(B, H, W, 3) uint8 pixels or (B, h, w, 8) float [mean, std] -> (B, h, w, 4) z_norm."""
    channels = batch.shape[-1]
    if channels == 2 * self.latent_channels:
      mean, std = jnp.split(batch.astype(jnp.float32), 2, axis=-1)
    elif channels == 3:
      x = batch.astype(jnp.float32) / 127.5 - 1.0
      mean, logvar = self.model(state).posterior(x)
      std = jnp.exp(0.5 * logvar)
    else:
      raise ValueError(f'StabilityVAE.encode takes (B, H, W, 3) pixels or (B, h, w, '
                       f'{2 * self.latent_channels}) posterior moments, got {batch.shape}')
    if self.sample_posterior:
      if key is None:
        raise ValueError('encoder.sample_posterior=True needs a PRNG key')
      mean = mean + jax.random.normal(key, mean.shape, jnp.float32) * std
    scale, bias = self._scale_bias()
    return mean * scale + bias

  def decode(self, state: nnx.State, z: jax.Array) -> jax.Array:
    """(B, h, w, 4) z_norm -> (B, h*8, w*8, 3) uint8."""
    scale, bias = self._scale_bias()
    x = self.model(state).decode((z.astype(jnp.float32) - bias) / scale)
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
