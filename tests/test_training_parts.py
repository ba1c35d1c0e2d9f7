"""Optimizers, schedules, EMA and the data order, in isolation."""

import jax.numpy as jnp
import numpy as np
import pytest

from lib import ema, optim
from lib.data import digits, stream


def test_schedules():
  cos = optim.cosine(1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
  assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5)
  assert float(cos(10)) == pytest.approx(1.0) and float(cos(110)) == pytest.approx(0.1)
  assert float(cos(60)) == pytest.approx(0.55)  # half way down the cosine
  lin = optim.linear(2.0, total_steps=30, warmup_steps=10)
  assert [float(lin(s)) for s in (5, 10, 20, 30)] == pytest.approx([1.0, 2.0, 1.0, 0.0])
  assert float(optim.linear_constant(2.0, 100, warmup_steps=4)(2)) == pytest.approx(1.0)
  assert float(optim.linear_constant(2.0, 100, warmup_steps=4)(50)) == pytest.approx(2.0)
  poly = optim.polynomial(1.0, total_steps=20, warmup_steps=10)
  assert float(poly(5)) == pytest.approx(0.75) and float(poly(15)) == pytest.approx(0.25)
  edm2 = optim.inverse_sqrt(1.0, 0, ref_steps=100, rampup_steps=10)
  assert [float(edm2(s)) for s in (5, 50, 400)] == pytest.approx([0.5, 1.0, 0.5])
  assert float(optim.constant(3e-4, 10)(1000)) == pytest.approx(3e-4)
  rae = optim.constant_then_linear(2.0, 100, decay_start=10, decay_end=30, min_lr=0.2)
  assert [float(rae(s)) for s in (0, 9, 10, 20, 30, 90)] == pytest.approx(
      [2.0, 2.0, 2.0, 1.1, 0.2, 0.2])


@pytest.mark.parametrize('factory', [optim.adam, optim.adamw, optim.sgd])
def test_optimizers_apply_schedule_and_clipping(factory):
  opt = factory(learning_rate=0.1, grad_clip_norm=1.0, total_steps=10)
  params = {'w': jnp.zeros(4)}
  grads = {'w': jnp.full(4, 100.0)}  # global norm 200, clipped to 1
  updates, _ = opt.tx.update(grads, opt.tx.init(params), params)
  # sgd: lr * clipped gradient (each entry 100 * 1/200); adam: lr * m / sqrt(v) = lr
  expected = -0.1 * 0.5 if factory is optim.sgd else -0.1
  np.testing.assert_allclose(updates['w'], expected, rtol=1e-5)
  assert float(opt.schedule(3)) == pytest.approx(0.1)


def test_ema_starts_as_a_copy_and_averages():
  average = ema.EMA(decay=0.9)
  params = {'w': jnp.array([1.0, 2.0])}
  state = average.init(params)
  np.testing.assert_array_equal(state['w'], params['w'])
  state = average.update(state, {'w': jnp.array([2.0, 2.0])}, 0)
  np.testing.assert_allclose(state['w'], [1.1, 2.0])
  with pytest.raises(ValueError, match='ema.decay=1.0'):
    ema.EMA(1.0)


def test_stream_is_deterministic_resumable_and_sharded():
  first = [stream.batch_indices(k, 8, 20, seed=3) for k in range(6)]
  again = stream.batch_indices(4, 8, 20, seed=3)
  np.testing.assert_array_equal(first[4], again)
  epoch0 = np.concatenate(first)[:20]
  assert sorted(epoch0) == list(range(20))  # each epoch is a permutation
  halves = [stream.batch_indices(2, 8, 20, 3, p, 2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), first[2])
  with pytest.raises(ValueError, match='not divisible by the number of processes'):
    stream.batch_indices(0, 9, 20, 3, 0, 2)


def test_digits_batches():
  data = digits.Digits(batch_size=32, image_size=16)
  batch = next(data.batches())
  assert batch['image'].shape == (32, 16, 16, 1) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32 and set(batch['label']) <= set(range(10))
  resumed = next(data.batches(start_step=5))
  iterator = data.batches()
  for _ in range(5):
    next(iterator)
  np.testing.assert_array_equal(next(iterator)['image'], resumed['image'])
  held_out = sum(len(b['label']) for b in data.eval_batches(100))
  assert held_out == 197
  with pytest.raises(ValueError, match='data.image_size=4'):
    digits.Digits(image_size=4)
