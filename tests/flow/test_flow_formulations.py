"""EDM, MeanFlow, the SDE and jump samplers, the time-convention adapter and the power EMA,
against closed-form answers on Gaussian / point-mass toys, plus a few real training steps."""

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib import checkpoint as ckpt
from lib import ema
from lib.config import overrides, presets
from lib.flow import conventions, ddpm, edm, meanflow, samplers, sit
from lib.flow.sit import mean_flat
from tests.flow.test_flow import MEAN, STD, GaussianField


# ------------------------------------------------------------------------------- toys
def _col(v):
  return v.reshape(-1, 1, 1, 1)


def class_mean(y, num_classes=4):
  return MEAN + jnp.where(y == num_classes, 0.0, y).reshape(-1, 1, 1, 1)


def sigma_t(t):
  """Std of x_t = (1-t) x + t n around (1-t) m, for x ~ N(m, STD^2)."""
  return jnp.sqrt((1 - t) ** 2 * STD ** 2 + t ** 2)


class GaussianAverageVelocity:
  """Exact MeanFlow average velocity u(x_t, t, r) of the SiT flow of N(MEAN + y, STD^2).

  The ODE moves x_t = (1-t) m + sigma_t z along fixed z, so x_r = (1-r) m + sigma_r z and
  u = (x_t - x_r) / (t - r); at dt = 0 it is the instantaneous velocity.
  """
  num_classes = 4
  dt_embedder = 'present'

  def __call__(self, x, t, y, dt=None, gw=None, rngs=None):
    dt = jnp.zeros_like(t) if dt is None else dt
    m = class_mean(y)
    t, dt = _col(t), _col(dt)
    r = t - dt
    z = (x - (1 - t) * m) / sigma_t(t)
    x_r = (1 - r) * m + sigma_t(r) * z
    safe = jnp.where(dt > 1e-6, dt, 1.0)
    average = (x - x_r) / safe
    instant = -m + (t - (1 - t) * STD ** 2) / sigma_t(t) * z
    return jnp.where(dt > 1e-6, average, instant)


class EDMGaussian:
  """The network F whose preconditioned output is the exact denoiser of N(MEAN + y, STD^2):
  D = m + STD^2 / (STD^2 + sigma^2) (x_sigma - m)."""
  num_classes = 4

  def __init__(self, interface):
    self.interface = interface

  def __call__(self, x_in, c_noise, y, rngs=None):
    sigma = _col(jnp.exp(4.0 * c_noise))
    x_t = x_in / self.interface.c_in(sigma)
    m = class_mean(y)
    denoised = m + STD ** 2 / (STD ** 2 + sigma ** 2) * (x_t - m)
    return (denoised - self.interface.c_skip(sigma) * x_t) / self.interface.c_out(sigma)


