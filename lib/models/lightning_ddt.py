"""LightningDDT: the RAE "DiT-DH" (DiT with a wide DDT head; Zheng et al., "Diffusion
Transformers with Representation Autoencoders", arXiv 2510.11690; bytetriper/RAE
`src/stage2/models/DDT.py::DiTwDDTHead`), as diffuse_nnx's `lightning_ddt_nnx.py` ports it.

    t = t_emb(t) (+ dt_emb, gw_emb)          Gaussian-Fourier features, width D_enc
    c = silu(t + y_emb(y))                   (B, D_enc); each adaLN applies SiLU again
    s = patchify_s(x) + pos_embed            condition encoder, width D_enc, abs. pos only here
    for each encoder block: s = block(s, c)         LightningDiT blocks, RoPE for D_enc heads
    s = silu(t[:, None] + s)                 per-token condition (B, L, D_enc)
    s = s_projector(s)                       Linear(D_enc, D_dec), only when the widths differ
    h = patchify_x(x)                        the noisy input again, width D_dec, no abs. pos
    for each decoder block: h = block(h, s)  adaLN per token, RoPE for D_dec heads
    out = final_layer(h, s);  image = unpatchify(out)

Init follows RAE's `initialize_weights()` default (`xavier_init=False`): the block Linears,
the projector and the time-MLP biases keep torch's default U(+-1/sqrt(fan_in)); patch embeds
xavier (as Linears), zero biases; label table and time-MLP kernels N(0, 0.02); adaLN and the
final layer zero. `xavier_init=True` is RAE's `xavier_uniform_init=True` (xavier on every
Linear, zero biases, before the special cases).

RAE patchifies both streams with the same patch size and only works for p = 1 (its
`x_embedder` takes p*p*C input channels); here p > 1 patchifies properly (conv k=s=p on C
channels, head p*p*C wide, DiT's (p, q, c) token order), and p = 1 is RAE's layout exactly.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lib import nn
from lib.models import layers
from lib.models.lightning_dit import LightningDiTBlock, LightningFinalLayer, time_embedder

# Sizes of diffuse_nnx's `_ddt_network_presets` (RAE DiT-DH-S / -XL):
# (encoder_hidden_size, encoder_num_heads, num_encoder_blocks,
#  decoder_hidden_size, decoder_num_heads, num_decoder_blocks)
SIZES = {'S': (384, 6, 12, 2048, 16, 2), 'XL': (1152, 16, 28, 2048, 16, 2)}


class LightningDDT(nn.Module):
  """Class-conditional LightningDDT (RAE DiT-DH) on NHWC inputs.

  Args:
    input_size: spatial size H = W of the (latent) input.
    in_channels: channels C of the input.
    num_classes: number of real classes; index `num_classes` is the null class.
    patch_size: patch size of both streams.
    encoder_hidden_size, encoder_num_heads, num_encoder_blocks: the condition encoder.
    decoder_hidden_size, decoder_num_heads, num_decoder_blocks: the velocity decoder.
    mlp_ratio, class_dropout_prob: as DiT.
    continuous_time_embed, freq_embed_size: Gaussian-Fourier time features of this width
      (RAE: 512 = 2 x 256 frequencies), or the GLIDE sinusoid.
    swiglu, rms_norm, use_rope, qk_norm, adaln_shift, mlp_dropout, attn_w_dropout,
      attn_o_dropout: as `LightningDiT`.
    take_dt / take_gw: extra time embeddings (MeanFlow) added to t_emb, freshly initialised.
    xavier_init: RAE's `initialize_weights(xavier_uniform_init=True)`.
    dtype: compute dtype; parameters stay float32.

  Call: `model(x (B,H,W,C), t (B,), y (B,) int, dt=None, gw=None, rngs=None) -> (B,H,W,C)`.
  Under `nnx.capture` it sows the output tokens of each block, encoder blocks (width
  D_enc) then decoder blocks (D_dec) (`layers.sow_block_outputs`; REPA).
  """

  def __init__(self, input_size: int, in_channels: int, num_classes: int, patch_size: int = 1,
               encoder_hidden_size: int = 1152, encoder_num_heads: int = 16,
               num_encoder_blocks: int = 28, decoder_hidden_size: int = 2048,
               decoder_num_heads: int = 16, num_decoder_blocks: int = 2,
               mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
               continuous_time_embed: bool = True, freq_embed_size: int = 512,
               swiglu: bool = True, rms_norm: bool = True, use_rope: bool = True,
               qk_norm: bool = False, adaln_shift: bool = True, mlp_dropout: float = 0.0,
               attn_w_dropout: float = 0.0, attn_o_dropout: float = 0.0, take_dt: bool = False,
               take_gw: bool = False, xavier_init: bool = False, dtype: str = 'float32', *,
               rngs: nnx.Rngs):
    layers.check_sizes(input_size, patch_size,
                       *((f'{name}_hidden_size', width, f'{name}_num_heads', heads)
                         for name, width, heads in (
                             ('encoder', encoder_hidden_size, encoder_num_heads),
                             ('decoder', decoder_hidden_size, decoder_num_heads))),
                       head_multiple=4 if use_rope else 1, position_table='encoder_hidden_size',
                       mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
                       dropout_rates=dict(mlp_dropout=mlp_dropout, attn_w_dropout=attn_w_dropout,
                                          attn_o_dropout=attn_o_dropout),
                       num_encoder_blocks=num_encoder_blocks, num_decoder_blocks=num_decoder_blocks,
                       in_channels=in_channels, freq_embed_size=freq_embed_size)
    compute = jnp.dtype(dtype)
    init = 'xavier' if xavier_init else 'torch'
    grid = input_size // patch_size
    self.in_channels = in_channels
    self.num_classes = num_classes
    self.patch_size = patch_size
    self.s_embedder = layers.PatchEmbed(in_channels, encoder_hidden_size, patch_size,
                                        dtype=compute, rngs=rngs)
    self.x_embedder = layers.PatchEmbed(in_channels, decoder_hidden_size, patch_size,
                                        dtype=compute, rngs=rngs)
    time_bias = 'zeros' if xavier_init or not continuous_time_embed else 'torch'
    embedder = lambda: time_embedder(encoder_hidden_size, continuous_time_embed,
                                     freq_embed_size, time_bias, dtype=compute, rngs=rngs)
    self.t_embedder = embedder()
    self.dt_embedder = embedder() if take_dt else None
    self.gw_embedder = embedder() if take_gw else None
    self.y_embedder = layers.LabelEmbedder(num_classes, encoder_hidden_size, class_dropout_prob,
                                           dtype=compute, rngs=rngs)
    self.pos_embed = nn.Buffer(
        jnp.asarray(layers.sincos_2d(encoder_hidden_size, grid), jnp.float32)[None])
    if use_rope:
      enc = layers.rope_2d(encoder_hidden_size // encoder_num_heads, grid)
      dec = layers.rope_2d(decoder_hidden_size // decoder_num_heads, grid)
      self.enc_rope_cos, self.enc_rope_sin = (nn.Buffer(jnp.asarray(a)) for a in enc)
      self.dec_rope_cos, self.dec_rope_sin = (nn.Buffer(jnp.asarray(a)) for a in dec)
    else:
      self.enc_rope_cos = self.enc_rope_sin = self.dec_rope_cos = self.dec_rope_sin = None
    block_args = dict(mlp_ratio=mlp_ratio, swiglu=swiglu, rms_norm=rms_norm, qk_norm=qk_norm,
                      adaln_shift=adaln_shift, mlp_dropout=mlp_dropout,
                      attn_w_dropout=attn_w_dropout, attn_o_dropout=attn_o_dropout, init=init,
                      dtype=compute, rngs=rngs)
    self.encoder_blocks = nnx.List([
        LightningDiTBlock(encoder_hidden_size, encoder_num_heads, **block_args)
        for _ in range(num_encoder_blocks)])
    self.s_projector = (
        layers.linear(encoder_hidden_size, decoder_hidden_size, init, dtype=compute, rngs=rngs)
        if encoder_hidden_size != decoder_hidden_size else None)
    self.decoder_blocks = nnx.List([
        LightningDiTBlock(decoder_hidden_size, decoder_num_heads, **block_args)
        for _ in range(num_decoder_blocks)])
    self.final_layer = LightningFinalLayer(decoder_hidden_size, patch_size, in_channels,
                                           rms_norm, dtype=compute, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, dt: jax.Array | None = None,
               gw: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
    """(B, H, W, C) velocity."""
    t_emb = layers.time_condition(self.t_embedder, self.dt_embedder, self.gw_embedder, t, dt,
                                  gw)
    c = nnx.silu(t_emb + self.y_embedder(y, rngs))
    enc_rope = dec_rope = None
    if self.enc_rope_cos is not None:
      enc_rope = (self.enc_rope_cos[...], self.enc_rope_sin[...])
      dec_rope = (self.dec_rope_cos[...], self.dec_rope_sin[...])

    outputs = []
    s = self.s_embedder(x) + self.pos_embed[...].astype(c.dtype)
    for block in self.encoder_blocks:
      s = block(s, c, enc_rope, rngs)
      outputs.append(s)
    s = nnx.silu(t_emb[:, None] + s)
    if self.s_projector is not None:
      s = self.s_projector(s)

    h = self.x_embedder(x)
    for block in self.decoder_blocks:
      h = block(h, s, dec_rope, rngs)
      outputs.append(h)
    layers.sow_block_outputs(self, outputs)
    h = self.final_layer(h, s)
    return layers.unpatchify(h, self.patch_size, self.in_channels).astype(x.dtype)
