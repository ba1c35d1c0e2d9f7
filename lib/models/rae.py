"""RAE, the representation autoencoder (Zheng et al. 2025, arXiv 2510.11690, bytetriper/RAE):
a frozen DINOv2-with-registers encoder and a ViT-MAE decoder trained to invert it, as an
encoder of this project (contract in `lib.models.encoders`). Inference only. Images NHWC.

Encode (`src/stage1/rae.py::RAE.encode`, `encoders/dinov2.py::Dinov2withNorm`):

    x = uint8 image / 255                                  (B, H, W, 3) in [0, 1]
    x = bicubic resize to r x r (torch, align_corners=False, no antialias), r = 224
    x = (x - imagenet_mean) / imagenet_std                 resize first, as RAE does
    t = DINOv2-B/14 with 4 registers (HF `Dinov2WithRegistersModel`, position table resampled
        the HF v5 way), final LayerNorm *without* its affine  -> (B, 1 + 4 + g*g, 768)
    z = t[:, 5:] as a g x g grid (row-major)               (B, g, g, 768), g = r / 14 = 16
    z = (z - mean) / sqrt(var + eps)                       per (h, w, c) stats, eps 1e-5

Decode (`RAE.decode`, `decoders/decoder.py::GeneralDecoder` = HF ViT-MAE decoder + trainable CLS):

    z = z * sqrt(var + eps) + mean
    h = [cls, decoder_embed(z tokens)] + pos               (B, 1 + g*g, 1152)
    h = num_layers x pre-LN ViT-MAE layer:                 LayerNorm eps 1e-12
          h = h + o(attn(q, k, v of layernorm_before(h)))  16 heads, q/k/v Linears with bias
          h = h + fc2(gelu_erf(fc1(layernorm_after(h))))   MLP 4096
    p = decoder_pred(decoder_norm(h))[:, 1:]               (B, g*g, P*P*3), CLS row dropped
    x = unpatchify(p)                                      (B, g*P, g*P, 3), P = 16: 256 x 256
    image = uint8(clip(x * imagenet_std + imagenet_mean, 0, 1) * 255)   truncated, not rounded

`cls` is `trainable_cls_token` (zeros at init; it does not go through decoder_embed). `pos` is
the fixed MAE 2-D sin-cos table (`layers.sincos_2d`: first half of the channels encodes the
column, second half the row, [sin, cos] in each half) with a zero CLS row; HF transformers v5
builds the same table (it swaps its halves back to this layout). Patch vectors are in
(p, q, c) order (HF/RAE `unpatchify` is einsum nhwpqc->nchpwq), the order `layers.unpatchify`
reads. The uint8 conversion truncates, as RAE's sampling scripts (`sample_ddp.py`,
`stage1_sample_ddp.py`: `clamp(0, 1).mul(255).to(torch.uint8)`) that produce its FID images.

Released files:
  * encoder: HF `facebook/dinov2-with-registers-base` `model.safetensors` (its final LayerNorm
    scale and bias are ignored);
  * decoder: `decoders/dinov2/wReg_base/ViTXL_n08/model.pt` of nyu-visionx/RAE-collections, a
    `GeneralDecoder` state dict (see `import_decoder_state_dict`);
  * stats: `stats/dinov2/wReg_base/imagenet1k/stat.pt`, a torch pickle
    `{'mean': None or tensor (768, 16, 16), 'var': tensor (768, 16, 16)}` in CHW order (mean
    None means zero); an `.npz` with `var` (and optionally `mean`) in the same CHW layout works
    too. They are transposed to HWC here.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from lib import nn, paths
from lib.models import dinov2, layers
from lib.models.checkpoint_io import key_problems, read_state_dict
from lib.models.import_weights import from_torch, torch_shape

LAYER_NORM_EPS = 1e-12
# A float16-saved table is off by up to ~5e-4; another layout differs by O(1).
POS_EMBED_TOLERANCE = 1e-3
# The released RAE ViT-XL decoder (configs/decoder/ViTXL/config.json, patch 16).
DECODER_DEFAULTS = dict(hidden_size=1152, num_layers=28, num_heads=16, mlp_dim=4096,
                        patch_size=16)


def normalize(z: jax.Array, mean: jax.Array, var: jax.Array, eps: float) -> jax.Array:
  """Raw DINOv2 features -> RAE latents: (z - mean) / sqrt(var + eps)."""
  return (z - mean) / jnp.sqrt(var + eps)


def denormalize(z: jax.Array, mean: jax.Array, var: jax.Array, eps: float) -> jax.Array:
  """The inverse of `normalize`: z * sqrt(var + eps) + mean."""
  return z * jnp.sqrt(var + eps) + mean


def decoder_pos_table(hidden_size: int, grid_size: int) -> np.ndarray:
  """(1, 1 + grid**2, hidden) fixed table: a zero CLS row, then the MAE 2-D sin-cos rows."""
  table = layers.sincos_2d(hidden_size, grid_size)
  return np.concatenate([np.zeros((1, hidden_size)), table])[None].astype(np.float32)


# ------------------------------------------------------------------------------------------
# Decoder


def _layer_norm(dim: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype,
                       rngs=rngs)


class ViTMAELayer(nn.Module):
  """Pre-LN ViT-MAE layer: x + attn(layernorm_before x), then + mlp(layernorm_after x).

  The attention's q, k, v are fused into one `qkv` Linear (`layers.Attention`); the importer
  concatenates the file's separate query/key/value matrices.
  """

  def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.layernorm_before = _layer_norm(hidden_size, dtype=dtype, rngs=rngs)
    self.attention = layers.Attention(hidden_size, num_heads, qkv_bias=True, dtype=dtype,
                                      rngs=rngs)
    self.layernorm_after = _layer_norm(hidden_size, dtype=dtype, rngs=rngs)
    self.mlp = dinov2.Mlp(hidden_size, mlp_dim, dtype=dtype, rngs=rngs)  # exact (erf) GELU

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.layernorm_before(x))
    return x + self.mlp(self.layernorm_after(x))


class ViTMAEDecoder(nn.Module):
  """RAE's ViT decoder (module docstring): latents (B, g, g, latent_dim) -> images
  (B, g*P, g*P, out_channels), ImageNet-normalised pixels.

  Args:
    latent_dim: encoder width (768 for DINOv2-B).
    hidden_size, num_layers, num_heads, mlp_dim: decoder transformer (ViT-XL: 1152, 28, 16,
      4096).
    patch_size: P, the pixel side each latent token decodes to.
    grid_size: g, the latent grid side (224 / 14 = 16).
    out_channels: image channels.
    dtype: compute dtype; parameters stay float32.
  """

  def __init__(self, latent_dim: int = 768, hidden_size: int = 1152, num_layers: int = 28,
               num_heads: int = 16, mlp_dim: int = 4096, patch_size: int = 16,
               grid_size: int = 16, out_channels: int = 3, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.grid_size = grid_size
    self.out_channels = out_channels
    self.dtype = dtype
    self.decoder_embed = nnx.Linear(latent_dim, hidden_size, dtype=dtype, rngs=rngs)
    self.trainable_cls_token = nnx.Param(jnp.zeros((1, 1, hidden_size), jnp.float32))
    self.decoder_pos_embed = nn.Buffer(jnp.asarray(decoder_pos_table(hidden_size, grid_size)))
    self.decoder_layers = nnx.List([
        ViTMAELayer(hidden_size, num_heads, mlp_dim, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)])
    self.decoder_norm = _layer_norm(hidden_size, dtype=dtype, rngs=rngs)
    self.decoder_pred = nnx.Linear(hidden_size, patch_size * patch_size * out_channels,
                                   dtype=dtype, rngs=rngs)

  @property
  def image_size(self) -> int:
    return self.grid_size * self.patch_size

  def patch_logits(self, tokens: jax.Array) -> jax.Array:
    """(B, g*g, latent_dim) row-major tokens -> (B, g*g, P*P*C) patches in (p, q, c) order."""
    if tokens.shape[1] != self.grid_size ** 2:
      raise ValueError(f'ViTMAEDecoder takes {self.grid_size ** 2} tokens (a {self.grid_size}'
                       f'x{self.grid_size} grid), got {tokens.shape[1]}')
    x = self.decoder_embed(tokens.astype(self.dtype))
    cls = jnp.broadcast_to(self.trainable_cls_token[...].astype(x.dtype),
                           (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.decoder_pos_embed[...].astype(x.dtype)
    for layer in self.decoder_layers:
      x = layer(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]

  def __call__(self, z: jax.Array) -> jax.Array:
    batch, height, width, channels = z.shape
    patches = self.patch_logits(z.reshape(batch, height * width, channels))
    return layers.unpatchify(patches, self.patch_size, self.out_channels)


# ------------------------------------------------------------------------------------------
# Decoder importer

# Our module inside `decoder_layers.{i}` -> the file's module name(s), per naming scheme.
_LAYER_NAMES = {
    'rae': {'attention.qkv': ('attention.attention.query', 'attention.attention.key',
                              'attention.attention.value'),
            'attention.proj': ('attention.output.dense',),
            'mlp.fc1': ('intermediate.dense',), 'mlp.fc2': ('output.dense',)},
    'hf_v5': {'attention.qkv': ('attention.q_proj', 'attention.k_proj', 'attention.v_proj'),
              'attention.proj': ('attention.o_proj',)},
}
_LAYOUTS = {'rae': 'RAE / transformers v4', 'hf_v5': 'transformers v5'}
_LEAVES = {'kernel': 'weight', 'scale': 'weight'}
# Keys a ViT-MAE decoder file may carry that RAE's decoder does not use.
_IGNORED = {'mask_token': "ViT-MAE's masked-patch token (RAE masks nothing)"}


def _file_keys(path: tuple, layout: str) -> list[str]:
  """NNX path -> the file key(s) holding it (three for the fused qkv)."""
  *modules, leaf = (str(part) for part in path)
  leaf = _LEAVES.get(leaf, leaf) if modules else leaf
  if modules[:1] != ['decoder_layers']:
    return ['.'.join([*modules, leaf])]
  prefix, module = f'decoder_layers.{modules[1]}.', '.'.join(modules[2:])
  names = _LAYER_NAMES[layout].get(module, (module,))
  return [f'{prefix}{name}.{leaf}' for name in names]


def _decoder_subset(state_dict: dict) -> dict[str, np.ndarray]:
  """The decoder's entries: all of them, or those under `decoder.` when there are any (HF
  `ViTMAEForPreTraining`, an RAE stage-1 model), prefix stripped."""
  given = {key: np.asarray(value) for key, value in state_dict.items()}
  if not any(key.startswith('decoder.') for key in given):
    return given
  others = sorted(key for key in given if not key.startswith('decoder.'))
  if others:
    logging.info('RAE decoder: skipping %d keys outside decoder.* (%s, ...)', len(others),
                 others[0])
  return {key[len('decoder.'):]: value for key, value in given.items()
          if key.startswith('decoder.')}


def _check_pos_embed(table: np.ndarray, want: np.ndarray) -> None:
  if table.size != want.size:
    raise ValueError(f'decoder_pos_embed of the file has shape {table.shape}, the decoder '
                     f'{want.shape} (check the latent grid and decoder hidden_size)')
  difference = float(np.abs(table.reshape(want.shape) - want).max())
  if difference > POS_EMBED_TOLERANCE:
    raise ValueError(f'decoder_pos_embed of the file differs from the fixed MAE sin-cos table by '
                     f'up to {difference:.3g} (column half first, [sin, cos] in each half, zero '
                     'CLS row): the file uses another position embedding')


def import_decoder_state_dict(state_dict: dict[str, np.ndarray],
                              abstract_state: nnx.State) -> nnx.State:
  """Fills `abstract_state` (of a `ViTMAEDecoder`, e.g. from `nnx.split(nnx.eval_shape(...))`)
  with an RAE decoder state dict ({key: array in torch layout}).

  Accepted names: RAE's `GeneralDecoder` (= transformers v4 ViT-MAE) `decoder_embed`,
  `trainable_cls_token`, `decoder_layers.{i}.layernorm_{before,after}`,
  `decoder_layers.{i}.attention.attention.{query,key,value}`, `...attention.output.dense`,
  `...intermediate.dense`, `...output.dense`, `decoder_norm`, `decoder_pred`; or the
  transformers v5 names `attention.{q,k,v,o}_proj`, `mlp.fc{1,2}`. An optional `decoder.` prefix
  (HF `ViTMAEForPreTraining`, RAE stage-1 checkpoints) selects the decoder's keys and the rest
  is skipped; `mask_token` is skipped. `decoder_pos_embed` is not imported: when present it must
  equal the fixed sin-cos table (within 1e-3), which the result holds.

  Returns:
    The complete decoder state (parameters from the file, the fixed position table).

  Raises:
    ValueError: naming every missing, unexpected and mis-shaped key (in the file's names), or
      a foreign `decoder_pos_embed`.
  """
  given = _decoder_subset(state_dict)
  for key, why in _IGNORED.items():
    if given.pop(key, None) is not None:
      logging.info('RAE decoder: skipping %s (%s)', key, why)
  file_table = given.pop('decoder_pos_embed', None)
  v5 = any('.attention.q_proj.' in key or '.mlp.fc1.' in key for key in given)
  layout = 'hf_v5' if v5 else 'rae'
  plan, want = [], {}  # plan: (path, variable, file keys); want: {file key: torch shape}
  for path, variable in nnx.to_flat_state(abstract_state):
    if isinstance(variable, nnx.Param):
      keys = _file_keys(path, layout)
      shape = torch_shape(str(path[-1]), variable.shape)
      want.update({key: (shape[0] // len(keys), *shape[1:]) for key in keys})
      plan.append((path, variable, keys))
    else:
      plan.append((path, variable, None))
  found = {key: tuple(value.shape) for key, value in given.items()}
  problems = key_problems(found, want)
  if problems:
    raise ValueError(f'the state dict ({_LAYOUTS[layout]} names) does not match this RAE '
                     'ViTMAEDecoder (check encoder_size / encoder_resolution and the decoder '
                     'hidden_size, num_layers, mlp_dim, patch_size): ' + '; '.join(problems))
  flat = []
  for path, variable, keys in plan:
    if keys is None:  # the fixed position table
      side = math.isqrt(variable.shape[1] - 1)
      array = decoder_pos_table(variable.shape[2], side)
      if file_table is not None:
        _check_pos_embed(file_table, array)
    else:
      array = from_torch(str(path[-1]), np.concatenate([given[key] for key in keys]))
    flat.append((path, variable.replace(jnp.asarray(array, variable.dtype))))
  return nnx.from_flat_state(flat)


# ------------------------------------------------------------------------------------------
# Encoder wrapper


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


def _require_file(name: str, path: str | None, expected: str) -> None:
  if path is None:
    raise ValueError(f'encoder.{name} is not set: set it to {expected}')
  if not paths.is_file(path, f'encoder.{name}'):
    raise FileNotFoundError(f'encoder.{name}={path!r} does not exist; expected {expected}')


class RAE:
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
    self.dinov2 = dinov2.DINOv2(encoder_weights, size=encoder_size, registers=True,
                                resolution=encoder_resolution, pos_embed='hf',
                                final_norm_affine=False, dtype=dtype)
    self.encoder_weights = encoder_weights
    self.decoder_weights = decoder_weights
    self.stats_path = stats_path
    self.encoder_resolution = encoder_resolution
    self.eps = eps
    self.dtype = dtype
    self.decoder_config = dict(DECODER_DEFAULTS, **(decoder or {}))
    self.latent_channels = self.dinov2.feature_dim
    self.grid = self.dinov2.grid
    self.downsample_factor = self.decoder_config['patch_size']
    self.image_size = self.grid * self.downsample_factor
    self._decoder_graphdef = None

  def _abstract_decoder(self) -> tuple[nnx.GraphDef, nnx.State]:
    model = nnx.eval_shape(lambda: ViTMAEDecoder(
        self.latent_channels, **self.decoder_config, grid_size=self.grid,
        dtype=jnp.dtype(self.dtype), rngs=nnx.Rngs(0)))
    return nnx.split(model)

  def decoder_model(self, state: nnx.State) -> ViTMAEDecoder:
    """The decoder holding `state` (traceable: usable inside jit)."""
    if self._decoder_graphdef is None:
      self._decoder_graphdef, _ = self._abstract_decoder()
    return nnx.merge(self._decoder_graphdef, state)

  def load(self) -> dict:
    """{'encoder': DINOv2 state, 'decoder': decoder state, 'mean', 'var': (g, g, C)}."""
    _require_file('encoder_weights', self.encoder_weights,
                  'the Hugging Face `model.safetensors` of facebook/dinov2-with-registers-'
                  + _HF_SIZE_NAMES.get(self.dinov2.size, self.dinov2.size))
    _require_file('decoder_weights', self.decoder_weights,
                  'an RAE decoder state dict, e.g. decoders/dinov2/wReg_base/ViTXL_n08/model.pt '
                  'of nyu-visionx/RAE-collections')
    _require_file('stats_path', self.stats_path,
                  'RAE latent stats, e.g. stats/dinov2/wReg_base/imagenet1k/stat.pt of '
                  'nyu-visionx/RAE-collections ({"mean": None or (C, g, g), "var": (C, g, g)})')
    self._decoder_graphdef, abstract = self._abstract_decoder()
    decoder = import_decoder_state_dict(read_state_dict(self.decoder_weights), abstract)
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
    x = self.decoder_model(state['decoder'])(z).astype(jnp.float32)
    x = (x * jnp.asarray(dinov2.IMAGENET_STD, jnp.float32)
         + jnp.asarray(dinov2.IMAGENET_MEAN, jnp.float32))
    return (jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)
