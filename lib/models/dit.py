"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, arXiv 2212.09748).

    c = t_emb(t) + y_emb(y)                               (+ dt_emb(t - r), gw_emb(w) for MeanFlow)
    x = patchify(x) + pos_embed                           (B, N, D), N = (H/p)(W/p)
    for each block (adaLN-Zero):
      shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))
      x = x + gate1 * Attn(LN(x) * (1 + scale1) + shift1)
      x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)
    out = Linear(LN(x) * (1 + scale) + shift), shift, scale = Linear(SiLU(c))
    image = unpatchify(out)                               (B, H, W, C)

Parameter names and layouts follow facebookresearch/DiT `models.py`, so released
checkpoints import one to one. With `learn_sigma` the head is 2*C wide as in the
official code (SiT/REPA releases); only the first C channels (the prediction) are
returned.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lib import nn
from lib.models import layers

# (hidden_size, depth, num_heads) of the published sizes.
SIZES = {'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16), 'XL': (1152, 28, 16)}


class DiTBlock(nn.Module):
  """Transformer block with adaLN-Zero conditioning."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm1 = layers.layer_norm(hidden_size, dtype=dtype, rngs=rngs)
    self.attn = layers.Attention(hidden_size, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = layers.layer_norm(hidden_size, dtype=dtype, rngs=rngs)
    self.mlp = layers.Mlp(hidden_size, int(hidden_size * mlp_ratio), dtype=dtype, rngs=rngs)
    self.adaLN_modulation = layers.ada_ln(hidden_size, 6, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    modulation = self.adaLN_modulation(nnx.silu(c))[:, None]  # (B, 1, 6D)
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(modulation, 6, axis=-1)
    x = x + gate1 * self.attn(layers.modulate(self.norm1(x), shift1, scale1))
    return x + gate2 * self.mlp(layers.modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
  """adaLN (shift, scale) -> zero-initialised Linear(D, p*p*C_out)."""

  def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm_final = layers.layer_norm(hidden_size, dtype=dtype, rngs=rngs)
    self.adaLN_modulation = layers.ada_ln(hidden_size, 2, dtype=dtype, rngs=rngs)
    self.linear = nnx.Linear(hidden_size, patch_size * patch_size * out_channels,
                             kernel_init=layers.zeros, bias_init=layers.zeros, dtype=dtype,
                             rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaLN_modulation(nnx.silu(c))[:, None], 2, axis=-1)
    return self.linear(layers.modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
  """Class-conditional DiT on NHWC inputs.

  Args:
    input_size: spatial size H = W of the (latent) input.
    in_channels: channels C of the input.
    num_classes: number of real classes; index `num_classes` is the null class.
    patch_size, hidden_size, depth, num_heads, mlp_ratio: the architecture.
    class_dropout_prob: train-time probability of replacing a label by the null class.
    learn_sigma: keep the official 2*C-wide head (for importing SiT/REPA/DiT weights).
    freq_embed_size: width of the sinusoidal time features.
    take_dt / take_gw: extra time embeddings for the interval t - r and the guidance
      weight (MeanFlow); each has its own freshly initialised weights.
    dtype: compute dtype ('float32' or 'bfloat16'); parameters stay float32.

  Call: `dit(x (B,H,W,C), t (B,), y (B,) int, dt=None, gw=None, rngs=None) -> (B,H,W,C)`.
  `rngs` (with a `label_dropout` stream) enables label dropout; leave it None to sample.
  Under `nnx.capture` it sows each block's output tokens (B, N, D) (`layers.sow_block_outputs`;
  REPA).
  """

  def __init__(self, input_size: int, in_channels: int, num_classes: int, patch_size: int = 2,
               hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
               mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
               learn_sigma: bool = False, freq_embed_size: int = 256, take_dt: bool = False,
               take_gw: bool = False, dtype: str = 'float32', *, rngs: nnx.Rngs):
    layers.check_sizes(input_size, patch_size, ('hidden_size', hidden_size, 'num_heads', num_heads),
                       position_table='hidden_size', mlp_ratio=mlp_ratio,
                       class_dropout_prob=class_dropout_prob, depth=depth,
                       in_channels=in_channels, freq_embed_size=freq_embed_size)
    compute = jnp.dtype(dtype)
    self.in_channels = in_channels
    self.num_classes = num_classes
    self.patch_size = patch_size
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.x_embedder = layers.PatchEmbed(in_channels, hidden_size, patch_size, dtype=compute,
                                        rngs=rngs)
    self.t_embedder = layers.TimestepEmbedder(hidden_size, freq_embed_size, dtype=compute,
                                              rngs=rngs)
    self.dt_embedder = (layers.TimestepEmbedder(hidden_size, freq_embed_size, dtype=compute,
                                                rngs=rngs) if take_dt else None)
    self.gw_embedder = (layers.TimestepEmbedder(hidden_size, freq_embed_size, dtype=compute,
                                                rngs=rngs) if take_gw else None)
    self.y_embedder = layers.LabelEmbedder(num_classes, hidden_size, class_dropout_prob,
                                           dtype=compute, rngs=rngs)
    self.pos_embed = nn.Buffer(jnp.asarray(
        layers.sincos_2d(hidden_size, input_size // patch_size), jnp.float32)[None])
    self.blocks = nnx.List([
        DiTBlock(hidden_size, num_heads, mlp_ratio, dtype=compute, rngs=rngs)
        for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, dtype=compute,
                                  rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, dt: jax.Array | None = None,
               gw: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
    c = layers.time_condition(self.t_embedder, self.dt_embedder, self.gw_embedder, t, dt,
                              gw) + self.y_embedder(y, rngs)
    h = self.x_embedder(x) + self.pos_embed[...].astype(c.dtype)
    outputs = []
    for block in self.blocks:
      h = block(h, c)
      outputs.append(h)
    layers.sow_block_outputs(self, outputs)
    h = self.final_layer(h, c)
    out = layers.unpatchify(h, self.patch_size, self.out_channels)
    return out[..., :self.in_channels].astype(x.dtype)
