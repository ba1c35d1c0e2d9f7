"""SiT: flow matching with a linear interpolant (Ma et al., arXiv 2401.08740).

Time convention (diffuse_nnx's, also REPA/RAE/MeanFlow): **t = 0 is data, t = 1 is noise**.

    n   ~ N(n_mu, n_sigma^2)
    x_t = (1 - t) x + t n                                   (linear interpolant)
    v   = dx_t/dt = n - x                                   (velocity target)
    L   = mean_{H,W,C} || v_theta(x_t, t, y) - v ||^2       (per sample)

Training times are drawn from `uniform` U(0, 1) or `logit_normal` sigmoid(N(t_mu, t_sigma^2)),
then moved by the resolution shift t <- s t / (1 + (s - 1) t), s = sqrt(H W C / t_shift_base)
(s = 1 for 32x32x4 latents; s > 1 pushes t toward noise for larger inputs).
The network receives raw t in [0, 1]; with `network_time='data_at_1'` it receives 1 - t
and its output is negated (`lib.flow.conventions`), for SiT/LightningDiT/DDT releases.

Sampling quantities (E[n | x_t] = x_t + (1 - t) v; n_mu = 0, n_sigma = 1 by default):

    score(x_t, t) = -(E[n | x_t] - n_mu) / (t n_sigma^2) = -(x_t + (1 - t) v) / t
    noise_scale(t_start) = n_sigma     (the sampler's unit noise times this is x at t_start)
"""

from typing import Literal

import jax
import jax.numpy as jnp

from lib.flow import conventions


def time_shift(t: jax.Array, shift: float | jax.Array) -> jax.Array:
  """t -> s t / (1 + (s - 1) t): s > 1 moves times toward noise (t = 1)."""
  return shift * t / (1 + (shift - 1) * t)


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over every axis but the first: (B, ...) -> (B,)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


class SiT:
  """Velocity-prediction flow matching on the linear interpolant.

  Args:
    time_dist: 'uniform' or 'logit_normal' distribution of training times.
    t_mu, t_sigma: location and scale of the logit-normal.
    n_mu, n_sigma: mean and standard deviation of the noise distribution.
    t_shift_base: number of input elements (H*W*C) at which the training-time shift is 1.
    network_time: 'data_at_0' (ours) or 'data_at_1' (SiT/LightningDiT/DDT releases: the
      network is fed 1 - t and its velocity negated).
  """
  noise_time = 1.0
  data_time = 0.0
  velocity_at_data = True  # v is finite at t = data_time, so Heun may end with a full step
  evaluates_network = 'once'  # per loss, outside jax transforms: REPA can read its block outputs

  def __init__(self, time_dist: Literal['uniform', 'logit_normal'] = 'uniform',
               t_mu: float = 0.0, t_sigma: float = 1.0, n_mu: float = 0.0, n_sigma: float = 1.0,
               t_shift_base: int = 4096,
               network_time: conventions.NetworkTime = 'data_at_0'):
    conventions.check_network_time(network_time)
    if time_dist not in ('uniform', 'logit_normal'):
      raise ValueError(f"interface.time_dist={time_dist!r}; expected 'uniform' or 'logit_normal'")
    self.time_dist = time_dist
    self.t_mu, self.t_sigma = t_mu, t_sigma
    self.n_mu, self.n_sigma = n_mu, n_sigma
    self.t_shift_base = t_shift_base
    self.network_time = network_time

  def sample_t(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Training times in [0, 1] (before the resolution shift)."""
    if self.time_dist == 'uniform':
      return jax.random.uniform(key, shape)
    return jax.nn.sigmoid(self.t_mu + self.t_sigma * jax.random.normal(key, shape))

  def sample_noise(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return self.n_mu + self.n_sigma * jax.random.normal(key, shape)

  def shift(self, sample_shape: tuple[int, ...]) -> float:
    """Resolution shift s = sqrt(H W C / t_shift_base) for one sample's shape."""
    size = 1
    for dim in sample_shape:
      size *= dim
    return (size / self.t_shift_base) ** 0.5

  def interpolate(self, x: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    return (1 - t) * x + t * noise

  def loss(self, network, x: jax.Array, y: jax.Array, key: jax.Array, rngs=None):
    """Per-sample velocity loss. x: (B, H, W, C) clean data, y: (B,) labels -> ((B,), aux)."""
    time_key, noise_key = jax.random.split(key)
    t = time_shift(self.sample_t(time_key, x.shape[:1]), self.shift(x.shape[1:]))
    noise = self.sample_noise(noise_key, x.shape)
    network = conventions.adapt(network, self.network_time)
    prediction = network(self.interpolate(x, noise, t), t, y, rngs=rngs)
    return mean_flat((prediction.astype(jnp.float32) - (noise - x)) ** 2), {}

  def velocity(self, network, x_t: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    """dx_t/dt predicted at times t (B,): what the samplers integrate from t=1 to t=0."""
    return conventions.adapt(network, self.network_time)(x_t, t, y).astype(jnp.float32)

  def score_from_velocity(self, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """grad log p_t(x_t) = -(x_t + (1 - t) v - n_mu) / (t n_sigma^2)."""
    t = t.reshape(-1, *([1] * (x_t.ndim - 1)))
    return -(x_t + (1 - t) * v - self.n_mu) / (t * self.n_sigma ** 2)

  def score(self, network, x_t: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    """Score of the marginal at times t (B,), from one velocity evaluation."""
    return self.score_from_velocity(x_t, t, self.velocity(network, x_t, t, y))

  def noise_scale(self, t_start) -> float:
    """Scale of the unit noise the samplers start from at `t_start`: n_sigma (x_1 = n, never
    scaled by t_start; n_mu is assumed 0 at sampling)."""
    del t_start
    return self.n_sigma