# ------------------------------------------------------------------------------- EDM
def test_edm_preconditioning_matches_hand_computed_values():
  interface = edm.EDM()
  assert (interface.x_sigma, interface.p_mean, interface.p_std) == (0.5, -1.2, 1.2)
  sigma = 1.0  # sd^2 + sigma^2 = 1.25
  assert float(interface.c_skip(sigma)) == pytest.approx(0.25 / 1.25)
  assert float(interface.c_out(sigma)) == pytest.approx(0.5 / 1.25 ** 0.5)
  assert float(interface.c_in(sigma)) == pytest.approx(1 / 1.25 ** 0.5)
  assert float(interface.c_noise(sigma)) == pytest.approx(0.0)
  assert float(interface.loss_weight(sigma)) == pytest.approx(1.25 / 0.25)
  sigma = 2.0
  assert float(interface.c_skip(sigma)) == pytest.approx(0.25 / 4.25)
  assert float(interface.c_out(sigma)) == pytest.approx(1.0 / 4.25 ** 0.5)
  assert float(interface.c_noise(sigma)) == pytest.approx(np.log(2.0) / 4)
  # D for a network returning ones: c_skip x + c_out
  x = jnp.full((1, 1, 1, 1), 3.0)
  d = interface.denoise(lambda x, t, y: jnp.ones_like(x), x, jnp.array([2.0]), jnp.zeros(1))
  assert float(d.squeeze()) == pytest.approx(3.0 * 0.25 / 4.25 + 1.0 / 4.25 ** 0.5, rel=1e-6)
  # velocity dx/dsigma = (x - D) / sigma, score = (D - x) / sigma^2
  v = interface.velocity(lambda x, t, y: jnp.ones_like(x), x, jnp.array([2.0]), jnp.zeros(1))
  assert float(v.squeeze()) == pytest.approx((3.0 - float(d.squeeze())) / 2.0, rel=1e-6)
  s = interface.score(lambda x, t, y: jnp.ones_like(x), x, jnp.array([2.0]), jnp.zeros(1))
  assert float(s.squeeze()) == pytest.approx((float(d.squeeze()) - 3.0) / 4.0, rel=1e-6)
  logs = jnp.log(interface.sample_t(jax.random.key(0), (50_000,)))
  assert abs(float(logs.mean()) + 1.2) < 0.03 and abs(float(logs.std()) - 1.2) < 0.03


def test_edm_loss_is_zero_for_the_exact_denoiser():
  interface = edm.EDM()
  x = MEAN + STD * jax.random.normal(jax.random.key(2), (8, 2, 2, 1))

  class PointMass:
    """F with D = x exactly (the data is the point x of each sample)."""

    def __call__(self, x_in, c_noise, y, rngs=None):
      sigma = _col(jnp.exp(4.0 * c_noise))
      x_t = x_in / interface.c_in(sigma)
      return (x - interface.c_skip(sigma) * x_t) / interface.c_out(sigma)

  loss, aux = interface.loss(PointMass(), x, jnp.zeros(8, jnp.int32), jax.random.key(3))
  assert loss.shape == (8,) and aux == {}
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  wrong, _ = interface.loss(lambda x, t, y, rngs=None: jnp.zeros_like(x), x,
                            jnp.zeros(8, jnp.int32), jax.random.key(3))
  assert float(wrong.mean()) > 1.0


def test_karras_grid_has_num_steps_intervals():
  grid = samplers.Heun(5, sampling_time_dist='karras').time_grid()
  assert grid.shape == (6,)
  assert float(grid[0]) == pytest.approx(80.0) and float(grid[4]) == pytest.approx(0.002)
  assert float(grid[5]) == 0.0 and bool(jnp.all(jnp.diff(grid) < 0))
  rho = 7.0  # the midpoint in sigma^(1/rho) space
  mid = ((80.0 ** (1 / rho) + 0.002 ** (1 / rho)) / 2) ** rho
  assert float(grid[2]) == pytest.approx(mid, rel=1e-5)
  np.testing.assert_allclose(samplers.Euler(1, sampling_time_dist='karras').time_grid(),
                             [80.0, 0.0])


def test_edm_heun_on_the_karras_grid_maps_noise_to_data():
  interface = edm.EDM()
  z = jax.random.normal(jax.random.key(0), (256, 2, 2, 1))
  labels = jnp.zeros(256, jnp.int32)
  # the exact flow from sigma_max = 80 (x = 80 z) ends at m + STD (80 z - m) / sqrt(STD^2 + 80^2)
  exact = MEAN + STD * (80.0 * z - MEAN) / np.sqrt(STD ** 2 + 80.0 ** 2)
  errors = []
  for steps in (32, 64):
    out = samplers.Heun(steps, sampling_time_dist='karras')(interface, EDMGaussian(interface),
                                                            z, labels)
    assert bool(jnp.all(jnp.isfinite(out)))  # the last step never evaluates sigma = 0
    errors.append(float(jnp.abs(out - exact).max()))
  assert errors[1] < 0.01 and errors[0] / errors[1] > 3.5, errors  # second order
  assert abs(float(out.mean()) - MEAN) < 0.05 and abs(float(out.std()) - STD) < 0.05


