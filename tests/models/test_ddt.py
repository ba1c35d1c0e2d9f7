"""MCG-NJU DDT: equivalence with a PyTorch reference, RoPE tables, importer, counts, preset.

The PyTorch reference `DDTRef` is written here in plain torch from the facts of MCG-NJU/DDT
`src/models/denoiser/decoupled_improved_dit.py` (anchors §3b), not copied: the same module
tree and state-dict keys (`x_embedder.proj`, `s_embedder.proj`, `t_embedder.mlp.{0,2}`,
`y_embedder.embedding_table` with num_classes + 1 rows, one `blocks` list whose first
`num_encoder_blocks` are the encoder, `adaLN_modulation.0` bare Linears, `final_layer`),
timestep sinusoid with max_period 10 (cos first), c = silu(t + y) once, s = silu(t + s) per
token conditioning the decoder and the final layer, unfold/fold patches ((c, p, q) order),
qkv without bias, RMSNorm q/k norms, complex-pair RoPE from `precompute_freqs_cis_2d`
(positions linspace(0, 16, n), pairs alternating column then row), SwiGLU w1/w3/w2 without
bias, RMSNorm in float32, final LayerNorm without affine. NCHW in and out. Every parameter is
randomised before its state dict is imported, so zero-initialised layers hide nothing.
"""

import functools
import types

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib.models import ddt, layers
from lib.models.ddt import DDT
from lib.weights import ddt as ddt_weights
from lib.weights import registry
from lib.weights.torch_layout import torch_shape
from tests.torch_reference import (count_params, forward, inputs, jax_inputs, max_relative_error,
                                   randomize_torch, run_torch, state_dict_numpy, torch_modules)


