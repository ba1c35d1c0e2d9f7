"""Encoders map data batches to the space the generator is trained in, and back.

Every encoder is a plain object configured in the experiment graph and used through
pure functions of an explicit `state` (its frozen weights, `{}` when it has none), so
the trainer can pass that state into jitted code instead of baking it in as constants:

    state = encoder.load()                         # weights from local files, once
    z = encoder.encode(state, batch, key)          # (B, H, W, C) data -> (B, h, w, c) latents
    images = encoder.decode(state, z)              # latents -> (B, H, W, C_img) uint8
    encoder.latent_shape(image_size, channels)     # (h, w, c) for an image of that size
    encoder.downsample_factor, latent_channels     # (latent_channels None: = image channels)

`batch` holds what the data source yields: uint8 pixels, or float32 posterior moments
for pre-extracted latent datasets (`data.kind == 'posterior'`).
"""

import jax
import jax.numpy as jnp


class PixelEncoder:
  """Pixel space (diffuse_nnx's 'RGB' encoder): uint8 [0, 255] <-> float [-1, 1].

  `latent_channels` is the image's own channel count (3 for RGB, 1 for greyscale).
  """
  downsample_factor = 1
  latent_channels = None

  def load(self) -> dict:
    return {}

  def latent_shape(self, image_size: int, channels: int) -> tuple[int, int, int]:
    return (image_size, image_size, channels)

  def encode(self, state, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    del state, key
    return images.astype(jnp.float32) / 127.5 - 1.0

  def decode(self, state, z: jax.Array) -> jax.Array:
    del state
    return jnp.clip(jnp.round((z + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
