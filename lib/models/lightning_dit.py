"""LightningDiT (Yao et al., "Reconstruction vs. Generation", arXiv 2501.01423;
hustvl/LightningDiT).

A DiT with optional modern parts, each a constructor switch:

    c = t_emb(t) + y_emb(y)                 (+ dt_emb(t - r), gw_emb(w) for MeanFlow)
    x = patchify(x) + pos_embed             (fixed 2-D sin-cos, always added)
    for each block:
      [shift1,] scale1, gate1, [shift2,] scale2, gate2 = Linear(SiLU(c))   (6-way, or 4-way
                                                                            without shift)
      x = x + gate1 * Attn(Norm(x) * (1 + scale1) + shift1)     RoPE on q, k; opt. q/k norms
      x = x + gate2 * FFN(Norm(x) * (1 + scale2) + shift2)      SwiGLU or GELU MLP
    out = Linear(Norm(x) * (1 + scale) + shift),  shift, scale = Linear(SiLU(c))
    image = unpatchify(out)

  * `swiglu`: FFN = SwiGLU with hidden int(2/3 * mlp_ratio * D) (XL: 3072), no rounding;
  * `rms_norm`: RMSNorm (eps 1e-6, learnt weight) for norm1/norm2/final norm (and the q/k
    norms), else LayerNorm without affine (eps 1e-6);
  * `use_rope`: EVA-02 2-D RoPE over the (H/p, W/p) grid with head_dim/2 per axis;
  * `qk_norm`: separate q and k norms per head;
  * `adaln_shift`: 6-way adaLN (DiT); False is the official `wo_shift` (4-way, no shift);
  * `continuous_time_embed`: Gaussian-Fourier time features (RAE / diffuse_nnx's presets, width
    `freq_embed_size`) instead of DiT's GLIDE sinusoid (the official LightningDiT release).

Blocks also accept a per-token condition (B, L, D), which LightningDDT's decoder uses.
Init follows the official code: xavier-uniform on every Linear (fused qkv as one matrix),
zero biases, patch embed as a Linear, label table and time MLP N(0, 0.02), adaLN and the
final layer zero, so a fresh model outputs exactly zero. Parameter names follow the torch
key layout (`lib.weights.lightning` maps released checkpoints).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lib import nn
from lib.models import layers

# (hidden_size, depth, num_heads): hustvl's `LightningDiT_*` sizes, and S (DiT-S, which
# diffuse_nnx's LightningDiT presets also offer).
SIZES = {'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16), 'XL': (1152, 28, 16),
         '1p0B': (1536, 24, 24), '1p6B': (1792, 28, 28)}


def _norm(hidden_size: int, rms_norm: bool, dtype, rngs: nnx.Rngs):
  if rms_norm:
    return layers.RMSNorm(hidden_size, dtype=dtype)
  return layers.layer_norm(hidden_size, dtype=dtype, rngs=rngs)


def time_embedder(hidden_size: int, continuous: bool, freq_embed_size: int,
                  bias_init: str = 'zeros', *, dtype, rngs: nnx.Rngs) -> nn.Module:
  """Gaussian-Fourier (`continuous`) or GLIDE-sinusoid time embedder of width hidden_size."""
  if continuous:
    return layers.FourierTimeEmbedder(hidden_size, freq_embed_size, bias_init=bias_init,
                                      dtype=dtype, rngs=rngs)
  return layers.TimestepEmbedder(hidden_size, freq_embed_size, bias_init=bias_init, dtype=dtype,
                                 rngs=rngs)


class LightningDiTBlock(nn.Module):
  """Transformer block with adaLN(-Zero) conditioning on c (B, D) or per token (B, L, D)."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
               swiglu: bool = True, rms_norm: bool = True, qk_norm: bool = False,
               adaln_shift: bool = True, mlp_dropout: float = 0.0, attn_w_dropout: float = 0.0,
               attn_o_dropout: float = 0.0, init: str = 'xavier', *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.adaln_shift = adaln_shift
    self.norm1 = _norm(hidden_size, rms_norm, dtype, rngs)
    self.attn = layers.RopeAttention(hidden_size, num_heads, qk_norm, rms_norm, attn_w_dropout,
                                     attn_o_dropout, init, dtype=dtype, rngs=rngs)
    self.norm2 = _norm(hidden_size, rms_norm, dtype, rngs)
    mlp_dim = int(hidden_size * mlp_ratio)
    if swiglu:
      self.mlp = layers.SwiGLU(hidden_size, int(2 / 3 * mlp_dim), mlp_dropout, init,
                               dtype=dtype, rngs=rngs)
    else:
      self.mlp = layers.Mlp(hidden_size, mlp_dim, mlp_dropout, init, dtype=dtype, rngs=rngs)
    self.adaLN_modulation = layers.ada_ln(hidden_size, 6 if adaln_shift else 4, dtype=dtype,
                                          rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array, rope=None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    if c.ndim == 2:
      c = c[:, None]
    if self.adaln_shift:
      shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
          self.adaLN_modulation(nnx.silu(c)), 6, axis=-1)
    else:
      scale1, gate1, scale2, gate2 = jnp.split(self.adaLN_modulation(nnx.silu(c)), 4, axis=-1)
      shift1 = shift2 = None
    x = x + gate1 * self.attn(layers.modulate(self.norm1(x), shift1, scale1), rope, rngs)
    return x + gate2 * self.mlp(layers.modulate(self.norm2(x), shift2, scale2), rngs)