# ------------------------------------------------------------------------------------- reference
@functools.cache
def reference() -> types.SimpleNamespace:
  """DDTRef on the shared blocks of `tests/torch_reference.py` (RMSNorm, the sinusoidal time
  embedding with max_period 10, the label table, modulate) and DDT's own."""
  shared = torch_modules()
  torch = shared.torch
  tnn = torch.nn
  F = torch.nn.functional
  RMSNorm, modulate = shared.RMSNorm, shared.modulate

  def freqs_cis_2d(head_dim, height, width, theta=10000.0, scale=16.0):
    """Complex (height*width, head_dim/2) rotations: per frequency a column pair, a row pair."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 4)[:head_dim // 4].float() / head_dim)
    rows, cols = torch.meshgrid(torch.linspace(0, scale, height),
                                torch.linspace(0, scale, width), indexing='ij')
    x_angle = cols.reshape(-1, 1) * freqs[None]
    y_angle = rows.reshape(-1, 1) * freqs[None]
    angles = torch.stack([x_angle, y_angle], dim=-1).reshape(height * width, head_dim // 2)
    return torch.polar(torch.ones_like(angles), angles)

  def rotate(x, cis):
    """x (B, N, H, Dh): consecutive channel pairs as complex numbers, times cis (N, Dh/2)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * cis[None, :, None]).flatten(3).type_as(x)

  class Embed(tnn.Module):
    def __init__(self, in_features, dim):
      super().__init__()
      self.proj = tnn.Linear(in_features, dim)

    def forward(self, x):
      return self.proj(x)

  class Attention(tnn.Module):
    def __init__(self, dim, heads):
      super().__init__()
      self.heads = heads
      self.qkv = tnn.Linear(dim, 3 * dim, bias=False)
      self.q_norm = RMSNorm(dim // heads)
      self.k_norm = RMSNorm(dim // heads)
      self.proj = tnn.Linear(dim, dim)

    def forward(self, x, cis):
      b, n, d = x.shape
      q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
      q, k = rotate(self.q_norm(q), cis), rotate(self.k_norm(k), cis)
      out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2))
      return self.proj(out.transpose(1, 2).reshape(b, n, d))

  class FeedForward(tnn.Module):
    def __init__(self, dim, mlp_dim):
      super().__init__()
      hidden = int(2 * mlp_dim / 3)
      self.w1 = tnn.Linear(dim, hidden, bias=False)
      self.w3 = tnn.Linear(dim, hidden, bias=False)
      self.w2 = tnn.Linear(hidden, dim, bias=False)

    def forward(self, x):
      return self.w2(F.silu(self.w1(x)) * self.w3(x))

  class Block(tnn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
      super().__init__()
      self.norm1 = RMSNorm(dim)
      self.attn = Attention(dim, heads)
      self.norm2 = RMSNorm(dim)
      self.mlp = FeedForward(dim, int(dim * mlp_ratio))
      self.adaLN_modulation = tnn.Sequential(tnn.Linear(dim, 6 * dim))

    def forward(self, x, c, cis):
      sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
      x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), cis)
      return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))

  class FinalLayer(tnn.Module):
    def __init__(self, dim, out_features):
      super().__init__()
      self.norm_final = tnn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
      self.linear = tnn.Linear(dim, out_features)
      self.adaLN_modulation = tnn.Sequential(tnn.Linear(dim, 2 * dim))

    def forward(self, x, c):
      shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
      return self.linear(modulate(self.norm_final(x), shift, scale))

  class DDTRef(tnn.Module):
    def __init__(self, in_channels=4, heads=4, dim=64, num_blocks=3, num_encoder_blocks=2,
                 patch=2, num_classes=10):
      super().__init__()
      self.patch, self.dim, self.heads = patch, dim, heads
      self.num_encoder_blocks = num_encoder_blocks
      patch_dim = in_channels * patch * patch
      self.x_embedder = Embed(patch_dim, dim)
      self.s_embedder = Embed(patch_dim, dim)
      self.t_embedder = shared.TimestepEmbedder(dim, max_period=10.0)
      self.y_embedder = shared.LabelEmbedder(num_classes, dim)
      self.final_layer = FinalLayer(dim, patch_dim)
      self.blocks = tnn.ModuleList([Block(dim, heads) for _ in range(num_blocks)])

    def forward(self, x, t, y):
      b, _, height, width = x.shape
      cis = freqs_cis_2d(self.dim // self.heads, height // self.patch, width // self.patch)
      tokens = F.unfold(x, kernel_size=self.patch, stride=self.patch).transpose(1, 2)
      t = self.t_embedder(t)[:, None]
      c = F.silu(t + self.y_embedder(y)[:, None])
      s = self.s_embedder(tokens)
      for block in self.blocks[:self.num_encoder_blocks]:
        s = block(s, c, cis)
      s = F.silu(t + s)
      h = self.x_embedder(tokens)
      for block in self.blocks[self.num_encoder_blocks:]:
        h = block(h, s, cis)
      h = self.final_layer(h, s)
      return F.fold(h.transpose(1, 2), (height, width), kernel_size=self.patch,
                    stride=self.patch)

  return types.SimpleNamespace(torch=torch, DDTRef=DDTRef, freqs_cis_2d=freqs_cis_2d)


TINY = dict(hidden_size=64, num_heads=4, num_blocks=3, num_encoder_blocks=2)


def tiny_pair(abstract=True, input_size=8, **kwargs):
  """(randomised torch reference, our tiny DDT); `abstract`: ours unallocated."""
  ref = randomize_torch(reference().DDTRef(4, 4, 64, 3, 2, 2, 10))
  build = lambda: DDT(input_size, 4, 10, 2, **TINY, **kwargs, rngs=nnx.Rngs(0))
  return ref, (nnx.eval_shape(build) if abstract else build())


def imported(ref, abstract_model):
  graphdef, state = nnx.split(abstract_model)
  params = ddt_weights.import_ddt(state_dict_numpy(ref), state)
  return nnx.merge(graphdef, params, nnx.state(abstract_model, nnx.Not(nnx.Param)))


# ------------------------------------------------------------------------------------- equivalence
def test_matches_torch_reference():
  ref, ours = tiny_pair()
  assert count_params(ours) == sum(p.numel() for p in ref.parameters())
  model = imported(ref, ours)
  x, t, y = inputs()  # y includes the null class 10
  expected = run_torch(ref, x, t, y)
  got = forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32))
  assert got.shape == expected.shape == (3, 8, 8, 4)
  scale = np.abs(expected).max()
  diff = np.abs(np.asarray(got) - expected).max()
  print(f'DDT tiny: max |diff| = {diff:.2e}, max |out| = {scale:.3f}, ratio {diff / scale:.2e}')
  assert scale > 1e-1
  assert max_relative_error(got, expected) <= 1e-4
  # the encoder/decoder halves compose to the same output
  s = model.encode(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32))
  assert s.shape == (3, 16, 64)
  np.testing.assert_allclose(model.decode(jnp.asarray(x), s), got, atol=1e-5 * scale)