# ------------------------------------------------------------------------------- DDPM
def ddpm_coefficients(interface, t):
  """(a, s) of x_t = a x + s eps at times t, from the interface's schedule."""
  log_alpha_bar, _ = interface.log_alpha_bar_at(jnp.asarray(t, jnp.float32))
  return _col(jnp.exp(0.5 * log_alpha_bar)), _col(jnp.sqrt(-jnp.expm1(log_alpha_bar)))


class DDPMGaussian:
  """The exact noise prediction for x ~ N(MEAN + y, STD^2), fed DiT's step tau = 999 t:
  E[eps | x_t] = s (x_t - a m) / (a^2 STD^2 + s^2)."""
  num_classes = 4

  def __init__(self, interface):
    self.interface = interface

  def __call__(self, x, tau, y, rngs=None):
    a, s = ddpm_coefficients(self.interface, tau / (self.interface.num_steps - 1))
    m = class_mean(y)
    return s * (x - a * m) / (a ** 2 * STD ** 2 + s ** 2)


def test_ddpm_schedule_is_dits():
  interface = ddpm.DDPM()
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(interface.log_alpha_bar, np.cumsum(np.log(1 - betas)), rtol=1e-12)
  # exact at every step k = 999 t, log-linear in between, slope of the step interval
  log_value, slope = interface.log_alpha_bar_at(jnp.array([0.0, 500 / 999, 1.0, 500.5 / 999]))
  table = interface.log_alpha_bar
  np.testing.assert_allclose(log_value, [table[0], table[500], table[999],
                                         (table[500] + table[501]) / 2], rtol=1e-5)
  np.testing.assert_allclose(slope, 999 * np.log(1 - betas[[1, 501, 999, 501]]), rtol=1e-4)
  with pytest.raises(ValueError, match='interface.num_steps=1'):
    ddpm.DDPM(num_steps=1)


def test_ddpm_heun_with_the_exact_noise_maps_noise_to_data():
  interface = ddpm.DDPM()
  z = jax.random.normal(jax.random.key(12), (256, 2, 2, 1))
  labels = jnp.zeros(256, jnp.int32)
  # the probability-flow ODE keeps (x_t - a m) / sigma_t fixed, sigma_t^2 = a^2 STD^2 + s^2
  (a1, s1), (a0, s0) = ddpm_coefficients(interface, 1.0), ddpm_coefficients(interface, 0.0)
  standard = (z - a1 * MEAN) / jnp.sqrt(a1 ** 2 * STD ** 2 + s1 ** 2)
  exact = a0 * MEAN + jnp.sqrt(a0 ** 2 * STD ** 2 + s0 ** 2) * standard
  out = samplers.Heun(64)(interface, DDPMGaussian(interface), z, labels)
  np.testing.assert_allclose(out, exact, atol=2e-3)
  assert abs(float(out.mean()) - MEAN) < 0.05 and abs(float(out.std()) - STD) < 0.05
  # score = -eps / s, the Gaussian's -(x_t - a m) / sigma_t^2
  x_t = jax.random.normal(jax.random.key(13), (4, 1, 1, 1))
  t = jnp.full((4,), 0.4)
  a, s = ddpm_coefficients(interface, t)
  np.testing.assert_allclose(interface.score(DDPMGaussian(interface), x_t, t,
                                             jnp.zeros(4, jnp.int32)),
                             -(x_t - a * MEAN) / (a ** 2 * STD ** 2 + s ** 2), rtol=1e-4)


