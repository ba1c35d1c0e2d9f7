"""SiT interface and ODE samplers against closed-form answers on Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.flow import samplers, sit

MEAN, STD = 1.5, 0.5  # data x ~ N(MEAN, STD^2) per dimension


class GaussianField:
  """Exact SiT velocity E[n - x | x_t] for x ~ N(MEAN + label, STD^2), n ~ N(0, 1).

  x_t = (1-t) x + t n is Gaussian with mean (1-t) m and variance (1-t)^2 s^2 + t^2, and
  Cov(n - x, x_t) = t - (1-t) s^2, so E[v | x_t] = -m + Cov / Var (x_t - (1-t) m).
  The ODE from t=1 maps noise z to m + s z exactly.
  """
  num_classes = 4

  def __call__(self, x, t, y, rngs=None):
    t = t.reshape(-1, 1, 1, 1)
    m = MEAN + jnp.where(y == self.num_classes, 0.0, y).reshape(-1, 1, 1, 1)
    var = (1 - t) ** 2 * STD ** 2 + t ** 2
    return -m + (t - (1 - t) * STD ** 2) / var * (x - (1 - t) * m)


def final_error(sampler_cls, steps, guidance=1.0, labels=None):
  z = jax.random.normal(jax.random.key(0), (64, 2, 2, 1))
  labels = jnp.zeros(64, jnp.int32) if labels is None else labels
  out = sampler_cls(steps)(sit.SiT(), GaussianField(), z, labels, guidance_scale=guidance)
  exact = MEAN + labels.reshape(-1, 1, 1, 1) + STD * z
  return float(jnp.abs(out - exact).max()), out


def test_samplers_map_noise_to_the_data_distribution():
  for cls in (samplers.Euler, samplers.Heun):
    _, out = final_error(cls, 64)
    assert abs(float(out.mean()) - MEAN) < 0.15
    assert abs(float(out.std()) - STD) < 0.1


def test_heun_is_second_order_and_euler_first_order():
  euler = [final_error(samplers.Euler, n)[0] for n in (8, 16, 32)]
  heun = [final_error(samplers.Heun, n)[0] for n in (8, 16, 32)]
  euler_order = np.log2(euler[1] / euler[2])
  heun_order = np.log2(heun[1] / heun[2])
  assert 0.8 < euler_order < 1.3, euler
  assert 1.7 < heun_order < 2.4, heun
  assert heun[2] < euler[2] / 10


def test_guidance_extrapolates_from_the_null_class():
  labels = jnp.full(64, 2, jnp.int32)
  # null class has mean MEAN; class 2 has MEAN + 2; the exact fields are affine in the
  # mean, so guidance w gives mean MEAN + w * 2 (the ODE is linear in m)
  _, out = final_error(samplers.Heun, 32, guidance=1.5, labels=labels)
  assert abs(float(out.mean()) - (MEAN + 3.0)) < 0.15


def test_guidance_interval_and_channel_switch():
  labels = jnp.full(8, 1, jnp.int32)
  z = jax.random.normal(jax.random.key(1), (8, 2, 2, 4))
  base = samplers.Euler(8)(sit.SiT(), GaussianField(), z, labels, guidance_scale=1.0)
  off = samplers.Euler(8, guidance_interval=(2.0, 3.0))(sit.SiT(), GaussianField(), z, labels,
                                                          guidance_scale=4.0)
  np.testing.assert_allclose(off, base, atol=1e-5)  # interval excludes every t
  three = samplers.Euler(8, guide_channels=3)(sit.SiT(), GaussianField(), z, labels,
                                              guidance_scale=4.0)
  np.testing.assert_allclose(three[..., 3], base[..., 3], atol=1e-5)
  assert float(jnp.abs(three[..., :3] - base[..., :3]).max()) > 0.5


def test_time_grid_and_shift():
  grid = samplers.Euler(4).time_grid()
  np.testing.assert_allclose(grid, [1.0, 0.75, 0.5, 0.25, 0.0])
  shifted = samplers.Euler(4, t_shift_cur=4 * 4096).time_grid()  # s = 2
  np.testing.assert_allclose(shifted, [1.0, 1.5 / 1.75, 1.0 / 1.5, 0.5 / 1.25, 0.0], rtol=1e-6)


def test_sit_loss_is_zero_for_the_exact_velocity():
  interface = sit.SiT(time_dist='logit_normal')
  x = MEAN + STD * jax.random.normal(jax.random.key(2), (8, 2, 2, 1))

  class PointMass:
    """For data = x exactly (a point mass per sample), v = (x_t - x) / t."""

    def __call__(self, x_t, t, y, rngs=None):
      return (x_t - x) / t.reshape(-1, 1, 1, 1)

  loss, _ = interface.loss(PointMass(), x, jnp.zeros(8, jnp.int32), jax.random.key(3))
  assert loss.shape == (8,)
  np.testing.assert_allclose(loss, 0.0, atol=1e-8)
  wrong, _ = interface.loss(lambda x_t, t, y, rngs=None: jnp.zeros_like(x_t), x,
                            jnp.zeros(8, jnp.int32), jax.random.key(3))
  assert float(wrong.mean()) > 1.0


def test_time_distributions_and_resolution_shift():
  key = jax.random.key(4)
  uniform = sit.SiT().sample_t(key, (100_000,))
  assert abs(float(uniform.mean()) - 0.5) < 5e-3 and abs(float(uniform.var()) - 1 / 12) < 2e-3
  logit = sit.SiT('logit_normal', t_mu=-0.4, t_sigma=1.0).sample_t(key, (100_000,))
  logits = jnp.log(logit / (1 - logit))
  assert abs(float(logits.mean()) + 0.4) < 0.02 and abs(float(logits.std()) - 1.0) < 0.02
  assert sit.SiT().shift((32, 32, 4)) == 1.0
  assert sit.SiT().shift((16, 16, 768)) == pytest.approx(48 ** 0.5)
  with pytest.raises(ValueError, match="expected 'uniform' or 'logit_normal'"):
    sit.SiT('lognormal')
