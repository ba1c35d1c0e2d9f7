"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in Flax NNX.

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
.norm1.weight` is `encoder/down_blocks/0/resnets/0/norm1/scale`), so `lib.weights.sd_vae`
is a rename plus a layout transpose (`lib.weights.sd_vae`); `lib.encoders.sd_vae.StabilityVAE`
is the encoder node over it.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lib import nn
from lib.models import layers

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
