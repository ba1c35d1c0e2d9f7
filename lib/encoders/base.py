"""The base of frozen encoders and detectors: graph nodes used through pure functions of an
explicit `state` (their frozen weights, `{}` when they have none), so the trainer passes that
state into jitted code instead of baking it in as constants.

Encoders map data batches to the space the generator is trained in, and back:

    state = encoder.load()                         # weights from local files, once
    z = encoder.encode(state, batch, key)          # (B, H, W, C) data -> (B, h, w, c) latents
    images = encoder.decode(state, z)              # latents -> (B, H, W, C_img) uint8
    encoder.latent_shape(image_size, channels)     # (h, w, c) for an image of that size
    encoder.downsample_factor, latent_channels     # (latent_channels None: = image channels)

`batch` holds what the data source yields: uint8 pixels, or float32 posterior moments for
pre-extracted latent datasets (`data.kind == 'posterior'`). Detectors (`DINOv2`) have `load`
and `model` too and compute features instead.
"""

from flax import nnx


class FrozenNode:
  """A node over (at most) one frozen network, built abstractly from `network()`.

    state = node.load()        # the weights (`{}` without a network)
    node.model(state)          # the network holding `state` (traceable: usable inside jit)
  """
  _graphdef = None

  def network(self) -> nnx.Module:
    """Constructs the network (called only under `nnx.eval_shape`)."""
    raise TypeError(f'{type(self).__name__} has no network')

  def abstract_state(self) -> nnx.State:
    """The network's state as shapes, allocating nothing (and its graphdef for `model`)."""
    self._graphdef, state = nnx.split(nnx.eval_shape(self.network))
    return state

  def model(self, state: nnx.State) -> nnx.Module:
    """The network holding `state`."""
    if self._graphdef is None:
      self.abstract_state()
    return nnx.merge(self._graphdef, state)

  def load(self):
    """The frozen weights, read once from local files."""
    return {}