def test_non_square_input_matches_torch_reference():
  """RoPE and fold follow the input's grid (H/p, W/p), as the official forward."""
  ref, ours = tiny_pair()
  model = imported(ref, ours)
  x, t, y = inputs(size=8)
  x = np.concatenate([x, x[:, :, :4]], axis=2)  # 8 x 12
  expected = run_torch(ref, x, t, y)
  got = forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32))
  assert got.shape == (3, 8, 12, 4)
  assert max_relative_error(got, expected) <= 1e-4


def test_rope_tables_match_reference():
  torch = reference().torch
  for head_dim, height, width in [(16, 4, 4), (72, 16, 16), (72, 32, 32), (8, 3, 5)]:
    cis = reference().freqs_cis_2d(head_dim, height, width)
    cos, sin = layers.rope_2d_xy(head_dim, height, width)
    assert cos.shape == sin.shape == (height * width, head_dim)
    np.testing.assert_allclose(cos[:, 0::2], cis.real.numpy(), atol=2e-6)
    np.testing.assert_allclose(sin[:, 1::2], cis.imag.numpy(), atol=2e-6)
    np.testing.assert_array_equal(cos[:, 0::2], cos[:, 1::2])  # both channels of a pair
  # positions linspace(0, 16, 16): spacing 16/15; token (row 0, col 1) turns only the column
  # pairs (even pairs), by (16/15) * f_j with f_j = 1 / 10000^(4j / 72)
  cos, sin = layers.rope_2d_xy(72, 16, 16)
  angles = np.arctan2(sin[1, 0::2], cos[1, 0::2])
  freqs = 1 / 10000 ** (np.arange(0, 72, 4) / 72)
  np.testing.assert_allclose(angles[0::2], np.angle(np.exp(1j * 16 / 15 * freqs)), atol=1e-5)
  np.testing.assert_allclose(angles[1::2], 0.0, atol=1e-7)
  angles_row = np.arctan2(sin[16, 0::2], cos[16, 0::2])  # (row 1, col 0): the odd pairs
  np.testing.assert_allclose(angles_row[0::2], 0.0, atol=1e-7)
  np.testing.assert_allclose(angles_row[1::2], np.angle(np.exp(1j * 16 / 15 * freqs)),
                             atol=1e-5)
  assert torch.linspace(0, 16, 16)[1].item() == pytest.approx(16 / 15)


def test_timestep_embedding_period_and_label_rows():
  model = nnx.eval_shape(lambda: DDT(8, 4, 10, 2, **TINY, rngs=nnx.Rngs(0)))
  assert model.t_embedder.max_period == 10.0
  assert model.y_embedder.embedding.embedding.shape == (11, 64)  # num_classes + 1
  assert model.blocks[0].attn.qkv.bias is None
  assert model.blocks[0].mlp.w1.bias is None and model.blocks[0].mlp.w2.bias is None
  assert model.blocks[0].mlp.w2.kernel.shape == (170, 64)  # int(2 * 256 / 3)


