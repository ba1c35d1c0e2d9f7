"""DDPM: discrete-time Gaussian diffusion with noise prediction (Ho et al., arXiv 2006.11239),
the convention of the facebookresearch/DiT releases (`diffusion/gaussian_diffusion.py`, linear
schedule, 1000 steps), sampled here through its probability-flow ODE.

DiT's process has steps k = 0 .. N - 1 (N = 1000), **k = N - 1 is noise**:

    beta_k = linspace(beta_start, beta_end, N)_k              (1e-4 .. 0.02)
    abar_k = prod_{i <= k} (1 - beta_i)
    x_k    = sqrt(abar_k) x + sqrt(1 - abar_k) eps,   eps_hat = network(x_k, k, y)

In time t (ours: **t = 0 data, t = 1 noise**) the network receives tau = (N - 1) t and
log abar is linear between integer steps (exact at every k). With a = sqrt(abar),
s = sqrt(1 - abar) and L(t) = log abar((N - 1) t):

    x_t   = a x + s eps
    v     = dx_t/dt = a' x0_hat + s' eps_hat = L'/2 (x_t - eps_hat / s)
            (a' = a L'/2, s' = -abar L' / (2 s), x0_hat = (x_t - s eps_hat) / a)
    score = -eps_hat / s = 2 v / L' - x_t

Guidance mixes v, which is affine in eps_hat with the same coefficients for every label, so
it equals DiT's guidance of eps_hat. Sampling starts from unit noise at t = 1
(abar_{N-1} = 4e-5: x_T ~ N(0, I), as DDPM) and ends at k = 0, whose remaining noise has
standard deviation s = 0.01 (DiT's last ancestral step returns its mean instead).

Training: k ~ U{0, ..., N - 1}, per-sample loss mean_{H,W,C} (eps_hat - eps)^2 (DiT's
L_simple). The learned-variance half of a DiT head (`network.learn_sigma=True`) is neither
used nor trained here.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lib.flow.sit import mean_flat


def _col(v: jax.Array, ndim: int) -> jax.Array:
  return v.reshape(-1, *([1] * (ndim - 1)))


class DDPM:
  """Noise-prediction diffusion on DiT's linear beta schedule.

  Args:
    num_steps: N, the number of discrete diffusion steps.
    beta_start, beta_end: the linear schedule of betas (DiT: 1e-4, 0.02 for N = 1000).
  """
  noise_time = 1.0
  data_time = 0.0
  velocity_at_data = True  # s(0) = sqrt(beta_0) > 0
  evaluates_network = 'once'  # per loss, outside jax transforms: REPA can read its block outputs

  def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    if num_steps < 2 or not 0 < beta_start <= beta_end < 1:
      raise ValueError(f'interface.num_steps={num_steps}, beta_start={beta_start}, beta_end='
                       f'{beta_end}; expected num_steps >= 2 and 0 < beta_start <= beta_end < 1')
    self.num_steps = num_steps
    self.beta_start, self.beta_end = beta_start, beta_end
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    self.log_alpha_bar = np.cumsum(np.log1p(-betas))  # (N,), float64 as DiT computes it

  def log_alpha_bar_at(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(L, dL/dt) at times t in [0, 1]: log abar linear between steps, slope of the step
    interval [k, k + 1] that holds (N - 1) t (the last one at t = 1)."""
    table = jnp.asarray(self.log_alpha_bar, jnp.float32)
    tau = (self.num_steps - 1) * t
    k = jnp.clip(jnp.floor(tau), 0, self.num_steps - 2).astype(jnp.int32)
    slope = table[k + 1] - table[k]
    return table[k] + (tau - k) * slope, (self.num_steps - 1) * slope

  def epsilon(self, network, x_t: jax.Array, t: jax.Array, y: jax.Array,
              rngs=None) -> jax.Array:
    """eps_hat at times t (B,): the network fed DiT's timestep (N - 1) t."""
    kwargs = {} if rngs is None else {'rngs': rngs}
    return network(x_t, (self.num_steps - 1) * t, y, **kwargs).astype(jnp.float32)

  # ---------------------------------------------------------------------------- contract
  def loss(self, network, x: jax.Array, y: jax.Array, key: jax.Array, rngs=None):
    """Per-sample noise-prediction loss. x: (B, H, W, C), y: (B,) -> ((B,), aux)."""
    step_key, noise_key = jax.random.split(key)
    k = jax.random.randint(step_key, x.shape[:1], 0, self.num_steps)
    t = k.astype(jnp.float32) / (self.num_steps - 1)
    alpha_bar = _col(jnp.exp(jnp.asarray(self.log_alpha_bar, jnp.float32)[k]), x.ndim)
    noise = jax.random.normal(noise_key, x.shape)
    x_t = jnp.sqrt(alpha_bar) * x + jnp.sqrt(1 - alpha_bar) * noise
    return mean_flat((self.epsilon(network, x_t, t, y, rngs=rngs) - noise) ** 2), {}

  def velocity(self, network, x_t: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    """dx_t/dt of the probability-flow ODE at times t (B,), from t = 1 (noise) to 0."""
    log_alpha_bar, slope = self.log_alpha_bar_at(t)
    s = jnp.sqrt(-jnp.expm1(log_alpha_bar))
    eps = self.epsilon(network, x_t, t, y)
    return 0.5 * _col(slope, x_t.ndim) * (x_t - eps / _col(s, x_t.ndim))

  def score_from_velocity(self, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """grad log p_t(x_t) = -eps_hat / s = 2 v / L' - x_t."""
    _, slope = self.log_alpha_bar_at(t)
    return 2 * v / _col(slope, x_t.ndim) - x_t

  def score(self, network, x_t: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    return self.score_from_velocity(x_t, t, self.velocity(network, x_t, t, y))

  def noise_scale(self, t_start) -> float:
    """The samplers start from unit noise (DDPM's x_T ~ N(0, I))."""
    del t_start
    return 1.0