def test_ddpm_loss_is_zero_for_the_exact_noise():
  interface = ddpm.DDPM()
  x = MEAN + STD * jax.random.normal(jax.random.key(14), (8, 2, 2, 1))

  class PointMass:
    """eps = (x_k - a_k x) / s_k for the data point x of each sample."""

    def __call__(self, x_t, tau, y, rngs=None):
      a, s = ddpm_coefficients(interface, tau / 999)
      return (x_t - a * x) / s

  loss, aux = interface.loss(PointMass(), x, jnp.zeros(8, jnp.int32), jax.random.key(15))
  assert loss.shape == (8,) and aux == {}
  np.testing.assert_allclose(loss, 0.0, atol=1e-4)
  wrong, _ = interface.loss(lambda x, t, y, rngs=None: jnp.zeros_like(x), x,
                            jnp.zeros(8, jnp.int32), jax.random.key(15))
  assert float(wrong.mean()) > 0.5


# ------------------------------------------------------------------------------- SDE sampler
def test_euler_maruyama_with_the_exact_score_matches_the_data():
  z = jax.random.normal(jax.random.key(5), (512, 2, 2, 1))
  labels = jnp.zeros(512, jnp.int32)
  interface = sit.SiT()
  for diffusion in ('linear_kl', 'constant', 'cos'):
    sampler = samplers.EulerMaruyama(100, diffusion=diffusion)
    out = sampler(interface, GaussianField(), z, labels, key=jax.random.key(1))
    assert abs(float(out.mean()) - MEAN) < 0.05, diffusion
    assert abs(float(out.std()) - STD) < 0.05, diffusion
  # the score of SiT: -(x_t + (1 - t) v) / t equals the Gaussian's -(x_t - (1-t) m) / sigma_t^2
  x_t = jax.random.normal(jax.random.key(6), (4, 1, 1, 1))
  t = jnp.full((4,), 0.3)
  exact = -(x_t - 0.7 * MEAN) / sigma_t(0.3) ** 2
  np.testing.assert_allclose(interface.score(GaussianField(), x_t, t, jnp.zeros(4, jnp.int32)),
                             exact, rtol=1e-5)


def test_euler_maruyama_guides_every_step_including_the_last():
  # the Gaussian fields are affine in the class mean, so guidance w = 1.5 between class 2 and
  # the null class (means MEAN + 2, MEAN) is exactly the field of class 3 (mean MEAN + 3)
  z = jax.random.normal(jax.random.key(7), (64, 2, 2, 1))
  key = jax.random.key(8)
  sampler = samplers.EulerMaruyama(20)
  guided = sampler(sit.SiT(), GaussianField(), z, jnp.full(64, 2, jnp.int32),
                   guidance_scale=1.5, key=key)
  plain = sampler(sit.SiT(), GaussianField(), z, jnp.full(64, 3, jnp.int32), key=key)
  np.testing.assert_allclose(guided, plain, atol=1e-4)
  with pytest.raises(ValueError, match="infinite at t_start=1.0"):
    samplers.EulerMaruyama(10, t_start=1.0)


def test_euler_maruyama_last_step_is_the_mean():
  # one step: x_1 = x_0 + h drift, no noise whatever the key
  z = jax.random.normal(jax.random.key(9), (8, 2, 2, 1))
  one = samplers.EulerMaruyama(1, diffusion='constant')
  a = one(sit.SiT(), GaussianField(), z, jnp.zeros(8, jnp.int32), key=jax.random.key(0))
  b = one(sit.SiT(), GaussianField(), z, jnp.zeros(8, jnp.int32), key=jax.random.key(1))
  np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------- MeanFlow
def test_euler_jump_with_the_exact_average_velocity_maps_noise_to_data_in_one_step():
  z = jax.random.normal(jax.random.key(10), (64, 2, 2, 1))
  labels = jnp.arange(64) % 4
  interface = meanflow.MeanFlow()
  for steps in (1, 3):
    out = samplers.EulerJump(steps)(interface, GaussianAverageVelocity(), z, labels)
    np.testing.assert_allclose(out, class_mean(labels) + STD * z, atol=1e-5)
  # the instantaneous velocity (dt = 0) is SiT's: MeanFlow also samples as a flow
  x = jax.random.normal(jax.random.key(11), (4, 2, 2, 1))
  t = jnp.array([0.2, 0.5, 0.7, 0.9])
  np.testing.assert_allclose(interface.velocity(GaussianAverageVelocity(), x, t, labels[:4]),
                             GaussianField()(x, t, labels[:4]), rtol=1e-5, atol=1e-5)