# ------------------------------------------------------------------------------------- init
def test_fresh_model_init_follows_official():
  model = DDT(8, 4, 10, 2, **TINY, rngs=nnx.Rngs(0))
  out = forward(model, *jax_inputs())
  np.testing.assert_array_equal(out, 0.0)  # final adaLN and Linear zero
  ada = model.blocks[0].adaLN_modulation
  assert 0.8 / 8 < float(jnp.abs(ada.kernel[...]).max()) <= 1 / 8  # torch default, not zero
  assert 0.8 / 8 < float(jnp.abs(ada.bias[...]).max()) <= 1 / 8
  assert float(jnp.abs(model.t_embedder.linear1.bias[...]).max()) > 0  # torch default bias
  assert float(jnp.abs(model.t_embedder.linear1.bias[...]).max()) <= 1 / 16
  np.testing.assert_array_equal(model.x_embedder.proj.bias[...], 0.0)
  bound = np.sqrt(6 / (16 + 64))  # xavier on the (C*p*p, D) Linear
  assert 0.8 * bound < float(jnp.abs(model.s_embedder.proj.kernel[...]).max()) <= bound


def test_meanflow_embedders_and_bfloat16():
  model = DDT(8, 4, 10, 2, **TINY, take_dt=True, take_gw=True, dtype='bfloat16',
              rngs=nnx.Rngs(0))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype('float32')}
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  nnx.update(model, jax.tree.unflatten(treedef, [
      jnp.asarray(0.2 * rng.standard_normal(x.shape), jnp.float32) for x in leaves]))
  x, t, y = jax_inputs()
  a = forward(model, x, t, y)
  assert a.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a)))
  np.testing.assert_array_equal(a, forward(model, x, t, y, dt=jnp.zeros(3), gw=jnp.ones(3)))
  assert float(jnp.abs(forward(model, x, t, y, dt=jnp.full(3, 0.5)) - a).max()) > 1e-3


# ------------------------------------------------------------------------------------- importer
def test_importer_takes_ema_weights_of_a_lightning_checkpoint():
  ref, ours = tiny_pair()
  raw = randomize_torch(reference().DDTRef(4, 4, 64, 3, 2, 2, 10), seed=5)
  checkpoint = {**{f'ema_denoiser.{k}': v for k, v in state_dict_numpy(ref).items()},
                **{f'denoiser.{k}': v for k, v in state_dict_numpy(raw).items()},
                'diffusion_trainer.proj.0.0.weight': np.zeros((64, 64), np.float32)}
  graphdef, state = nnx.split(ours)
  model = nnx.merge(graphdef, ddt_weights.import_ddt(checkpoint, state))
  x, t, y = inputs()
  got = forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32))
  assert max_relative_error(got, run_torch(ref, x, t, y)) <= 1e-4
  raw_model = nnx.merge(graphdef, ddt_weights.import_ddt(checkpoint, state, weights='raw'))
  got_raw = forward(raw_model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32))
  assert max_relative_error(got_raw, run_torch(raw, x, t, y)) <= 1e-4