class LightningFinalLayer(nn.Module):
  """Norm -> adaLN (shift, scale; no gate) -> zero-initialised Linear(D, p*p*C_out)."""

  def __init__(self, hidden_size: int, patch_size: int, out_channels: int,
               rms_norm: bool = True, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm_final = _norm(hidden_size, rms_norm, dtype, rngs)
    self.adaLN_modulation = layers.ada_ln(hidden_size, 2, dtype=dtype, rngs=rngs)
    self.linear = nnx.Linear(hidden_size, patch_size * patch_size * out_channels,
                             kernel_init=layers.zeros, bias_init=layers.zeros, dtype=dtype,
                             rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    if c.ndim == 2:
      c = c[:, None]
    shift, scale = jnp.split(self.adaLN_modulation(nnx.silu(c)), 2, axis=-1)
    return self.linear(layers.modulate(self.norm_final(x), shift, scale))


class LightningDiT(nn.Module):
  """Class-conditional LightningDiT on NHWC inputs.

  Args:
    input_size: spatial size H = W of the (latent) input.
    in_channels: channels C of the input.
    num_classes: number of real classes; index `num_classes` is the null class.
    patch_size, hidden_size, depth, num_heads, mlp_ratio: the architecture.
    class_dropout_prob: train-time probability of replacing a label by the null class.
    learn_sigma: keep a 2*C-wide head (for importing such checkpoints); only the first C
      channels are returned.
    continuous_time_embed: Gaussian-Fourier time features instead of the GLIDE sinusoid.
    freq_embed_size: width of the time features (the MLP's input).
    swiglu, rms_norm, use_rope, qk_norm, adaln_shift: see the module docstring.
    mlp_dropout, attn_w_dropout, attn_o_dropout: train-time dropout in the FFN, on the
      attention weights and on the attention output (active only when `rngs` is passed).
    take_dt / take_gw: extra time embeddings of t - r and of the guidance weight (MeanFlow),
      each freshly initialised.
    dtype: compute dtype ('float32' or 'bfloat16'); parameters stay float32.

  The defaults are the released LightningDiT-XL configuration (SwiGLU, RoPE, RMSNorm, no
  qk-norm, 6-way adaLN, sinusoidal time embedding of width 256).

  Call: `model(x (B,H,W,C), t (B,), y (B,) int, dt=None, gw=None, rngs=None) -> (B,H,W,C)`;
  `rngs` (streams `label_dropout`, `dropout`) enables label dropout and dropout. Under
  `nnx.capture` it sows each block's output tokens (B, N, D) (`layers.sow_block_outputs`; REPA).
  """

  def __init__(self, input_size: int, in_channels: int, num_classes: int, patch_size: int = 2,
               hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
               mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
               learn_sigma: bool = False, continuous_time_embed: bool = False,
               freq_embed_size: int = 256, swiglu: bool = True, rms_norm: bool = True,
               use_rope: bool = True, qk_norm: bool = False, adaln_shift: bool = True,
               mlp_dropout: float = 0.0, attn_w_dropout: float = 0.0,
               attn_o_dropout: float = 0.0, take_dt: bool = False, take_gw: bool = False,
               dtype: str = 'float32', *, rngs: nnx.Rngs):
    layers.check_sizes(input_size, patch_size, ('hidden_size', hidden_size, 'num_heads', num_heads),
                       head_multiple=4 if use_rope else 1, position_table='hidden_size',
                       mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
                       dropout_rates=dict(mlp_dropout=mlp_dropout, attn_w_dropout=attn_w_dropout,
                                          attn_o_dropout=attn_o_dropout),
                       depth=depth, in_channels=in_channels, freq_embed_size=freq_embed_size)
    compute = jnp.dtype(dtype)
    grid = input_size // patch_size
    self.in_channels = in_channels
    self.num_classes = num_classes
    self.patch_size = patch_size
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.x_embedder = layers.PatchEmbed(in_channels, hidden_size, patch_size, dtype=compute,
                                        rngs=rngs)
    embedder = lambda: time_embedder(hidden_size, continuous_time_embed, freq_embed_size,
                                     dtype=compute, rngs=rngs)
    self.t_embedder = embedder()
    self.dt_embedder = embedder() if take_dt else None
    self.gw_embedder = embedder() if take_gw else None
    self.y_embedder = layers.LabelEmbedder(num_classes, hidden_size, class_dropout_prob,
                                           dtype=compute, rngs=rngs)
    self.pos_embed = nn.Buffer(jnp.asarray(layers.sincos_2d(hidden_size, grid), jnp.float32)[None])
    if use_rope:
      cos, sin = layers.rope_2d(hidden_size // num_heads, grid)
      self.rope_cos, self.rope_sin = nn.Buffer(jnp.asarray(cos)), nn.Buffer(jnp.asarray(sin))
    else:
      self.rope_cos = self.rope_sin = None
    self.blocks = nnx.List([
        LightningDiTBlock(hidden_size, num_heads, mlp_ratio, swiglu, rms_norm, qk_norm,
                          adaln_shift, mlp_dropout, attn_w_dropout, attn_o_dropout,
                          dtype=compute, rngs=rngs)
        for _ in range(depth)])
    self.final_layer = LightningFinalLayer(hidden_size, patch_size, self.out_channels, rms_norm,
                                           dtype=compute, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, dt: jax.Array | None = None,
               gw: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
    """(B, H, W, C) velocity."""
    c = layers.time_condition(self.t_embedder, self.dt_embedder, self.gw_embedder, t, dt,
                              gw) + self.y_embedder(y, rngs)
    h = self.x_embedder(x) + self.pos_embed[...].astype(c.dtype)
    rope = None if self.rope_cos is None else (self.rope_cos[...], self.rope_sin[...])
    outputs = []
    for block in self.blocks:
      h = block(h, c, rope, rngs)
      outputs.append(h)
    layers.sow_block_outputs(self, outputs)
    h = self.final_layer(h, c)
    out = layers.unpatchify(h, self.patch_size, self.out_channels)
    return out[..., :self.in_channels].astype(x.dtype)
