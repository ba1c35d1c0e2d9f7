"""REPA's samplers (`common.repa_sde`, `common.repa_ode`) against REPA's published update
rules, written out here in float64 numpy, on a closed-form linear velocity field."""

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from lib.flow import samplers, sit

SHIFT = np.array([0.4, -0.3, 0.2, 0.6])  # per-class offset of the field; the null class is 3


class LinearField:
  """v(x, t, y) = (0.3 + 0.5 t) x + (0.2 - 0.4 t) + SHIFT[y]: closed form, label-dependent."""
  num_classes = 3

  def __call__(self, x, t, y, rngs=None):
    t = t.reshape(-1, 1, 1, 1)
    return (0.3 + 0.5 * t) * x + (0.2 - 0.4 * t) + jnp.asarray(SHIFT)[y].reshape(-1, 1, 1, 1)


def velocity(x, t, y):
  return (0.3 + 0.5 * t) * x + (0.2 - 0.4 * t) + SHIFT[y].reshape(-1, 1, 1, 1)


def guided(field, x, t, y, cfg, guided_here):
  """REPA: field(y_null) + cfg (field(y) - field(y_null)) where the interval holds t_cur."""
  if not guided_here:
    return field(x, t, y)
  cond, uncond = field(x, t, y), field(x, t, np.full_like(y, LinearField.num_classes))
  return uncond + cfg * (cond - uncond)


def repa_sde_drift(x, t, y):
  """REPA's d = v - w/2 score, w = 2t, score from the linear path alpha = 1 - t, sigma = t:
  score = (r v - x) / var, r = alpha / alpha' = -(1 - t), var = sigma^2 - r sigma' sigma."""
  v = velocity(x, t, y)
  ratio = -(1 - t)
  var = t ** 2 - ratio * 1.0 * t
  score = (ratio * v - x) / var
  return v - 0.5 * (2 * t) * score


def repa_euler_maruyama(x, y, num_steps, cfg, low, high, eps):
  t_steps = np.concatenate([np.linspace(1.0, 0.04, num_steps), [0.0]])
  for i in range(num_steps - 1):
    t_cur, t_next = t_steps[i], t_steps[i + 1]
    dt = t_next - t_cur
    d = guided(repa_sde_drift, x, t_cur, y, cfg, low <= t_cur <= high)
    x = x + d * dt + np.sqrt(2 * t_cur) * eps[i] * np.sqrt(abs(dt))
  t_cur = t_steps[-2]
  return x + (0.0 - t_cur) * guided(repa_sde_drift, x, t_cur, y, cfg, low <= t_cur <= high)


def repa_heun(x, y, num_steps, cfg, low, high):
  t_steps = np.linspace(1.0, 0.0, num_steps + 1)
  for i in range(num_steps):
    t_cur, t_next = t_steps[i], t_steps[i + 1]
    inside = low <= t_cur <= high
    d_cur = guided(velocity, x, t_cur, y, cfg, inside)
    x_next = x + (t_next - t_cur) * d_cur
    if i < num_steps - 1:
      d_prime = guided(velocity, x_next, t_next, y, cfg, inside)
      x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    x = x_next
  return x


def inputs():
  noise = jax.random.normal(jax.random.key(3), (6, 2, 2, 4))
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  return noise, labels


def assert_relative(ours, reference, rtol):
  error = np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max()
  assert error < rtol, error


def test_repa_sde_grid_is_repas():
  grid = fdl.build(common.repa_sde(250)).time_grid()
  np.testing.assert_allclose(grid, np.concatenate([np.linspace(1, 0.04, 250), [0.0]]),
                             atol=1e-6)


def test_repa_euler_maruyama_follows_repas_update_with_the_same_noise():
  noise, labels = inputs()
  steps, key = 13, jax.random.key(7)  # grid 1, 0.92, ..., 0.76 | 0.68, ...: 0.75 splits it
  sampler = fdl.build(common.repa_sde(steps, guidance_scale=1.8, guidance_interval=(0.0, 0.75)))
  ours = sampler(sit.SiT(), LinearField(), noise, labels, key=key)
  eps = [np.asarray(jax.random.normal(k, noise.shape), np.float64)
         for k in jax.random.split(key, steps)]
  reference = repa_euler_maruyama(np.asarray(noise, np.float64), np.asarray(labels), steps,
                                  1.8, 0.0, 0.75, eps)
  assert_relative(ours, reference, 1e-5)
  unguided = repa_euler_maruyama(np.asarray(noise, np.float64), np.asarray(labels), steps,
                                 1.0, 0.0, 0.75, eps)
  assert np.abs(reference - unguided).max() > 1e-2  # guidance is exercised


def test_repa_heun_skips_the_last_corrector_and_guides_by_the_start_time():
  noise, labels = inputs()
  steps = 10  # grid 1, 0.9, 0.8 | 0.7, ...: the step 0.8 -> 0.7 crosses t = 0.75
  kwargs = dict(guidance_scale=1.8, guidance_interval=(0.0, 0.75))
  ours = fdl.build(common.repa_ode(steps, **kwargs))(sit.SiT(), LinearField(), noise, labels)
  reference = repa_heun(np.asarray(noise, np.float64), np.asarray(labels), steps, 1.8, 0.0,
                        0.75)
  assert_relative(ours, reference, 1e-5)
  sit_heun = fdl.build(common.heun(steps, **kwargs))(sit.SiT(), LinearField(), noise, labels)
  assert np.abs(np.asarray(sit_heun, np.float64) - reference).max() > 1e-3


def test_repa_presets_sample_train_and_scale_as_repa():
  from lib.config import presets
  for size in (256, 512):
    experiment = fdl.build(presets.load_preset(f'experiments/dit_repa.py:xl2(image_size={size})'))
    assert experiment.interface.shift(experiment.latent_shape) == 1.0  # no shift at any size
    assert experiment.encoder.final_std == 0.18215 and not experiment.data.random_flip
    sampler = experiment.sampler
    assert (sampler.diffusion, sampler.diffusion_norm, sampler.last_interval) == ('linear', 2.0,
                                                                                  0.04)
    assert (sampler.guidance_scale, sampler.guidance_interval) == (1.8, (0.0, 0.7))
  ode = fdl.build(presets.load_preset('experiments/dit_repa.py:xl2(mode="ode")').sampler)
  assert type(ode) is samplers.REPAHeun and ode.guidance_scale == 1.8


def test_last_interval_needs_a_uniform_grid_it_fits():
  for kwargs in (dict(last_interval=1.0), dict(last_interval=0.0), dict(num_steps=1),
                 dict(sampling_time_dist='karras')):
    with pytest.raises(ValueError, match='last_interval'):
      samplers.Euler(**{'num_steps': 4, 'last_interval': 0.04, **kwargs})
