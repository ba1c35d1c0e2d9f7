"""Inception-v3 as used for FID (the TensorFlow graph of 2015-12-05), in Flax NNX.

This is the network of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, a port of the
TF graph that the original FID code, the improved-GAN Inception Score and ADM's evaluator use.
It differs from torchvision's ImageNet Inception-v3 in:
  * the average pools of the A, C and first E blocks ignore the padding
    (`count_include_pad=False`);
  * the pool branch of the last block (Mixed_7c) is a 3x3 max pool (stride 1, padding 1);
  * a 1008-way classifier (`fc`), no auxiliary classifier, no input transform;
  * BatchNorm epsilon 1e-3, convolutions without bias.

Inputs are uint8 (or float 0..255) NHWC RGB images of any size; they are scaled to [-1, 1]
and resized bilinearly to 299x299 (half-pixel centers, no antialiasing: torch's
`F.interpolate(mode='bilinear', align_corners=False)`, as pytorch-fid). Outputs are the
2048-d `pool3` features (global average of Mixed_7c) and the classifier logits.

The logits are `pool3 @ W` without the bias by default: the Inception Score code of
improved-GAN and of ADM's evaluator takes the `softmax/logits/MatMul` input of the TF graph,
i.e. the matmul before the bias is added. `fc_bias=True` gives the full classifier.

FID protocol caveat: ADM's evaluator feeds 256x256 images to the TF graph, which resizes them
with TF1's `ResizeBilinear` (align_corners=False but *not* half-pixel), so numbers from this
network are pytorch-fid-comparable and close to, not bit-identical with, ADM's.

Parameter paths mirror the pytorch-fid state-dict keys (`Mixed_5b.branch1x1.conv.weight` is
`Mixed_5b/branch1x1/conv/kernel`, `bn.running_mean` is `bn/mean`), so the importer is a
rename plus a layout transpose.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import nn, paths
from lib.weights import importer, torch_layout
from lib.weights.files import read_state_dict

WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
RESOLUTION = 299
FEATURES = 2048
NUM_LOGITS = 1008


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1,
               padding=0, *, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(in_channels, out_channels, kernel_size=_pair(kernel_size),
                         strides=_pair(stride), padding=((ph, ph), (pw, pw)), use_bias=False,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(out_channels, epsilon=1e-3, use_running_average=True,
                            use_fast_variance=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3, stride 1, padding 1, padded positions not counted (FID variant)."""
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  return nnx.max_pool(x, (3, 3), strides=(stride, stride),
                      padding=((padding, padding), (padding, padding)))


