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

The released XL/2 checkpoints are Lightning checkpoints: `import_ddt` takes the
`ema_denoiser.*` weights (see its docstring).
"""

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from lib import nn
from lib.models import layers
from lib.models.checkpoint_io import key_problems

# name -> (hidden_size, num_heads, num_blocks, num_encoder_blocks).
#   XL: DDT-XL/2 "22en6de", the released ImageNet 256 / 512 models (675M, `configs/
#       repa_improved_ddt_xlen22de6_*.yaml`; 674,646,352 parameters with patch 2, 4 channels).
#   B, L: the DiT widths with the encoder/decoder splits of the paper's scaling study
#       (DDT-B/2 8en4de, DDT-L/2 20en4de); no checkpoints were released for them.
SIZES = {'B': (768, 12, 12, 8), 'L': (1024, 16, 24, 20), 'XL': (1152, 16, 28, 22)}

# Key prefixes of an MCG-NJU Lightning checkpoint's `state_dict`.
EMA_PREFIX = 'ema_denoiser.'
RAW_PREFIX = 'denoiser.'
SKIPPED_PREFIXES = {'diffusion_trainer.': 'REPA projector of the training loss'}


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
    layers.check_sizes(input_size, patch_size,
                       ('hidden_size', hidden_size, 'num_heads', num_heads), head_multiple=4)
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


# ------------------------------------------------------------------------------------ importer
# Our module names -> the official ones (non-leaf path parts); our leaf names -> torch names.
_MODULES = {'linear1': 'mlp.0', 'linear2': 'mlp.2', 'adaLN_modulation': 'adaLN_modulation.0',
            'embedding': 'embedding_table'}
_LEAVES = {'kernel': 'weight', 'bias': 'bias', 'embedding': 'weight', 'scale': 'weight'}


def official_key(path: tuple) -> str:
  """NNX parameter path -> MCG-NJU DDT state-dict key (`blocks/3/adaLN_modulation/kernel` ->
  `blocks.3.adaLN_modulation.0.weight`)."""
  *modules, leaf = (str(part) for part in path)
  return '.'.join([_MODULES.get(name, name) for name in modules] + [_LEAVES.get(leaf, leaf)])


def select_denoiser(state_dict: Mapping[str, np.ndarray], weights: str = 'ema'
                    ) -> dict[str, np.ndarray]:
  """The denoiser's weights from a flat MCG-NJU Lightning `state_dict` (`ema_denoiser.*`,
  `denoiser.*`, `diffusion_trainer.*`), prefixes removed; a plain denoiser state dict is
  returned as it is. `weights`: 'ema' (what the release evaluates) or 'raw'."""
  if weights not in ('ema', 'raw'):
    raise ValueError(f"weights={weights!r}; expected 'ema' or 'raw'")
  keys = list(state_dict)
  if not any(k.startswith((EMA_PREFIX, RAW_PREFIX)) for k in keys):
    return dict(state_dict)
  prefix = EMA_PREFIX if weights == 'ema' else RAW_PREFIX
  if not any(k.startswith(prefix) for k in keys):
    raise ValueError(f'the checkpoint has no {prefix}* weights (weights={weights!r}); it has '
                     + ', '.join(sorted({k.split('.')[0] + '.*' for k in keys})))
  out, skipped = {}, {}
  for key, value in state_dict.items():
    if key.startswith(prefix):
      name = key[len(prefix):]
      if name.startswith('_orig_mod.'):  # saved from a torch.compile'd module
        name = name[len('_orig_mod.'):]
      out[name] = value
    elif key.startswith((EMA_PREFIX, RAW_PREFIX)):
      skipped.setdefault(key.split('.')[0] + '.* (the other weights)', []).append(key)
    else:
      why = next((w for p, w in SKIPPED_PREFIXES.items() if key.startswith(p)), None)
      if why is None:
        out[key] = value  # reported as unexpected by the importer
      else:
        skipped.setdefault(f'{key.split(".")[0]}.* ({why})', []).append(key)
  logging.info('DDT checkpoint: taking %s* (%d arrays)', prefix, len(out))
  for what, group in skipped.items():
    logging.info('DDT checkpoint: skipping %d arrays %s', len(group), what)
  return out


def _describe(shapes: Mapping[str, tuple]) -> str:
  """What the weights tell of the architecture (a checkpoint's or a network's)."""
  facts = {}
  embed = shapes.get('x_embedder.proj.weight')
  if embed is not None and len(embed) == 2:
    facts.update(hidden_size=embed[0], patch_dim=embed[1])
  facts['num_blocks'] = sum(1 for key in shapes
                            if key.startswith('blocks.') and key.endswith('.attn.qkv.weight'))
  norm = shapes.get('blocks.0.attn.q_norm.weight')
  if norm is not None and 'hidden_size' in facts and norm[0]:
    facts['num_heads'] = facts['hidden_size'] // norm[0]
  head = shapes.get('final_layer.linear.weight')
  if head is not None and len(head) == 2:
    facts['out_dim'] = head[0]
  table = shapes.get('y_embedder.embedding_table.weight')
  if table is not None:
    facts['label_rows'] = table[0]
  w2 = shapes.get('blocks.0.mlp.w2.weight')
  if w2 is not None and len(w2) == 2:
    facts['ffn_dim'] = w2[1]
  for name in ('dt_embedder', 'gw_embedder'):
    if f'{name}.mlp.0.weight' in shapes:
      facts[f'take_{name[:2]}'] = True
  return ', '.join(f'{k}={v}' for k, v in facts.items())


def import_ddt(state_dict: Mapping[str, np.ndarray], abstract_state, *,
               weights: str = 'ema') -> nnx.State:
  """An MCG-NJU DDT state dict ({key: torch-layout array}) as the parameters of a `DDT`.

  Key layout (`decoupled_improved_dit.py`; torch Linear weights (out, in) are transposed):

      x_embedder.proj.{weight,bias}           s_embedder.proj.{weight,bias}
      t_embedder.mlp.{0,2}.{weight,bias}      y_embedder.embedding_table.weight (K + 1, D)
      blocks.{i}.norm{1,2}.weight             blocks.{i}.attn.qkv.weight          (no bias)
      blocks.{i}.attn.{q,k}_norm.weight       blocks.{i}.attn.proj.{weight,bias}
      blocks.{i}.mlp.{w1,w2,w3}.weight        blocks.{i}.adaLN_modulation.0.{weight,bias}
      final_layer.linear.{weight,bias}        final_layer.adaLN_modulation.0.{weight,bias}

  A Lightning checkpoint (`read_state_dict('…ckpt')` returns its `state_dict`) holds
  `denoiser.*`, `ema_denoiser.*` and the REPA projector `diffusion_trainer.*`: the `weights`
  copy ('ema' by default, the one the release samples with) is taken, the rest skipped with a
  log line. The MeanFlow embedders (`take_dt`/`take_gw`) have no released weights: such a
  network cannot be filled from an official file.

  The encoder/decoder split (`num_encoder_blocks`, 22 for the XL release) cannot be read from
  the weights (every block has the same shapes): it must match the released model, or the
  outputs are wrong without any error.

  Args:
    state_dict: e.g. `lib.models.checkpoint_io.read_state_dict(path)`.
    abstract_state: the network's state (`nnx.state(nnx.eval_shape(make_network))`, its
      `nnx.Param` part or all of it), or the (abstract) network itself.
    weights: 'ema' or 'raw', for Lightning checkpoints holding both.

  Returns:
    An `nnx.State` of the network's `nnx.Param`s (float32 arrays in NNX layout).

  Raises:
    ValueError: naming every missing, unexpected and mis-shaped key.
  """
  from lib.models import import_weights  # (import_weights registers this function)

  if isinstance(abstract_state, nnx.Module):
    abstract_state = nnx.state(abstract_state)
  given = {key: np.asarray(value) for key, value in select_denoiser(state_dict, weights).items()}
  expected = {}
  for path, variable in nnx.to_flat_state(abstract_state):
    if isinstance(variable, nnx.Param):
      expected[official_key(path)] = (path, variable)
  want = {key: import_weights.torch_shape(str(path[-1]), variable.shape)
          for key, (path, variable) in expected.items()}
  found = {key: tuple(value.shape) for key, value in given.items()}
  problems = key_problems(found, want)
  if problems:
    raise ValueError(
        'the checkpoint does not match this DDT:\n'
        f'  checkpoint: {_describe(found)}\n  network:    {_describe(want)}\n  '
        + '\n  '.join(problems)
        + '\n  (set network.hidden_size / num_heads / num_blocks / num_encoder_blocks / '
        "patch_size and the data's classes to the released model's: XL/2 22en6de = 1152, 16, "
        '28, 22, patch 2)')
  flat = [(path, variable.replace(jnp.asarray(
      import_weights.from_torch(str(path[-1]), given[key]), variable.dtype)))
          for key, (path, variable) in expected.items()]
  return nnx.from_flat_state(flat)