def test_meanflow_target_jvp_equals_finite_differences():
  interface = meanflow.MeanFlow()

  def network(z, t, y, dt=None, rngs=None):  # a smooth toy u(z, t, r)
    t, dt = _col(t), _col(dt)
    return jnp.tanh(0.7 * z * (1 + t) + 0.5 * dt + 0.1 * _col(y)) * (0.5 + t ** 2)

  z = jax.random.normal(jax.random.key(12), (6, 2, 2, 3))
  v_g = jax.random.normal(jax.random.key(13), z.shape)
  t = jnp.array([0.3, 0.5, 0.6, 0.8, 0.9, 0.95])
  r = jnp.array([0.1, 0.5, 0.2, 0.0, 0.85, 0.3])
  y = jnp.arange(6)
  u, u_tgt = interface.target(network, z, t, r, y, v_g)
  np.testing.assert_allclose(u, network(z, t, y, dt=t - r), rtol=1e-6)
  eps = 1e-2  # central differences along (dz, dt, dr) = (v_g, 1, 0)
  dudt = (network(z + eps * v_g, t + eps, y, dt=t + eps - r)
          - network(z - eps * v_g, t - eps, y, dt=t - eps - r)) / (2 * eps)
  expected = v_g - _col(jnp.clip(t - r, 0, 1)) * dudt
  np.testing.assert_allclose(u_tgt, expected, atol=2e-3)
  np.testing.assert_allclose(u_tgt[1], v_g[1], atol=1e-6)  # r = t: the target is v_g


def test_meanflow_with_r_equal_t_is_the_flow_matching_loss():
  """fm_portion=1, no guidance, no condition drop: the MeanFlow per-sample loss with
  norm_power=0 (weight 1) is H*W*C times SiT's mean squared velocity error at the same t and
  noise; with the default weight it is L / (L + 0.01)."""
  interface = meanflow.MeanFlow(fm_portion=1.0, cond_drop_ratio=0.0, guidance_scale=1.0,
                                guidance_mixture_ratio=0.0, norm_power=0.0)

  class Network:
    num_classes = 4

    def __call__(self, x, t, y, dt=None, rngs=None):  # depends on dt, which must be 0 here
      return 0.3 * x + _col(t) + 5.0 * _col(dt)

  network = Network()

  x = MEAN + STD * jax.random.normal(jax.random.key(14), (16, 4, 4, 2))
  y = jnp.zeros(16, jnp.int32)
  key = jax.random.key(15)
  loss, aux = interface.loss(network, x, y, key)
  time_key, noise_key, _ = jax.random.split(key, 3)
  t, r = interface.sample_t_r(time_key, 16)
  np.testing.assert_array_equal(t, r)
  noise = interface.sample_noise(noise_key, x.shape)
  sit_loss = mean_flat((network(sit.SiT().interpolate(x, noise, t), t, y, dt=0 * t)
                        - (noise - x)) ** 2)
  np.testing.assert_allclose(loss, 32 * sit_loss, rtol=1e-5)
  assert float(aux['sq_error']) == pytest.approx(float(loss.mean()), rel=1e-5)
  weighted = meanflow.MeanFlow(fm_portion=1.0, cond_drop_ratio=0.0, guidance_scale=1.0,
                               guidance_mixture_ratio=0.0)  # eps 0.01, power 1
  loss_w, _ = weighted.loss(network, x, y, key)
  np.testing.assert_allclose(loss_w, 32 * sit_loss / (32 * sit_loss + 0.01), rtol=1e-5)


