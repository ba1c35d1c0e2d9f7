"""RAE, the representation autoencoder (Zheng et al. 2025, arXiv 2510.11690, bytetriper/RAE):
a frozen DINOv2-with-registers encoder and a ViT-MAE decoder trained to invert it. This file
holds the decoder network; `lib.encoders.rae.RAE` is the encoder node (contract in
`lib.encoders.base`), `lib.weights.rae` imports the decoder's weights. Inference only. Images
NHWC.

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
    `GeneralDecoder` state dict (see `lib.weights.rae.import_decoder_state_dict`);
  * stats: `stats/dinov2/wReg_base/imagenet1k/stat.pt`, a torch pickle
    `{'mean': None or tensor (768, 16, 16), 'var': tensor (768, 16, 16)}` in CHW order (mean
    None means zero); an `.npz` with `var` (and optionally `mean`) in the same CHW layout works
    too. They are transposed to HWC here.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import errors, nn
from lib.models import dinov2, layers

LAYER_NORM_EPS = 1e-12
# The released RAE ViT-XL decoder (configs/decoder/ViTXL/config.json, patch 16).
DECODER_DEFAULTS = dict(hidden_size=1152, num_layers=28, num_heads=16, mlp_dim=4096,
                        patch_size=16)


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


def check_decoder_sizes(hidden_size: int, num_layers: int, num_heads: int, mlp_dim: int,
                        patch_size: int) -> None:
  """The transformer sizes of `ViTMAEDecoder`, or a ValueError naming the bad one: all at
  least 1, num_heads dividing hidden_size, hidden_size a multiple of 4 (its sin-cos table)."""
  errors.check_positive(num_layers=num_layers, mlp_dim=mlp_dim, patch_size=patch_size)
  errors.check_divides(num_heads=num_heads, hidden_size=hidden_size)
  layers.check_sincos_width(hidden_size=hidden_size)


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
    check_decoder_sizes(hidden_size, num_layers, num_heads, mlp_dim, patch_size)
    errors.check_positive(latent_dim=latent_dim, grid_size=grid_size, out_channels=out_channels)
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
