"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in Flax NNX, and its encoder wrapper.

Architecture (defaults = SD-VAE, e.g. stabilityai/sd-vae-ft-mse), images NHWC:
  * Encoder: conv_in 3x3 -> down blocks (`layers_per_block` resnets each, then a stride-2
    3x3 conv on all but the last block, zero-padded by one row/column at the bottom/right
    only, as diffusers does; torch's symmetric padding=1 would shift the grid) -> mid block
    (resnet, single-head self-attention, resnet) -> GroupNorm -> SiLU -> conv_out 3x3 to
    2 * latent_channels moments [mean, logvar].
  * quant_conv 1x1 on the moments; post_quant_conv 1x1 on the latent before decoding.
  * Decoder: conv_in 3x3 -> mid block -> up blocks in reversed channel order
    (`layers_per_block + 1` resnets, then nearest 2x upsampling + 3x3 conv on all but the
    last block) -> GroupNorm -> SiLU -> conv_out 3x3 to RGB in [-1, 1].
  * Every GroupNorm has `norm_num_groups` groups and eps 1e-6; the posterior logvar is
    clamped to [-30, 20].

Parameter paths mirror the diffusers key names one to one (`encoder.down_blocks.0.resnets.0
.norm1.weight` is `encoder/down_blocks/0/resnets/0/norm1/scale`), so `import_diffusers_state_dict`
is a rename plus a layout transpose (conv OIHW -> HWIO, linear (out, in) -> (in, out)).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import nn, paths
from lib.models import layers
from lib.models.checkpoint_io import key_problems, read_state_dict

_EPS = 1e-6
_LOGVAR_RANGE = (-30.0, 20.0)


def _conv(in_channels: int, out_channels: int, kernel_size: int, rngs: nnx.Rngs,
          strides: int = 1, padding=None) -> nnx.Conv:
  """A conv with torch's symmetric `kernel_size // 2` padding unless `padding` is given."""
  pad = kernel_size // 2
  return nnx.Conv(in_channels, out_channels, kernel_size=(kernel_size, kernel_size),
                  strides=(strides, strides),
                  padding=((pad, pad), (pad, pad)) if padding is None else padding, rngs=rngs)


def _group_norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=_EPS, use_fast_variance=False,
                       rngs=rngs)


