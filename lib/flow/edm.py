"""EDM: denoising with preconditioning (Karras et al., arXiv 2206.00364).

Time is the noise level sigma in (0, inf): **sigma = 0 is data**, large sigma is noise.

    n ~ N(0, 1),  x_sigma = x + sigma n
    D(x_sigma, sigma, y) = c_skip x_sigma + c_out F(c_in x_sigma, c_noise, y)
      c_skip  = sd^2 / (sigma^2 + sd^2)
      c_out   = sigma sd / sqrt(sigma^2 + sd^2)
      c_in    = 1 / sqrt(sd^2 + sigma^2)
      c_noise = ln(sigma) / 4                         (what the network F receives as `t`)
    sigma ~ exp(N(P_mean, P_std^2))                   (EDM: P_mean = -1.2, P_std = 1.2)
    L = mean_{H,W,C} lambda(sigma) (D - x)^2,  lambda = (sigma^2 + sd^2) / (sigma sd)^2

sd = `x_sigma`, the data standard deviation (0.5). The ODE the samplers integrate is
dx/dsigma = (x - D) / sigma from sigma_max down to 0 (`sampling_time_dist='karras'`), the
score is (D - x) / sigma^2, and the sampler's unit
noise is scaled by sigma at the start (`noise_scale`).
"""

import jax
import jax.numpy as jnp

from lib.flow.sit import mean_flat


def _col(v: jax.Array, ndim: int) -> jax.Array:
  return v.reshape(-1, *([1] * (ndim - 1)))


class EDM:
  """EDM preconditioned denoiser interface.

  Args:
    x_sigma: standard deviation of the data (sigma_data).
    p_mean, p_std: log-normal distribution of the training noise levels.
  """
  noise_time = float('inf')
  data_time = 0.0
  velocity_at_data = False  # (x - D) / sigma is undefined at sigma = 0: Heun ends with Euler
  evaluates_network = 'once'  # per loss, outside jax transforms: REPA can read its block outputs

  def __init__(self, x_sigma: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2):
    if x_sigma <= 0:
      raise ValueError(f'interface.x_sigma={x_sigma}; expected a positive data std')
    self.x_sigma = x_sigma
    self.p_mean, self.p_std = p_mean, p_std

  # ---------------------------------------------------------------------------- preconditioning
  def c_skip(self, sigma):
    return self.x_sigma ** 2 / (sigma ** 2 + self.x_sigma ** 2)

  def c_out(self, sigma):
    return sigma * self.x_sigma / jnp.sqrt(sigma ** 2 + self.x_sigma ** 2)

  def c_in(self, sigma):
    return 1.0 / jnp.sqrt(self.x_sigma ** 2 + sigma ** 2)

  def c_noise(self, sigma):
    return jnp.log(sigma) / 4.0

  def loss_weight(self, sigma):
    return (sigma ** 2 + self.x_sigma ** 2) / (sigma * self.x_sigma) ** 2

  def sample_t(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Training noise levels sigma = exp(P_mean + P_std N(0, 1))."""
    return jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, shape))

  def denoise(self, network, x_t: jax.Array, sigma: jax.Array, y: jax.Array,
              rngs=None) -> jax.Array:
    """D(x_sigma, sigma, y) for sigma (B,)."""
    s = _col(sigma, x_t.ndim)
    kwargs = {} if rngs is None else {'rngs': rngs}
    f = network(self.c_in(s) * x_t, self.c_noise(sigma), y, **kwargs).astype(jnp.float32)
    return self.c_skip(s) * x_t + self.c_out(s) * f

  # ---------------------------------------------------------------------------- contract
  def loss(self, network, x: jax.Array, y: jax.Array, key: jax.Array, rngs=None):
    """Per-sample weighted denoising loss. x: (B, H, W, C), y: (B,) -> ((B,), aux)."""
    sigma_key, noise_key = jax.random.split(key)
    sigma = self.sample_t(sigma_key, x.shape[:1])
    x_t = x + _col(sigma, x.ndim) * jax.random.normal(noise_key, x.shape)
    denoised = self.denoise(network, x_t, sigma, y, rngs=rngs)
    return self.loss_weight(sigma) * mean_flat((denoised - x) ** 2), {}

  def velocity(self, network, x_t: jax.Array, sigma: jax.Array, y: jax.Array) -> jax.Array:
    """dx/dsigma = (x - D) / sigma of the probability-flow ODE, sigma (B,) > 0."""
    return (x_t - self.denoise(network, x_t, sigma, y)) / _col(sigma, x_t.ndim)

  def score_from_velocity(self, x_t: jax.Array, sigma: jax.Array, v: jax.Array) -> jax.Array:
    """(D - x) / sigma^2 = -v / sigma."""
    return -v / _col(sigma, x_t.ndim)

  def score(self, network, x_t: jax.Array, sigma: jax.Array, y: jax.Array) -> jax.Array:
    return (self.denoise(network, x_t, sigma, y) - x_t) / _col(sigma, x_t.ndim) ** 2

  def noise_scale(self, sigma_start) -> float:
    """x at sigma_start is sigma_start times unit noise (the data is negligible)."""
    return sigma_start
