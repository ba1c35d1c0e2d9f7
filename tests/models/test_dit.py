"""DiT structure: official parameter counts, layouts, conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib.models import dit, layers


def count_params(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize('size,expected', [('S', 32_858_896), ('B', 130_303_504),
                                           ('L', 457_824_272), ('XL', 674_816_272)])
def test_official_parameter_counts(size, expected):
  hidden, depth, heads = dit.SIZES[size]
  model = nnx.eval_shape(lambda: dit.DiT(32, 4, 1000, 2, hidden, depth, heads, rngs=nnx.Rngs(0)))
  assert count_params(model) == expected


def test_learned_sigma_counts_and_position_table():
  model = nnx.eval_shape(lambda: dit.DiT(32, 4, 1000, 2, 1152, 28, 16, learn_sigma=True,
                                         rngs=nnx.Rngs(0)))
  assert count_params(model) == 674_834_720
  assert count_params(model) + model.pos_embed.size == 675_129_632


def tiny(**kwargs):
  args = dict(input_size=8, in_channels=3, num_classes=10, patch_size=2, hidden_size=32,
              depth=2, num_heads=4)
  return dit.DiT(**{**args, **kwargs}, rngs=nnx.Rngs(0))


def test_fresh_model_outputs_zero_and_shapes():
  model = tiny()
  out = model(jnp.ones((2, 8, 8, 3)), jnp.array([0.1, 0.9]), jnp.array([1, 10]))
  assert out.shape == (2, 8, 8, 3)
  np.testing.assert_array_equal(out, 0.0)  # adaLN-Zero and the zero head


def test_learn_sigma_returns_prediction_channels_only():
  model = tiny(learn_sigma=True)
  assert model.final_layer.linear.kernel.shape == (32, 2 * 2 * 6)
  assert model(jnp.ones((1, 8, 8, 3)), jnp.zeros(1), jnp.zeros(1, jnp.int32)).shape == (1, 8, 8, 3)


def test_position_table_layout_matches_mae():
  table = layers.sincos_2d(16, 4)
  # token (row 0, col 1): its column signal is in the first half, sin part first
  omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
  np.testing.assert_allclose(table[1, :4], np.sin(omega))
  np.testing.assert_allclose(table[1, 4:8], np.cos(omega))
  np.testing.assert_allclose(table[1, 8:12], 0.0)  # row 0: sin(0)
  np.testing.assert_allclose(table[4, 8:12], np.sin(omega))  # row 1, col 0


def test_time_embedding_cos_first():
  emb = layers.timestep_embedding(jnp.array([0.0, 2.0]), 8)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
  freqs = np.exp(-np.log(10000) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(2 * freqs), np.sin(2 * freqs)]),
                             rtol=1e-6)


def test_unpatchify_inverts_patch_order():
  image = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  # (p, q, c)-ordered tokens of 2x2 patches, row-major over patches
  tokens = image.reshape(2, 2, 2, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 12)
  np.testing.assert_array_equal(layers.unpatchify(tokens, 2, 3), image)


def randomize(module, key=0):
  """Every parameter random, so that adaLN-Zero does not hide anything."""
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(key), len(leaves))
  nnx.update(module, jax.tree.unflatten(
      treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
  return module


def test_labels_and_null_class_change_the_output():
  model = randomize(tiny())
  x, t = jax.random.normal(jax.random.key(1), (2, 8, 8, 3)), jnp.array([0.3, 0.3])
  a = model(x, t, jnp.array([1, 1]))
  b = model(x, t, jnp.array([2, 10]))  # another class, and the null class
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_label_dropout_only_with_rngs():
  model = tiny(class_dropout_prob=1.0)
  labels = jnp.arange(6) % 10
  dropped = model.y_embedder(labels, nnx.Rngs(label_dropout=0))
  np.testing.assert_array_equal(dropped, model.y_embedder.embedding(jnp.full(6, 10)))
  np.testing.assert_array_equal(model.y_embedder(labels), model.y_embedder.embedding(labels))


def test_patch_size_must_divide_input():
  with pytest.raises(ValueError, match='patch_size=3 must divide input_size'):
    tiny(patch_size=3)


def test_bfloat16_compute_keeps_float32_params():
  model = randomize(tiny(dtype='bfloat16'))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype('float32')}
  out = model(jnp.ones((1, 8, 8, 3)), jnp.ones(1) * 0.5, jnp.ones(1, jnp.int32))
  ref = randomize(tiny())(jnp.ones((1, 8, 8, 3)), jnp.ones(1) * 0.5, jnp.ones(1, jnp.int32))
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.abs(ref).max()))
