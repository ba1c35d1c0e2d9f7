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

The paper aligns block 8 of SiT-L/XL and block 4 of SiT-B.
`REPA` is a term of the training objective (`lib.flow.objective`): the projector is its
trainable, the detector's weights its frozen state; h is read from the block outputs the
network sows during the interface's one evaluation, so every network (DiT, LightningDiT,
LightningDDT, DDT) can be aligned.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lib import nn
from lib.errors import ConfigError
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


class REPA:
  """The alignment term added to a flow interface's loss (diffuse_nnx's `repa` block).

  Args:
    detector: frozen feature network with `load()`, `features(state, images) -> (B, N, F)`,
      `feature_dim`, `num_tokens` and `resolution` (`lib.encoders.dinov2.DINOv2`).
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

  def check(self, experiment, patch_size: int | None) -> None:
    """Pixel data (the detector sees the clean image), an interface whose loss evaluates the
    network once, and as many network tokens as detector patch features."""
    kind = getattr(experiment.data, 'kind', None)
    if kind != 'pixels':
      raise ConfigError(
          f'repa aligns features of the clean images, so data must yield pixels (data.kind='
          f"'pixels', e.g. common.imagenet_raw); {type(experiment.data).__name__} yields {kind!r}")
    interface = experiment.interface
    evaluates = getattr(interface, 'evaluates_network', 'an unknown number of times')
    if evaluates != 'once':
      raise ConfigError(f'repa needs an interface whose loss evaluates the network once (SiT, '
                        f'EDM, DDPM); {type(interface).__name__} evaluates it {evaluates}')
    if patch_size:
      height, width = (size // patch_size for size in experiment.latent_shape[:2])
      if height * width != self.detector.num_tokens:
        raise ConfigError(
            f'repa: the network sees {height * width} tokens (latents '
            f'{experiment.latent_shape[0]}x{experiment.latent_shape[1]} / network.patch_size='
            f'{patch_size}) but repa.detector gives {self.detector.num_tokens} patch features '
            f'(resolution={self.detector.resolution}); they must be equal')

  def trainables(self, block_outputs: tuple) -> dict:
    """{'projector': constructor(rngs=...)} sized for the tokens (1, N, D) of block `depth`."""
    if self.depth > len(block_outputs):
      raise ValueError(f'repa.depth={self.depth}: the network has blocks 1..{len(block_outputs)}')
    hidden_size = block_outputs[self.depth - 1].shape[-1]
    return {'projector': functools.partial(Projector, hidden_size, self.projector_dim,
                                           self.detector.feature_dim)}

  def load(self):
    """The detector's frozen weights."""
    return self.detector.load()

  def loss(self, trainables: dict[str, nnx.Module], detector_state, block_outputs: tuple,
           batch: dict) -> tuple[jax.Array, dict]:
    """coefficient * L_REPA per sample (B,) for the block outputs of the network's evaluation
    on the noisy `batch['image']` (B, H, W, 3) uint8, and its batch mean `repa_loss`."""
    target = jax.lax.stop_gradient(self.detector.features(detector_state, batch['image']))
    hidden = block_outputs[self.depth - 1]
    if hidden.shape[1] != target.shape[1]:
      raise ValueError(f'REPA: the network has {hidden.shape[1]} tokens at block '
                       f'{self.depth}, the detector {target.shape[1]} patch features; they must '
                       'be equal (change the patch size or the detector resolution)')
    alignment = alignment_loss(trainables['projector'](hidden), target)
    return self.coefficient * alignment, {'repa_loss': alignment.mean()}