def test_importer_errors_name_keys():
  ref, ours = tiny_pair()
  state = state_dict_numpy(ref)
  del state['blocks.2.mlp.w2.weight']  # a decoder block
  state['blocks.1.attn.qkv.bias'] = np.zeros(192, np.float32)  # DDT's qkv has no bias
  state['final_layer.linear.weight'] = np.zeros((32, 64), np.float32)  # a 2C-wide head
  with pytest.raises(ValueError) as error:
    ddt_weights.import_ddt(state, nnx.state(ours))
  message = str(error.value)
  print(message)
  assert 'missing keys (1): blocks.2.mlp.w2.weight' in message
  assert 'unexpected keys (1): blocks.1.attn.qkv.bias' in message
  assert 'mis-shaped keys (1): final_layer.linear.weight: checkpoint (32, 64), network (16, 64)' \
      in message
  assert 'checkpoint: hidden_size=64, patch_dim=16, num_blocks=3, num_heads=4, out_dim=32' \
      in message
  assert 'network:    hidden_size=64, patch_dim=16, num_blocks=3, num_heads=4, out_dim=16' \
      in message
  # a checkpoint of another head count is caught by the q/k norm shapes
  heads8 = nnx.eval_shape(lambda: DDT(8, 4, 10, 2, 64, 8, 3, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'blocks\.\{0-2\}\.attn\.q_norm\.weight: checkpoint '
                                       r'\(16,\), network \(8,\)'):
    ddt_weights.import_ddt(state_dict_numpy(ref), nnx.state(heads8))
  # a MeanFlow network has weights no release carries
  dt_model = nnx.eval_shape(lambda: DDT(8, 4, 10, 2, **TINY, take_dt=True, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'missing keys \(4\): dt_embedder\.mlp\.\{0,2\}\.bias'):
    ddt_weights.import_ddt(state_dict_numpy(ref), nnx.state(dt_model))
  with pytest.raises(ValueError, match='no ema_denoiser'):
    ddt_weights.import_ddt({'denoiser.x': np.zeros(1)}, nnx.state(ours))


def test_registered_importer_and_import_file(tmp_path):
  """`IMPORTERS` finds `import_ddt`; `import_file` (the path of `init_from` and of
  `launch.py --mode=import`) fills the preset's network from a released-layout
  file (the preset shrunk to the tiny size; 32x32 latents from the 256 data)."""
  from lib.config import presets
  assert registry.importer_for(DDT) is ddt_weights.import_ddt
  config = presets.load_preset('experiments/ddt.py:xl2')
  for name, value in TINY.items():
    setattr(config.network, name, value)
  experiment = fdl.build(config)
  assert registry.importer_for(experiment.network) is ddt_weights.import_ddt
  ref = randomize_torch(reference().DDTRef(4, 4, 64, 3, 2, 2, 1000))
  path = tmp_path / 'ddt.npz'
  np.savez(path, **{f'ema_denoiser.{k}': v for k, v in state_dict_numpy(ref).items()})
  params = registry.import_file(str(path), experiment)
  abstract = nnx.eval_shape(experiment.make_network)
  graphdef, _ = nnx.split(abstract)
  model = nnx.merge(graphdef, params)
  x, t, y = inputs(size=32, num_classes=1000)
  got = forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32))
  assert max_relative_error(got, run_torch(ref, x, t, y)) <= 1e-4


# ------------------------------------------------------------------------------------- counts
# DDT-XL/2 22en6de at 256 (32x32x4 latents, patch 2): 674,646,352 parameters, counted here by
# instantiating the torch reference at XL size on torch's meta device (the README's "675M").
# All of them are trainable; the model has no buffers in its state dict.
XL_PARAMS = 674_646_352


def test_xl_parameter_count_matches_reference():
  torch = reference().torch
  with torch.device('meta'):
    ref = reference().DDTRef(4, 16, 1152, 28, 22, 2, 1000)
  assert sum(p.numel() for p in ref.parameters()) == XL_PARAMS
  assert not list(ref.buffers())
  hidden, heads, blocks, encoder = ddt.SIZES['XL']
  model = nnx.eval_shape(lambda: DDT(32, 4, 1000, 2, hidden, heads, blocks, encoder,
                                     rngs=nnx.Rngs(0)))
  assert count_params(model) == XL_PARAMS
  assert model.blocks[0].mlp.w1.kernel.shape == (1152, 3072)
  assert model.blocks[0].attn.q_norm.scale.shape == (72,)
  # every key of the torch reference, with its shape, is a parameter of ours
  want = {ddt_weights.official_key(path): torch_shape(str(path[-1]), v.shape)
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert want == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
