"""The CPU formulations of attention, tanh-GELU and LayerNorm: the same values and gradients
as the library functions they replace, and only the residuals they promise to keep; the one
size check of the networks and the one adaLN modulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib.models import ddt, dit, layers, lightning_ddt, lightning_dit


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _residuals(f, *args):
  """The arrays `jax.vjp` keeps for the backward pass of f at args."""
  _, backward = jax.vjp(f, *args)
  return [x for x in jax.tree.leaves(backward) if hasattr(x, 'shape')]


@pytest.mark.parametrize('shape,chunk_bytes', [
    ((16, 64, 4, 16), layers.ATTENTION_CHUNK_BYTES),  # the whole batch in one chunk
    ((6, 64, 4, 16), 2 * 4 * 4 * 64 * 64),  # chunks of 2 batch elements
    ((5, 33, 3, 8), 1)])  # one element per chunk, odd sizes
def test_cpu_attention_matches_dot_product_attention(shape, chunk_bytes, monkeypatch):
  monkeypatch.setattr(layers, 'ATTENTION_CHUNK_BYTES', chunk_bytes)
  q, k, v, cotangent = (_normal(shape, seed) for seed in range(4))

  def loss(attention):
    return lambda q, k, v: jnp.sum(attention(q, k, v) * cotangent)

  np.testing.assert_allclose(layers._cpu_attention(q, k, v),
                             jax.nn.dot_product_attention(q, k, v), atol=2e-6)
  ours = jax.grad(loss(layers._cpu_attention), argnums=(0, 1, 2))(q, k, v)
  reference = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(ours, reference):
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_cpu_attention_keeps_no_length_squared_array():
  batch, length, heads, head_dim = 4, 128, 2, 8
  q, k, v = (_normal((batch, length, heads, head_dim), seed) for seed in range(3))
  kept = _residuals(layers._cpu_attention, q, k, v)
  assert max(x.size for x in kept) == batch * length * heads * head_dim  # q, k, v, out
  assert sum(x.size for x in kept) == 4 * q.size + batch * heads * length  # + lse
  reference = _residuals(jax.nn.dot_product_attention, q, k, v)
  assert max(x.size for x in reference) >= batch * heads * length * length


@pytest.mark.parametrize('size,expected', [(6, 3), (16, 4), (7, 1), (2, 2)])
def test_batch_chunk_is_the_largest_divisor_within_the_budget(size, expected, monkeypatch):
  per_element = 4 * 4 * 64 * 64  # float32 weights of 4 heads of 64 tokens
  monkeypatch.setattr(layers, 'ATTENTION_CHUNK_BYTES', 4 * per_element)
  assert layers._batch_chunk((size, 64, 4, 16)) == expected
  assert layers._batch_chunk((size, 256, 4, 16)) == 1  # one element is over the budget


def test_gelu_tanh_matches_jax_and_keeps_one_array():
  x = _normal((3, 5, 7), 0) * 3
  np.testing.assert_allclose(layers.gelu_tanh(x), jax.nn.gelu(x, approximate=True), atol=1e-6)
  cotangent = _normal(x.shape, 1)
  ours = jax.vjp(layers.gelu_tanh, x)[1](cotangent)[0]
  reference = jax.vjp(lambda x: jax.nn.gelu(x, approximate=True), x)[1](cotangent)[0]
  np.testing.assert_allclose(ours, reference, atol=1e-5)
  assert [r.shape for r in _residuals(layers.gelu_tanh, x)] == [x.shape]
  assert len(_residuals(lambda x: jax.nn.gelu(x, approximate=True), x)) > 1


def test_layer_norm_matches_flax_and_keeps_output_and_inverse_std():
  x = _normal((2, 9, 32), 0) * 2 + 1
  ours = layers.layer_norm(32, rngs=nnx.Rngs(0))
  flax_norm = nnx.LayerNorm(32, epsilon=1e-6, use_bias=False, use_scale=False,
                            use_fast_variance=False, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(ours(x), flax_norm(x), atol=2e-6)
  cotangent = _normal(x.shape, 1)
  got = jax.vjp(ours, x)[1](cotangent)[0]
  want = jax.vjp(flax_norm, x)[1](cotangent)[0]
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert sorted(r.shape for r in _residuals(ours, x)) == [(2, 9, 1), (2, 9, 32)]
  assert sum(r.size for r in _residuals(flax_norm, x)) > 2 * x.size


def test_forward_mode_switches_to_layers_jax_can_differentiate_in_forward_mode():
  """MeanFlow differentiates the network with jax.jvp, which the reverse-only custom gradients
  of the CPU attention and LayerNorm refuse; inside `forward_mode()` the plain ones are used,
  with the same values."""
  x, tangent = _normal((2, 16, 32), 0), _normal((2, 16, 32), 1)
  q, k, v = (_normal((2, 16, 4, 8), seed) for seed in (2, 3, 4))
  norm = layers.layer_norm(32, rngs=nnx.Rngs(0))
  for fn, primals, tangents in ((norm, (x,), (tangent,)),
                                (layers.attention, (q, k, v), (q, k, v))):
    with pytest.raises(TypeError, match='custom_vjp'):
      jax.jvp(fn, primals, tangents)
    with layers.forward_mode():
      out, _ = jax.jvp(fn, primals, tangents)
    np.testing.assert_allclose(out, fn(*primals), atol=2e-6)


@pytest.mark.parametrize('make,message', [
    (lambda: dit.DiT(9, 4, 10, patch_size=2, rngs=nnx.Rngs(0)),
     'patch_size=2 must divide input_size=9'),
    (lambda: dit.DiT(8, 4, 10, hidden_size=30, num_heads=4, rngs=nnx.Rngs(0)),
     'num_heads=4 must divide hidden_size=30'),
    (lambda: lightning_dit.LightningDiT(8, 4, 10, hidden_size=24, num_heads=4, rngs=nnx.Rngs(0)),
     r'num_heads=4 gives hidden_size / num_heads = 6 channels a head; 2-D RoPE needs a '
     'multiple of 4'),
    (lambda: lightning_ddt.LightningDDT(8, 4, 10, encoder_hidden_size=32, encoder_num_heads=2,
                                        decoder_hidden_size=50, decoder_num_heads=4,
                                        rngs=nnx.Rngs(0)),
     'decoder_num_heads=4 must divide decoder_hidden_size=50'),
    (lambda: ddt.DDT(8, 4, 10, hidden_size=24, num_heads=4, rngs=nnx.Rngs(0)),
     'num_heads=4 gives hidden_size / num_heads = 6 channels a head'),
])
def test_every_network_checks_its_sizes_before_making_parameters(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_modulate_takes_per_sample_or_per_token_conditions_and_an_optional_shift():
  x, scale, shift = _normal((2, 3, 4), 0), _normal((2, 1, 4), 1), _normal((2, 3, 4), 2)
  np.testing.assert_array_equal(layers.modulate(x, shift, scale), x * (1 + scale) + shift)
  np.testing.assert_array_equal(layers.modulate(x, None, scale), x * (1 + scale))