class InceptionA(nn.Module):
  """Mixed_5b..5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features."""

  def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv(in_channels, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv(in_channels, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv(in_channels, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg_pool_3x3(x))], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 480 + in."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv(in_channels, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 branches, 768 channels out."""

  def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
    c = channels_7x7
    self.branch1x1 = BasicConv(in_channels, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv(in_channels, c, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv(c, c, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv(c, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv(in_channels, c, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv(c, c, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv(c, c, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv(c, c, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv(c, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x):
    double = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      double = layer(double)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        double,
        self.branch_pool(_avg_pool_3x3(x))], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 512 + in."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv(in_channels, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv(in_channels, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    seven = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                  self.branch7x7x3_4):
      seven = layer(seven)
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), seven,
                            _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b / 7c: expanded 1x3 / 3x1 branches, 2048 channels out. The pool branch averages
  (without padding) in Mixed_7b and takes the maximum in Mixed_7c (`max_pool=True`)."""

  def __init__(self, in_channels: int, max_pool: bool, *, rngs: nnx.Rngs):
    self.max_pool = max_pool
    self.branch1x1 = BasicConv(in_channels, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv(in_channels, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_channels, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x):
    single = self.branch3x3_1(x)
    double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _max_pool_3x3(x, 1, padding=1) if self.max_pool else _avg_pool_3x3(x)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(single), self.branch3x3_2b(single),
        self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
        self.branch_pool(pooled)], axis=-1)


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C), torch `interpolate(bilinear, align_corners=False)`."""
  if x.shape[1:3] == (size, size):
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method='bilinear',
                          antialias=False)


class InceptionV3(nn.Module):
  """The FID Inception-v3: images -> (pool3 features (B, 2048), logits (B, 1008)).

  Args:
    fc_bias: add the classifier bias to the logits (off: the Inception Score convention, see
      the module docstring).
  """

  def __init__(self, fc_bias: bool = False, *, rngs: nnx.Rngs):
    self.fc_bias = fc_bias
    self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, max_pool=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool=True, rngs=rngs)
    self.fc = nnx.Linear(FEATURES, NUM_LOGITS, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """(B, H, W, 3) in [-1, 1], H, W >= 75 -> (B, 2048) pool3 (no resizing)."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool_3x3(x, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool_3x3(x, 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return x.mean(axis=(1, 2))

  def logits(self, pool: jax.Array) -> jax.Array:
    logits = pool @ self.fc.kernel[...]
    return logits + self.fc.bias[...] if self.fc_bias else logits

  def __call__(self, images: jax.Array, resize: bool = True) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, 3) uint8 or float 0..255 -> ((B, 2048) pool3, (B, 1008) logits), float32."""
    x = images.astype(jnp.float32) / 127.5 - 1.0
    if resize:
      x = resize_bilinear(x, RESOLUTION)
    pool = self.features(x)
    return pool, self.logits(pool)


# ----------------------------------------------------------------------------- weights
_LEAVES = {**torch_layout.LEAVES, 'mean': 'running_mean', 'var': 'running_var'}
# Bookkeeping entries of torch BatchNorm that hold no weights.
_IGNORED_SUFFIX = '.num_batches_tracked'


def _torch_key(path: tuple) -> str:
  return torch_layout.torch_key(path, leaves=_LEAVES)


RULES = importer.Rules(
    'FID Inception-v3 of pytorch-fid', lambda path: (_torch_key(path),),
    hint=f"{WEIGHTS_FILE}; torchvision's ImageNet Inception-v3 is a different network")


def to_torch_state_dict(state: nnx.State) -> dict[str, np.ndarray]:
  """The pytorch-fid state dict of `state` (for tests and conversions)."""
  return {_torch_key(path): torch_layout.to_torch(str(path[-1]), np.asarray(variable[...]))
          for path, variable in nnx.to_flat_state(state)}


def import_state_dict(state_dict: dict[str, np.ndarray], abstract) -> nnx.State:
  """A pytorch-fid state dict as the state of an `InceptionV3` (`abstract`: the network or
  its state).

  Raises:
    WeightsMismatch: naming every missing, unexpected and mis-shaped key.
  """
  return importer.fill({key: value for key, value in state_dict.items()
                        if not key.endswith(_IGNORED_SUFFIX)}, abstract, RULES)


@functools.lru_cache(maxsize=2)
def abstract(fc_bias: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract state) of the network; allocates nothing (cached: tracing the ~100
  modules takes seconds)."""
  return nnx.split(nnx.eval_shape(lambda: InceptionV3(fc_bias, rngs=nnx.Rngs(0))))


def check_weights(path: str | None, field: str = 'inception_weights') -> None:
  """Fails at once, naming `field`, when the weights file is not there."""
  paths.require_file(field, path, f'a local copy of pytorch-fid\'s {WEIGHTS_FILE} (the FID '
                     'Inception-v3 weights)')


def load(path: str, fc_bias: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state) of the network with the weights of `path` (a pytorch-fid `.pth`, or
  the same keys in `.safetensors` / `.npz`)."""
  check_weights(path)
  graphdef, abstract_state = abstract(fc_bias)
  return graphdef, import_state_dict(read_state_dict(path), abstract_state)


class Detector:
  """The loaded network as a jitted function of uint8 images, batch spread over `sharding`.

      detector = Detector('pt_inception-2015-12-05-6726825d.pth')
      pool, logits = detector(images)        # numpy (N, 2048), (N, 1008) float32
  """

  def __init__(self, path: str, batch_size: int = 200, sharding=None, fc_bias: bool = False):
    self.graphdef, state = load(path, fc_bias)
    self.batch_size = batch_size
    self.sharding = sharding
    if sharding is not None:
      replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
      state = jax.device_put(state, replicated)
    self.state = state

  def _multiple(self) -> int:
    return 1 if self.sharding is None else self.sharding.mesh.size

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, 3) (greyscale (N, H, W, 1) is repeated to RGB) -> numpy features."""
    images = np.asarray(images)
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    multiple = self._multiple()
    batch = -(-min(self.batch_size, len(images)) // multiple) * multiple
    pools, logits = [], []
    for start in range(0, len(images), batch):
      chunk = images[start:start + batch]
      count = len(chunk)
      if count < batch:  # one compiled shape
        chunk = np.concatenate([chunk, np.zeros((batch - count, *chunk.shape[1:]), chunk.dtype)])
      if self.sharding is not None:
        chunk = jax.device_put(chunk, self.sharding)
      pool, logit = _apply(self.graphdef, self.state, chunk)
      pools.append(_host(pool)[:count])
      logits.append(_host(logit)[:count])
    return np.concatenate(pools), np.concatenate(logits)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, images):
  """Jitted once per (graph, input shape), shared by every `Detector`. Full float32
  precision: GPUs would otherwise run the convolutions in TF32 (~1e-3 relative error)."""
  with jax.default_matmul_precision('highest'):
    return nnx.merge(graphdef, state)(images)


def _host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) array as a numpy array on every process."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
