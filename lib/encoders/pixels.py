"""Pixel space: the encoder of a model trained on the images themselves."""

import jax
import jax.numpy as jnp

from lib.encoders.base import FrozenNode


class PixelEncoder(FrozenNode):
  """Pixel space (diffuse_nnx's 'RGB' encoder): uint8 [0, 255] <-> float [-1, 1].

  `latent_channels` is the image's own channel count (3 for RGB, 1 for greyscale).
  """
  downsample_factor = 1
  latent_channels = None

  def latent_shape(self, image_size: int, channels: int) -> tuple[int, int, int]:
    return (image_size, image_size, channels)

  def encode(self, state, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    del state, key
    return images.astype(jnp.float32) / 127.5 - 1.0

  def decode(self, state, z: jax.Array) -> jax.Array:
    del state
    return jnp.clip(jnp.round((z + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