def test_meanflow_loss_is_zero_for_the_exact_average_velocity_of_a_point_mass():
  # data = x0 per sample: the paths are straight, u = (z - x0) / t for every r, du/dt = 0
  interface = meanflow.MeanFlow()  # the preset: guidance on, condition drop, 75% r = t
  x0 = MEAN + STD * jax.random.normal(jax.random.key(16), (32, 2, 2, 1))

  class PointMass:
    num_classes = 4

    def __call__(self, z, t, y, dt=None, rngs=None):  # also on [z, z] (guidance terms)
      return (z - jnp.tile(x0, (z.shape[0] // 32, 1, 1, 1))) / _col(t)

  loss, aux = interface.loss(PointMass(), x0, jnp.arange(32) % 4, jax.random.key(17))
  np.testing.assert_allclose(loss, 0.0, atol=1e-4)
  assert float(aux['sq_error']) < 1e-4


def test_meanflow_draws_guidance_and_network_check():
  interface = meanflow.MeanFlow(draws='independent')
  t, r = interface.sample_t_r(jax.random.key(18), 400)
  assert bool(jnp.all(r <= t)) and int(jnp.sum(r == t)) == 300  # exactly int(0.75 B)
  equal = np.asarray(r == t)
  assert 0 < equal[:100].sum() < 100  # random rows, not the first 300
  interface = meanflow.MeanFlow()

  calls = []

  class Recorder:
    num_classes = 7  # the null label comes from the network, never 1000

    def __call__(self, z, t, y, dt=None, rngs=None):
      calls.append(np.asarray(y))
      return jnp.where(_col(y) == 7, 1.0, 2.0) * jnp.ones_like(z)

  z = jnp.zeros((2, 1, 1, 1))
  v = jnp.full(z.shape, 10.0)
  v_g = interface.guided_velocity(Recorder(), z, jnp.array([0.5, 0.9]), jnp.array([3, 3]), v)
  assert 7 in calls[0]
  w, k = 0.2, 0.92  # inside the interval: w v + (1 - w - k) v_uncond + k v_cond
  assert float(v_g[0, 0, 0, 0]) == pytest.approx(w * 10 + (1 - w - k) * 1.0 + k * 2.0)
  assert float(v_g[1, 0, 0, 0]) == 10.0  # t = 0.9 > guidance_t_max: v
  with pytest.raises(ValueError, match='take_dt=True'):

    class NoDt(Recorder):
      dt_embedder = None

    interface.average_velocity(NoDt(), z, jnp.ones(2), jnp.zeros(2), jnp.zeros(2, jnp.int32))


def test_meanflow_loss_differentiates_a_dit_with_label_dropout_rngs():
  """The trainer passes `rngs`; NNX may not advance them inside jax.jvp (checked here with a
  DiT whose own label dropout consumes them)."""
  from flax import nnx

  from lib.models.dit import DiT

  network = DiT(4, 1, 10, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                class_dropout_prob=0.5, take_dt=True, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(network, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (4, 4, 4, 1))

  @jax.jit
  def grads(params, key):
    def loss_fn(p):
      rngs = nnx.Rngs(label_dropout=key, dropout=jax.random.fold_in(key, 1))
      loss, _ = meanflow.MeanFlow().loss(nnx.merge(graphdef, p, rest), x, jnp.arange(4), key,
                                         rngs=rngs)
      return loss.mean()
    return jax.value_and_grad(loss_fn)(params)

  loss, g = grads(params, jax.random.key(1))
  assert np.isfinite(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))


# ------------------------------------------------------------------------------- conventions
class DataAtOneField:
  """The Gaussian field as a SiT/LightningDiT release defines it: s = 1 data, v' = x - n."""
  num_classes = 4

  def __call__(self, x, s, y, rngs=None):
    return -GaussianField()(x, 1 - s, y)


def test_reversed_time_adapter_samples_a_data_at_one_network_correctly():
  z = jax.random.normal(jax.random.key(19), (32, 2, 2, 1))
  labels = jnp.arange(32) % 4
  native = samplers.Heun(8)(sit.SiT(), GaussianField(), z, labels, guidance_scale=1.5)
  adapted = samplers.Heun(8)(sit.SiT(network_time='data_at_1'), DataAtOneField(), z, labels,
                             guidance_scale=1.5)
  np.testing.assert_allclose(adapted, native, atol=1e-5)
  unadapted = samplers.Heun(8)(sit.SiT(), DataAtOneField(), z, labels)
  assert float(jnp.abs(unadapted - native).max()) > 1.0
  # the same network integrated in its own convention, s = 0 (noise) -> 1 (data)
  own = z
  grid = jnp.linspace(0.0, 1.0, 65)
  for s, s_next in zip(grid[:-1], grid[1:]):
    own = own + (s_next - s) * DataAtOneField()(own, jnp.full((32,), s), labels)
  through = samplers.Euler(64)(sit.SiT(network_time='data_at_1'), DataAtOneField(), z, labels)
  np.testing.assert_allclose(through, own, atol=1e-4)
  wrapped = conventions.ReversedTime(DataAtOneField())
  assert wrapped.num_classes == 4
  with pytest.raises(ValueError, match='network_time'):
    sit.SiT(network_time='data_at_2')


def test_reversed_time_adapter_trains_in_our_convention():
  x = MEAN + STD * jax.random.normal(jax.random.key(20), (8, 2, 2, 1))

  def point_mass_data_at_one(x_s, s, y, rngs=None):  # v' = (x - x_s) / (1 - s)
    return (x - x_s) / (1 - _col(s))

  loss, _ = sit.SiT(network_time='data_at_1').loss(point_mass_data_at_one, x,
                                                   jnp.zeros(8, jnp.int32), jax.random.key(3))
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


# ------------------------------------------------------------------------------- power EMA
def test_power_ema_math():
  stds = np.array([0.01, 0.05, 0.1, 0.2])
  gammas = ema.std_to_exp(stds)
  np.testing.assert_allclose(ema.exp_to_std(gammas), stds, rtol=1e-10)
  assert float(ema.std_to_exp(0.1)) == pytest.approx(6.94, abs=0.01)  # EDM2's values
  assert float(ema.std_to_exp(0.05)) == pytest.approx(16.97, abs=0.01)
  assert ema.exp_to_std(0.0) == pytest.approx(12 ** -0.5)
  with pytest.raises(ValueError, match='ema std'):
    ema.std_to_exp(0.3)
  g = 6.94
  betas = [float(ema.power_function_beta(g, t)) for t in (1, 2, 10)]
  assert betas == pytest.approx([0.0, 0.5 ** (g + 1), 0.9 ** (g + 1)], rel=1e-5)
  # the average after T updates weighs update k by (k^(g+1) - (k-1)^(g+1)) / T^(g+1)
  average = ema.PowerEMA(stds=(0.1,))
  theta = np.random.default_rng(0).normal(size=50).astype(np.float32)
  state = average.init({'w': jnp.float32(7.0)})
  for k in range(1, 51):
    state = average.update(state, {'w': jnp.float32(theta[k - 1])}, k - 1)
  gamma = average.gammas[0]
  ks = np.arange(1, 51, dtype=np.float64)
  weights = (ks ** (gamma + 1) - (ks - 1) ** (gamma + 1)) / 50.0 ** (gamma + 1)
  assert float(average.weights(state)['w']) == pytest.approx(float(weights @ theta), rel=1e-4)


def test_posthoc_ema_reconstructs_a_tracked_profile():
  tracked = ema.PowerEMA(stds=(0.05, 0.10, 0.15), sample_index=1)
  steps = 2000
  k = jnp.arange(1, steps + 1, dtype=jnp.float32)
  trajectory = {'a': jnp.sin(k / 150.0) + 0.3 * jnp.cos(k / 37.0),
                'b': jnp.stack([k / steps, jnp.sqrt(k / steps)], axis=1)}

  def body(state, inputs):
    step, params = inputs
    state = tracked.update(state, params, step)
    return state, state

  init = tracked.init(jax.tree.map(lambda x: x[0], trajectory))
  _, history = jax.jit(lambda s: jax.lax.scan(body, s, (jnp.arange(steps), trajectory)))(init)
  snapshots = []
  for step in range(100, steps + 1, 100):  # checkpoints holding only the 0.05 and 0.15 averages
    state = jax.tree.map(lambda x: x[step - 1], history)
    snapshots += [s for s in tracked.snapshots(state, step) if s[1] != tracked.gammas[1]]
  assert len(snapshots) == 40
  rebuilt = ema.posthoc_ema(snapshots, target_std=0.10)
  final = jax.tree.map(lambda x: x[-1], history)
  target = tracked.weights(final)  # the tracked 0.10 average at the last step
  others = [final[0], final[2]]
  for name in ('a', 'b'):
    error = float(jnp.abs(rebuilt[name] - target[name]).max())
    baseline = min(float(jnp.abs(o[name] - target[name]).max()) for o in others)
    assert error < 2e-3 and error < baseline / 10, (name, error, baseline)
  # an earlier step of the same profile, too
  half = ema.posthoc_ema(snapshots, target_std=0.10, target_step=1000)
  np.testing.assert_allclose(half['a'], history[1]['a'][999], atol=5e-3)


# ------------------------------------------------------------------------------- training
TINY = ['network.hidden_size=32', 'network.depth=1', 'network.num_heads=2',
        'data.batch_size=16', 'optimizer.schedule.warmup_steps=2']


def _train_steps(config, steps):
  from lib.train import Run

  experiment = fdl.build(config)
  run = Run(experiment, '/nonexistent')
  run.load_encoder()
  run.state = run.initial_state()
  batches = experiment.data.batches(0, 0, 1)
  history = []
  for _ in range(steps):
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    run.state, metrics = run._train_step(run.state, run.encoder_state, batch)
    history.append(jax.device_get(metrics))
  return run, history


def _tiny(spec):
  config = presets.load_preset(spec)
  for assignment in TINY:
    overrides.apply_override(config, assignment)
  return config


def test_meanflow_digits_trains_and_samples_in_one_step():
  config = _tiny('experiments/meanflow.py:digits')
  run, history = _train_steps(config, 60)
  sq = [h['sq_error'] for h in history]  # unweighted sum of squares
  losses = [h['loss'] for h in history]  # adaptively weighted L / (L + 1)
  assert all(np.isfinite(losses)) and all(np.isfinite(sq))
  assert np.mean(sq[-10:]) < 0.85 * np.mean(sq[:10]), sq
  assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
  images = run.generate(np.arange(4), 1.0)
  assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8


def test_edm_digits_trains_with_power_ema_and_checkpoints(tmp_path):
  config = _tiny('experiments/dit.py:digits')
  config.interface = fdl.Config(edm.EDM)
  config.sampler = fdl.Config(samplers.Heun, num_steps=3, sampling_time_dist='karras')
  config.ema = fdl.Config(ema.PowerEMA, stds=(0.05, 0.1))
  run, history = _train_steps(config, 60)
  losses = [h['loss'] for h in history]
  assert all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10]), losses
  images = run.generate(np.arange(4), 2.0)
  assert images.shape == (4, 8, 8, 1)
  manager = ckpt.Checkpointing(save_interval_steps=1).manager(str(tmp_path))
  ckpt.save(manager, 30, run.state, force=True)
  manager.wait_until_finished()
  _, restored = ckpt.restore(manager, run.abstract_state())
  manager.close()
  assert isinstance(restored['ema'], tuple) and len(restored['ema']) == 2
  jax.tree.map(np.testing.assert_array_equal, restored['ema'], run.state['ema'])
