"""DDT, the Decoupled Diffusion Transformer of MCG-NJU (Wang et al., arXiv 2504.05741;
`src/models/denoiser/decoupled_improved_dit.py`), loadable from its released checkpoints.

Not the RAE "DiT-DH" (`lib.models.lightning_ddt.LightningDDT`): here the condition encoder
and the velocity decoder are the same block class at the same width, in one list.

    t_emb = TimestepEmbedder(t)        sinusoid with max_period = 10 (cos first) -> MLP
    c     = silu(t_emb + y_emb)        (B, D), once; no SiLU inside the adaLN Linears
    tok   = patchify(x)                (B, N, C*p*p), each vector in (c, p, q) order (unfold)
    s     = s_embedder(tok)            Linear; no absolute position embedding
    for blocks[0 : num_encoder_blocks]:            s = block(s, c)
    s     = silu(t_emb + s)            per token (B, N, D)
    h     = x_embedder(tok)
    for blocks[num_encoder_blocks : num_blocks]:   h = block(h, s)     per-token adaLN
    out   = final_layer(h, s);  image = unpatchify(out)                (fold)

    block(x, c): shift1, scale1, gate1, shift2, scale2, gate2 = Linear(c)   (bare Linear)
                 x = x + gate1 * Attn(RMSNorm(x) * (1 + scale1) + shift1)
                 x = x + gate2 * SwiGLU(RMSNorm(x) * (1 + scale2) + shift2)
    Attn: qkv without bias -> per-head RMSNorm q/k norms -> 2-D RoPE (`layers.rope_2d_xy`:
          positions linspace(0, 16, n) per axis, pairs alternate column then row) -> softmax
          attention (`layers.attention`) -> proj (with bias)
    SwiGLU: w2(silu(w1 x) * w3 x), no biases, hidden int(2 * mlp_ratio * D / 3) (XL: 3072)
    RMSNorm: eps 1e-6 in float32, learnt weight; final layer: LayerNorm without affine
          (eps 1e-6), adaLN Linear(D, 2D) (shift, scale), Linear(D, p*p*C)

The label table has num_classes + 1 rows (the null class `num_classes`, 1000 for ImageNet).
RoPE tables follow the input's grid (H/p, W/p) at call time, as the official code; they are
not part of the state.

**Time convention.** The released models use SiT's: t = 1 is data, t = 0 noise
(x_t = t x + (1 - t) n, target x - n). The network is not flipped inside: use it through
`lib.flow.sit.SiT(network_time='data_at_1')` (`lib.flow.conventions`), which feeds it 1 - t
and negates its output. A DDT trained here with the default `data_at_0` interface uses our
convention throughout.

The official forward also returns s so samplers can reuse the encoder's condition across
steps (`state_refresh_rate`; 1 in the release configs, i.e. no reuse). `encode` and `decode`
expose the two halves; `__call__` runs both.

Init follows the official `initialize_weights`: patch embeds xavier-uniform (as Linears) with
zero biases, label table and time-MLP kernels N(0, 0.02), final adaLN and final Linear zero;
everything else keeps torch's default U(+-1/sqrt(fan_in)) (block Linears and their adaLN,
which is not zeroed, and the time-MLP biases). A fresh model still outputs exactly zero.

The released XL/2 checkpoints are Lightning checkpoints: `lib.weights.ddt.import_ddt` takes
the `ema_denoiser.*` weights.
"""

import functools
import jax
import jax.numpy as jnp
from flax import nnx

from lib import nn
from lib.models import layers

# name -> (hidden_size, num_heads, num_blocks, num_encoder_blocks).
#   XL: DDT-XL/2 "22en6de", the released ImageNet 256 / 512 models (675M, `configs/
#       repa_improved_ddt_xlen22de6_*.yaml`; 674,646,352 parameters with patch 2, 4 channels).
#   B, L: the DiT widths with the encoder/decoder splits of the paper's scaling study
#       (DDT-B/2 8en4de, DDT-L/2 20en4de); no checkpoints were released for them.
SIZES = {'B': (768, 12, 12, 8), 'L': (1024, 16, 24, 20), 'XL': (1152, 16, 28, 22)}


