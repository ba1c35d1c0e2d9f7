"""REPA: representation alignment (Yu et al., arXiv 2410.06940).

The tokens h (B, N, D) output by block `depth` of the network being trained are mapped by a
projector MLP h_phi to the width F of a frozen self-supervised encoder's patch features
y* (B, N, F) of the clean image (DINOv2-B/14 at 224: N = 256, F = 768) and aligned to them
by negative cosine similarity, averaged over tokens (Eq. 8 of the paper):

    L_REPA = -(1/N) sum_n < y*_n / |y*_n| , h_phi(h_n) / |h_phi(h_n)| >     (per sample)
    L      = L_flow + coefficient * L_REPA                                     (coefficient 0.5)

    h_phi = Linear(D, P) -> SiLU -> Linear(P, P) -> SiLU -> Linear(P, F),  P = projector_dim

(8.13M parameters for XL: D = 1152, P = 2048, F = 768). The projector is trained with the
network but is neither averaged by the EMA nor used for sampling. The network's tokens must
line up with the detector's: (H/p)(W/p) = (resolution/14)^2, e.g. 32x32 SD-VAE latents of
256x256 images with p = 2 against DINOv2 at 224: 256 = 256.

The paper aligns block 8 of SiT-L/XL and block 4 of SiT-B; diffuse_nnx's preset uses 4 for all.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lib import nn
from lib.models import layers


class Projector(nn.Module):
  """h_phi: (B, N, D) -> (B, N, F), with PyTorch's default Linear initialisation (REPA's
  `build_mlp`)."""

  def __init__(self, hidden_size: int, projector_dim: int, feature_dim: int, *, rngs: nnx.Rngs):
    self.fc1 = layers.torch_default_linear(hidden_size, projector_dim, rngs=rngs)
    self.fc2 = layers.torch_default_linear(projector_dim, projector_dim, rngs=rngs)
    self.fc3 = layers.torch_default_linear(projector_dim, feature_dim, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.fc3(nnx.silu(self.fc2(nnx.silu(self.fc1(h)))))


def _unit(x: jax.Array) -> jax.Array:
  """x / max(|x|, 1e-12) over the last axis (torch `F.normalize`)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, 1e-12)


def alignment_loss(projected: jax.Array, target: jax.Array) -> jax.Array:
  """-cos(projected, target) averaged over tokens: (B, N, F) x 2 -> (B,)."""
  cosine = jnp.sum(_unit(projected.astype(jnp.float32)) * _unit(target.astype(jnp.float32)),
                   axis=-1)
  return -jnp.mean(cosine, axis=-1)


class _HiddenCapture:
  """Stands for the network inside an interface's loss: calls it with `hidden_at=depth`,
  returns the prediction and keeps the hidden tokens of the (single) call."""

  def __init__(self, network, depth: int):
    self.network = network
    self.depth = depth
    self.hidden = None

  def __getattr__(self, name):  # num_classes, ... of the wrapped network
    if name == 'network':
      raise AttributeError(name)
    return getattr(self.network, name)

  def __call__(self, *args, **kwargs):
    if self.hidden is not None:
      raise ValueError('REPA needs a flow interface whose loss evaluates the network once '
                       '(SiT, EDM)')
    out, self.hidden = self.network(*args, hidden_at=self.depth, **kwargs)
    return out


class REPA:
  """The alignment loss added to a flow interface's loss (diffuse_nnx's `repa` block).

  Args:
    detector: frozen feature network with `load()`, `features(state, images) -> (B, N, F)`,
      `feature_dim` and `num_tokens` (`lib.encoders.dinov2.DINOv2`).
    depth: 1-based block of the network whose output tokens are aligned.
    coefficient: weight of L_REPA in the total loss.
    projector_dim: hidden width P of the projector.
  """

  def __init__(self, detector, depth: int = 8, coefficient: float = 0.5,
               projector_dim: int = 2048):
    if depth < 1:
      raise ValueError(f'repa.depth={depth}; it is the 1-based block whose output is aligned')
    self.detector = detector
    self.depth = depth
    self.coefficient = coefficient
    self.projector_dim = projector_dim

  def hidden_shape(self, make_network, latent_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """(1, N, D) shape of the network's tokens at `depth`, evaluated abstractly."""
    def hidden():
      x = jnp.zeros((1, *latent_shape))
      t, y = jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
      return make_network()(x, t, y, hidden_at=self.depth)[1]
    return nnx.eval_shape(hidden).shape

  def make_projector(self, hidden_size: int, rngs: nnx.Rngs) -> Projector:
    return Projector(hidden_size, self.projector_dim, self.detector.feature_dim, rngs=rngs)

  def loss(self, interface, network, projector: Projector, detector_state, x: jax.Array,
           images: jax.Array, y: jax.Array, key: jax.Array, rngs: nnx.Rngs | None = None):
    """Per-sample L_flow + coefficient * L_REPA for clean data x (B, h, w, c) encoded from
    `images` (B, H, W, 3) uint8. Returns ((B,), aux) with the two terms' batch means."""
    target = jax.lax.stop_gradient(self.detector.features(detector_state, images))
    capture = _HiddenCapture(network, self.depth)
    flow_loss, aux = interface.loss(capture, x, y, key, rngs=rngs)
    if capture.hidden is None:
      raise ValueError(f'{type(interface).__name__}.loss did not call the network')
    if capture.hidden.shape[1] != target.shape[1]:
      raise ValueError(f'REPA: the network has {capture.hidden.shape[1]} tokens at block '
                       f'{self.depth}, the detector {target.shape[1]} patch features; they must '
                       'be equal (change the patch size or the detector resolution)')
    alignment = alignment_loss(projector(capture.hidden), target)
    return flow_loss + self.coefficient * alignment, {
        **aux, 'diffusion_loss': flow_loss.mean(), 'repa_loss': alignment.mean()}