class ResnetBlock(nn.Module):
  """(B, H, W, C_in) -> (B, H, W, C_out): x' + conv2(silu(norm2(conv1(silu(norm1(x)))))),

  x' = x, or a 1x1 conv of x when C_in != C_out (diffusers `ResnetBlock2D` without temb).
  """

  def __init__(self, in_channels: int, out_channels: int, groups: int, *, rngs: nnx.Rngs):
    self.norm1 = _group_norm(in_channels, groups, rngs)
    self.conv1 = _conv(in_channels, out_channels, 3, rngs)
    self.norm2 = _group_norm(out_channels, groups, rngs)
    self.conv2 = _conv(out_channels, out_channels, 3, rngs)
    self.conv_shortcut = (_conv(in_channels, out_channels, 1, rngs)
                          if in_channels != out_channels else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the H*W positions with a residual connection.

  (B, H, W, C) -> (B, H, W, C): x + to_out(softmax(q k^T / sqrt(C)) v), q, k, v linear
  projections of GroupNorm(x).
  """

  def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
    self.group_norm = _group_norm(channels, groups, rngs)
    self.to_q = nnx.Linear(channels, channels, rngs=rngs)
    self.to_k = nnx.Linear(channels, channels, rngs=rngs)
    self.to_v = nnx.Linear(channels, channels, rngs=rngs)
    self.to_out = nnx.Linear(channels, channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = self.group_norm(x).reshape(batch, height * width, 1, channels)  # (B, L, heads=1, C)
    out = layers.attention(self.to_q(h), self.to_k(h), self.to_v(h))
    return x + self.to_out(out).reshape(x.shape)


class MidBlock(nn.Module):
  """resnet -> attention -> resnet at constant width C: (B, h, w, C) -> (B, h, w, C)."""

  def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([AttentionBlock(channels, groups, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    return self.resnets[1](self.attentions[0](x))


class Downsample(nn.Module):
  """(B, H, W, C) -> (B, H/2, W/2, C): zero-pad one row/column at the bottom/right, then a
  3x3 stride-2 conv without padding (diffusers `Downsample2D(padding=0)`)."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, rngs, strides=2, padding=((0, 1), (0, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nn.Module):
  """(B, H, W, C) -> (B, 2H, 2W, C): nearest-neighbour 2x, then a 3x3 conv."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownBlock(nn.Module):
  """`num_layers` resnets (C_in -> C_out), then a Downsample unless it is the last block."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
               downsample: bool, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, rngs=rngs)
        for i in range(num_layers)])
    self.downsamplers = nnx.List([Downsample(out_channels, rngs=rngs)] if downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in [*self.resnets, *self.downsamplers]:
      x = layer(x)
    return x


class UpBlock(nn.Module):
  """`num_layers` resnets (C_in -> C_out), then an Upsample unless it is the last block."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
               upsample: bool, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, rngs=rngs)
        for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample(out_channels, rngs=rngs)] if upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in [*self.resnets, *self.upsamplers]:
      x = layer(x)
    return x


class Encoder(nn.Module):
  """(B, H, W, in_channels) in [-1, 1] -> (B, H/f, W/f, 2 * latent_channels) moments,
  f = 2 ** (len(block_out_channels) - 1)."""

  def __init__(self, in_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
               groups: int, latent_channels: int, *, rngs: nnx.Rngs):
    channels = list(block_out_channels)
    self.conv_in = _conv(in_channels, channels[0], 3, rngs)
    self.down_blocks = nnx.List([
        DownBlock(channels[max(i - 1, 0)], channels[i], layers_per_block, groups,
                  downsample=i < len(channels) - 1, rngs=rngs)
        for i in range(len(channels))])
    self.mid_block = MidBlock(channels[-1], groups, rngs=rngs)
    self.conv_norm_out = _group_norm(channels[-1], groups, rngs)
    self.conv_out = _conv(channels[-1], 2 * latent_channels, 3, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
  """(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels), f as in the Encoder."""

  def __init__(self, out_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
               groups: int, latent_channels: int, *, rngs: nnx.Rngs):
    channels = list(reversed(block_out_channels))
    self.conv_in = _conv(latent_channels, channels[0], 3, rngs)
    self.mid_block = MidBlock(channels[0], groups, rngs=rngs)
    self.up_blocks = nnx.List([
        UpBlock(channels[max(i - 1, 0)], channels[i], layers_per_block + 1, groups,
                upsample=i < len(channels) - 1, rngs=rngs)
        for i in range(len(channels))])
    self.conv_norm_out = _group_norm(channels[-1], groups, rngs)
    self.conv_out = _conv(channels[-1], out_channels, 3, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
  """The KL-regularised autoencoder; defaults are the SD-VAE's sizes (83.65M parameters).

  Args:
    in_channels: image channels (also the decoder's output channels).
    block_out_channels: widths of the resolution levels; the downsampling factor is
      2 ** (len - 1).
    layers_per_block: resnets per encoder level (the decoder has one more).
    norm_num_groups: GroupNorm groups everywhere.
    latent_channels: channels of the latent (the encoder emits twice as many moments).
  """

  def __init__(self, in_channels: int = 3,
               block_out_channels: Sequence[int] = (128, 256, 512, 512),
               layers_per_block: int = 2, norm_num_groups: int = 32, latent_channels: int = 4,
               *, rngs: nnx.Rngs):
    self.encoder = Encoder(in_channels, block_out_channels, layers_per_block, norm_num_groups,
                           latent_channels, rngs=rngs)
    self.decoder = Decoder(in_channels, block_out_channels, layers_per_block, norm_num_groups,
                           latent_channels, rngs=rngs)
    self.quant_conv = _conv(2 * latent_channels, 2 * latent_channels, 1, rngs)
    self.post_quant_conv = _conv(latent_channels, latent_channels, 1, rngs)

  def posterior(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels),
    logvar clamped to [-30, 20]."""
    mean, logvar = jnp.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
    return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """(B, h, w, latent_channels) raw latent -> (B, h*f, w*f, in_channels), about [-1, 1]."""
    return self.decoder(self.post_quant_conv(z))


# Attention names of diffusers checkpoints saved before the `Attention` refactor (diffusers
# renames them on load, see its `_convert_deprecated_attention_blocks`).
_LEGACY_ATTENTION_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v',
                           'proj_attn': 'to_out.0'}


def _diffusers_key(path: tuple) -> str:
  """NNX state path -> diffusers state-dict key."""
  names = {'kernel': 'weight', 'scale': 'weight', 'to_out': 'to_out.0'}
  return '.'.join(names.get(str(part), str(part)) for part in path)


def _to_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """NNX parameter shape -> its torch shape (conv HWIO -> OIHW, linear (in, out) -> (out, in))."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape))


def _from_torch_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array.T if array.ndim == 2 else array


def _rename_legacy(key: str) -> str:
  parts = key.split('.')
  if 'attentions' in parts and parts[-2] in _LEGACY_ATTENTION_NAMES:
    parts[-2] = _LEGACY_ATTENTION_NAMES[parts[-2]]
  return '.'.join(parts)


def import_diffusers_state_dict(state_dict: dict[str, np.ndarray],
                                abstract_state: nnx.State) -> nnx.State:
  """Fills `abstract_state` (from `nnx.split(nnx.eval_shape(...))` of an AutoencoderKL) with a
  diffusers `AutoencoderKL` state dict ({key: array in torch layout}).

  Raises:
    ValueError: naming every missing, unexpected and mis-shaped key.
  """
  given = {_rename_legacy(key): np.asarray(value) for key, value in state_dict.items()}
  expected = {_diffusers_key(path): (path, variable)
              for path, variable in nnx.to_flat_state(abstract_state)}
  problems = key_problems({key: value.shape for key, value in given.items()},
                          {key: _to_torch_shape(v.shape) for key, (_, v) in expected.items()})
  if problems:
    raise ValueError('the state dict does not match this AutoencoderKL (check that the file is a '
                     'diffusers AutoencoderKL and that encoder.block_out_channels / '
                     'layers_per_block / norm_num_groups match it): ' + '; '.join(problems))
  flat = [(path, variable.replace(jnp.asarray(_from_torch_layout(given[key]), variable.dtype)))
          for key, (path, variable) in expected.items()]
  return nnx.from_flat_state(flat)


class StabilityVAE:
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
    self._graphdef = None

  def _abstract(self) -> tuple[nnx.GraphDef, nnx.State]:
    model = nnx.eval_shape(lambda: AutoencoderKL(
        3, self.block_out_channels, self.layers_per_block, self.norm_num_groups,
        self.latent_channels, rngs=nnx.Rngs(0)))
    return nnx.split(model)

  def model(self, state: nnx.State) -> AutoencoderKL:
    """The AutoencoderKL holding `state` (traceable: usable inside jit)."""
    if self._graphdef is None:
      self._graphdef, _ = self._abstract()
    return nnx.merge(self._graphdef, state)

  def load(self) -> nnx.State:
    """The VAE weights from `weights_path`, without allocating random ones first."""
    if self.weights_path is None:
      raise ValueError('encoder.weights_path is not set: set it to a local diffusers '
                       'AutoencoderKL weights file, `diffusion_pytorch_model.safetensors` (or '
                       '.bin), e.g. from stabilityai/sd-vae-ft-mse')
    if not paths.is_file(self.weights_path, 'encoder.weights_path'):
      raise FileNotFoundError(f'encoder.weights_path={self.weights_path!r} does not exist; '
                              'expected a diffusers `diffusion_pytorch_model.safetensors` file')
    self._graphdef, abstract_state = self._abstract()
    return import_diffusers_state_dict(read_state_dict(self.weights_path), abstract_state)

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