class _Embed(nn.Module):
  """The official `Embed`: Linear on unfolded patches (its `norm` is an Identity)."""

  def __init__(self, in_features: int, hidden_size: int, *, dtype, rngs: nnx.Rngs):
    self.proj = nnx.Linear(in_features, hidden_size, kernel_init=layers.xavier_uniform,
                           bias_init=layers.zeros, dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.proj(tokens)


class DDTBlock(nn.Module):
  """RMSNorm / RoPE attention / SwiGLU block with a bare-Linear 6-way adaLN on c (B, 1, D)
  or per token (B, N, D)."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm1 = layers.RMSNorm(hidden_size, dtype=dtype)
    # qkv without bias, RMSNorm q/k norms, torch default init
    self.attn = layers.RopeAttention(hidden_size, num_heads, qk_norm=True, rms_norm=True,
                                     init='torch', qkv_bias=False, dtype=dtype, rngs=rngs)
    self.norm2 = layers.RMSNorm(hidden_size, dtype=dtype)
    mlp_dim = int(hidden_size * mlp_ratio)
    self.mlp = layers.SplitSwiGLU(hidden_size, int(2 * mlp_dim / 3), use_bias=False,
                                  init='torch', dtype=dtype, rngs=rngs)
    self.adaLN_modulation = layers.torch_default_linear(hidden_size, 6 * hidden_size,
                                                        dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array, rope) -> jax.Array:
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.adaLN_modulation(c), 6, -1)
    x = x + gate1 * self.attn(layers.modulate(self.norm1(x), shift1, scale1), rope)
    return x + gate2 * self.mlp(layers.modulate(self.norm2(x), shift2, scale2))


class DDTFinalLayer(nn.Module):
  """LayerNorm (no affine, eps 1e-6) -> bare-Linear adaLN (shift, scale) -> Linear; the
  adaLN and the output Linear are zero-initialised."""

  def __init__(self, hidden_size: int, out_features: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.norm_final = layers.layer_norm(hidden_size, dtype=dtype, rngs=rngs)
    self.adaLN_modulation = layers.ada_ln(hidden_size, 2, dtype=dtype, rngs=rngs)
    self.linear = nnx.Linear(hidden_size, out_features, kernel_init=layers.zeros,
                             bias_init=layers.zeros, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaLN_modulation(c), 2, axis=-1)
    return self.linear(layers.modulate(self.norm_final(x), shift, scale))


@functools.lru_cache(maxsize=32)
def _rope_tables(head_dim: int, height: int, width: int, theta: float, scale: float):
  return layers.rope_2d_xy(head_dim, height, width, theta, scale)


class DDT(nn.Module):
  """Class-conditional MCG-NJU DDT on NHWC inputs.

  Args:
    input_size: spatial size H = W of the (latent) input the model is built for (the
      forward pass accepts any multiple of the patch size; RoPE follows the grid).
    in_channels: channels C of the input (and output).
    num_classes: number of real classes; index `num_classes` is the null class.
    patch_size: patch size p.
    hidden_size, num_heads, num_blocks: width, heads (the official `num_groups`) and total
      number of blocks; `num_encoder_blocks` of them (the first) form the condition encoder.
      `SIZES` lists the published ones (XL: 1152, 16, 28, 22).
    mlp_ratio: the SwiGLU hidden width is int(2 * int(mlp_ratio * D) / 3).
    class_dropout_prob: train-time probability of the null label (the official trainer's
      `null_condition_p` = 0.1); applied only when `rngs` carries `label_dropout`.
    freq_embed_size, time_max_period: the timestep sinusoid (256, 10).
    rope_theta, rope_scale: RoPE base and the end of the position range linspace(0, scale, n).
    take_dt / take_gw: extra time embeddings of t - r and of the guidance weight (MeanFlow),
      added to t_emb (so to c and to the decoder's s), each freshly initialised; no release
      has them.
    dtype: compute dtype ('float32' or 'bfloat16'); parameters stay float32.

  Call: `model(x (B,H,W,C), t (B,), y (B,) int, dt=None, gw=None, rngs=None) -> (B,H,W,C)`;
  t in the released models' convention is t = 1 data (see the module docstring).
  """

  def __init__(self, input_size: int, in_channels: int, num_classes: int, patch_size: int = 2,
               hidden_size: int = 1152, num_heads: int = 16, num_blocks: int = 28,
               num_encoder_blocks: int = 22, mlp_ratio: float = 4.0,
               class_dropout_prob: float = 0.1, freq_embed_size: int = 256,
               time_max_period: float = 10.0, rope_theta: float = 10000.0,
               rope_scale: float = 16.0, take_dt: bool = False, take_gw: bool = False,
               dtype: str = 'float32', *, rngs: nnx.Rngs):
    layers.check_sizes(input_size, patch_size, ('hidden_size', hidden_size, 'num_heads', num_heads),
                       head_multiple=4, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
                       num_blocks=num_blocks, in_channels=in_channels,
                       freq_embed_size=freq_embed_size)
    if not 0 <= num_encoder_blocks <= num_blocks:
      raise ValueError(f'num_encoder_blocks={num_encoder_blocks} must be in [0, num_blocks='
                       f'{num_blocks}]')
    compute = jnp.dtype(dtype)
    patch_dim = in_channels * patch_size * patch_size
    self.input_size = input_size
    self.in_channels = in_channels
    self.num_classes = num_classes
    self.patch_size = patch_size
    self.head_dim = hidden_size // num_heads
    self.num_encoder_blocks = num_encoder_blocks
    self.rope_theta = rope_theta
    self.rope_scale = rope_scale
    self.x_embedder = _Embed(patch_dim, hidden_size, dtype=compute, rngs=rngs)
    self.s_embedder = _Embed(patch_dim, hidden_size, dtype=compute, rngs=rngs)
    # the official init re-draws only the time-MLP kernels (N(0, 0.02)): torch-default biases
    embedder = lambda: layers.TimestepEmbedder(hidden_size, freq_embed_size, time_max_period,
                                               bias_init='torch', dtype=compute, rngs=rngs)
    self.t_embedder = embedder()
    self.dt_embedder = embedder() if take_dt else None
    self.gw_embedder = embedder() if take_gw else None
    self.y_embedder = layers.LabelEmbedder(num_classes, hidden_size, class_dropout_prob,
                                           dtype=compute, rngs=rngs)
    self.blocks = nnx.List([DDTBlock(hidden_size, num_heads, mlp_ratio, dtype=compute,
                                     rngs=rngs) for _ in range(num_blocks)])
    self.final_layer = DDTFinalLayer(hidden_size, patch_dim, dtype=compute, rngs=rngs)

  def rope(self, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """RoPE (cos, sin) tables (height*width, head_dim) for a grid of tokens."""
    cos, sin = _rope_tables(self.head_dim, height, width, self.rope_theta, self.rope_scale)
    return jnp.asarray(cos), jnp.asarray(sin)

  def encode(self, x: jax.Array, t: jax.Array, y: jax.Array, dt: jax.Array | None = None,
             gw: jax.Array | None = None, rngs: nnx.Rngs | None = None, *,
             outputs: list | None = None) -> jax.Array:
    """The condition encoder: the decoder's per-token condition s (B, N, D) (the official
    forward's second output, reusable across nearby steps). Each block's output tokens are
    appended to `outputs` when given."""
    t_emb = layers.time_condition(self.t_embedder, self.dt_embedder, self.gw_embedder, t, dt,
                                  gw)[:, None]
    c = nnx.silu(t_emb + self.y_embedder(y, rngs)[:, None])
    p = self.patch_size
    rope = self.rope(x.shape[1] // p, x.shape[2] // p)
    s = self.s_embedder(layers.patchify_cpq(x, p))
    for block in self.blocks[:self.num_encoder_blocks]:
      s = block(s, c, rope)
      if outputs is not None:
        outputs.append(s)
    return nnx.silu(t_emb + s)

  def decode(self, x: jax.Array, s: jax.Array, *, outputs: list | None = None) -> jax.Array:
    """The velocity decoder conditioned per token on s: (B, H, W, C). Each block's output
    tokens are appended to `outputs` when given."""
    p = self.patch_size
    height, width = x.shape[1], x.shape[2]
    rope = self.rope(height // p, width // p)
    h = self.x_embedder(layers.patchify_cpq(x, p))
    for block in self.blocks[self.num_encoder_blocks:]:
      h = block(h, s, rope)
      if outputs is not None:
        outputs.append(h)
    h = self.final_layer(h, s)
    return layers.unpatchify_cpq(h, p, height, width).astype(x.dtype)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, dt: jax.Array | None = None,
               gw: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
    """decode(x, encode(x, ...)); under `nnx.capture` it sows the output tokens of every block,
    encoder blocks first (`layers.sow_block_outputs`; REPA)."""
    outputs = []
    out = self.decode(x, self.encode(x, t, y, dt, gw, rngs, outputs=outputs), outputs=outputs)
    layers.sow_block_outputs(self, outputs)
    return out

