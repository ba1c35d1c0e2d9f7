"""ODE/SDE samplers over a time grid, with classifier-free guidance, as one compiled loop.

A sampler integrates from the interface's noise end to its data end (t = 1 -> 0 for SiT and
MeanFlow, sigma = sigma_max -> 0 for EDM) along a grid of `num_steps + 1` times. It starts
from the given unit noise times `interface.noise_scale(grid[0])` (1 for SiT; sigma_max for
EDM), never times t_start. Each sampler integrates a field of the interface:

    Euler, Heun, REPAHeun  dx/dt = v(x, t, y)                          (`interface.velocity`)
    EulerMaruyama          dx = [v - w(t)/2 score] dt + sqrt(w(t)) dW  (`interface.score`)
    EulerJump              x_r = x_t + (r - t) u(x_t, t, r)   (`interface.average_velocity`)

Guidance mixes the field evaluated for the labels and for the null class
(`network.num_classes`), as one batched call on [y, null]:

    f_guided = f(x, t, null) + w * (f(x, t, y) - f(x, t, null))

for t inside `guidance_interval` (w = 1 outside it), on every step including the last; the
interval is tested on the time the field is evaluated at, except for `REPAHeun`'s corrector,
which is guided as its step's start time (REPA).
`guide_channels=3` reproduces the DiT/SiT/LightningDiT reference samplers, which guide only
the first three channels; the default guides all channels.

Time grids (`sampling_time_dist`):
  * 'uniform': linspace(t_start, t_end, num_steps + 1), then the shift
    t <- s t / (1 + (s - 1) t), s = sqrt(t_shift_cur / t_shift_base). With `last_interval`
    = d the last interval has length d (before the shift): linspace(t_start, t_end + d,
    num_steps) then t_end (REPA's Euler-Maruyama: linspace(1, 0.04, N) then 0, d = 0.04;
    DDT's `last_step`).
  * 'karras' (EDM): sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho for i < N = num_steps, then a final 0: num_steps intervals in all.

The loop over grid intervals is one `lax.scan` for every sampler, so each compiles once.
Subclasses define `step(drift, x, t, t_next, key, last)`, where `last` is a traced bool, true
on the final interval.
"""

import abc
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from lib.flow.sit import time_shift


class Sampler(abc.ABC):
  """Base class: the time grid, guidance and the integration loop.

  Args:
    num_steps: number of grid intervals.
    sampling_time_dist: 'uniform' or 'karras' (see the module docstring).
    t_start, t_end: ends of the uniform grid (noise end first).
    t_shift_base, t_shift_cur: the uniform grid is shifted by s = sqrt(t_shift_cur /
      t_shift_base) (s = 1 by default), as t <- s t / (1 + (s - 1) t).
    sigma_min, sigma_max, rho: the Karras grid (EDM: 0.002, 80, 7).
    guidance_scale: default classifier-free guidance weight w (1 = no guidance).
    guidance_interval: (t_low, t_high): guidance applies where t_low <= t <= t_high
      (None: at every time).
    guide_channels: guide only the first k channels (None: all).
    last_interval: length of the final interval of the uniform grid (None: num_steps equal
      intervals).
  """

  def __init__(self, num_steps: int,
               sampling_time_dist: Literal['uniform', 'karras'] = 'uniform',
               t_start: float = 1.0, t_end: float = 0.0, t_shift_base: int = 4096,
               t_shift_cur: int = 4096, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0, guidance_scale: float = 1.0,
               guidance_interval: tuple[float, float] | None = None,
               guide_channels: int | None = None, last_interval: float | None = None):
    if num_steps < 1:
      raise ValueError(f'sampler.num_steps={num_steps}; expected a positive integer')
    if last_interval is not None and not (
        sampling_time_dist == 'uniform' and num_steps >= 2
        and 0 < last_interval < abs(t_start - t_end)):
      raise ValueError(f'sampler.last_interval={last_interval} (num_steps={num_steps}, '
                       f'sampling_time_dist={sampling_time_dist!r}); expected a uniform grid of '
                       f'at least 2 steps and 0 < last_interval < |t_start - t_end| = '
                       f'{abs(t_start - t_end)}')
    if sampling_time_dist not in ('uniform', 'karras'):
      raise ValueError(f"sampler.sampling_time_dist={sampling_time_dist!r}; expected 'uniform' "
                       f"or 'karras'")
    if sampling_time_dist == 'karras' and not 0 < sigma_min < sigma_max:
      raise ValueError(f'sampler.sigma_min={sigma_min}, sigma_max={sigma_max}; expected '
                       f'0 < sigma_min < sigma_max')
    self.num_steps = num_steps
    self.sampling_time_dist = sampling_time_dist
    self.t_start, self.t_end = t_start, t_end
    self.shift = (t_shift_cur / t_shift_base) ** 0.5
    self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
    self.guidance_scale = guidance_scale
    self.guidance_interval = None if guidance_interval is None else tuple(guidance_interval)
    self.guide_channels = guide_channels
    self.last_interval = last_interval

  def time_grid(self) -> jax.Array:
    """(num_steps + 1,) times from the noise end to the data end."""
    if self.sampling_time_dist == 'karras':
      n = self.num_steps  # in float64, so the ends are exactly sigma_max and sigma_min
      fraction = np.arange(n) / max(n - 1, 1)
      lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
      sigmas = (hi + fraction * (lo - hi)) ** self.rho
      return jnp.asarray(np.concatenate([sigmas, [0.0]]), jnp.float32)
    if self.last_interval is None:
      grid = jnp.linspace(self.t_start, self.t_end, self.num_steps + 1)
    else:
      toward_end = np.sign(self.t_end - self.t_start)
      grid = jnp.concatenate([
          jnp.linspace(self.t_start, self.t_end - toward_end * self.last_interval,
                       self.num_steps), jnp.array([self.t_end])])
    return time_shift(grid, self.shift)

  # ---------------------------------------------------------------------------- fields
  def field(self, interface, network):
    """f(x, y, t, *extra) -> (B, ...) for scalar grid times: what guidance mixes."""

    def velocity(x, y, t):
      return interface.velocity(network, x, jnp.full((x.shape[0],), t), y)

    return velocity

  def guided(self, field, labels: jax.Array, null_label: int, guidance_scale):
    """drift(x, t, *extra, guide_time=t) with guidance folded in, guided where the
    interval holds `guide_time`; `guidance_scale` is a static float."""
    if guidance_scale == 1.0:
      return lambda x, t, *extra, guide_time=None: field(x, labels, t, *extra)

    def drift(x, t, *extra, guide_time=None):
      batch = x.shape[0]
      both = field(jnp.concatenate([x, x]),
                   jnp.concatenate([labels, jnp.full_like(labels, null_label)]), t, *extra)
      cond, uncond = both[:batch], both[batch:]
      scale = guidance_scale
      if self.guidance_interval is not None:
        low, high = self.guidance_interval
        when = t if guide_time is None else guide_time
        scale = jnp.where((when >= low) & (when <= high), guidance_scale, 1.0)
      guided = uncond + scale * (cond - uncond)
      if self.guide_channels is not None:
        guided = jnp.concatenate(
            [guided[..., :self.guide_channels], cond[..., self.guide_channels:]], axis=-1)
      return guided

    return drift

  @abc.abstractmethod
  def step(self, drift, x, t, t_next, key, last):
    """One grid interval t -> t_next; `drift(x, t, ...)` is the guided field; `last` is a
    traced bool, true on the final interval."""

  def __call__(self, interface, network, noise: jax.Array, labels: jax.Array,
               guidance_scale: float | None = None, key: jax.Array | None = None) -> jax.Array:
    """Integrates from unit `noise` (B, H, W, C) at the grid's start to samples at its end.

    `guidance_scale` overrides the configured weight; the null class is
    `network.num_classes`. `key` drives stochastic samplers (default: key(0)).
    """
    scale = self.guidance_scale if guidance_scale is None else guidance_scale
    drift = self.guided(self.field(interface, network), labels, network.num_classes, scale)
    # Heun ends with an Euler step where the field is undefined at the data end (EDM).
    drift.defined_at_end = getattr(interface, 'velocity_at_data', True)
    grid = self.time_grid()
    keys = jax.random.split(jax.random.key(0) if key is None else key, self.num_steps)
    last = jnp.arange(self.num_steps) == self.num_steps - 1
    noise_scale = getattr(interface, 'noise_scale', lambda t: 1.0)(grid[0])

    def body(x, inputs):
      t, t_next, step_key, is_last = inputs
      return self.step(drift, x, t, t_next, step_key, is_last), None

    x0 = noise.astype(jnp.float32) * noise_scale
    x, _ = jax.lax.scan(body, x0, (grid[:-1], grid[1:], keys, last))
    return x


class Euler(Sampler):
  """First order: x_{n+1} = x_n + (t_{n+1} - t_n) v(x_n, t_n). One evaluation per step."""

  def step(self, drift, x, t, t_next, key, last):
    return x + (t_next - t) * drift(x, t)


class Heun(Sampler):
  """Second order (explicit trapezoid), two evaluations per step:

      d1 = v(x_n, t_n);  x' = x_n + h d1;  d2 = v(x', t_{n+1});  x_{n+1} = x_n + h (d1 + d2) / 2

  The velocity of a flow-matching model is defined at t = 0, so there the last step is a
  full Heun step too (SiT's rule, `final_step = 'heun'`: 2 * num_steps evaluations). For an
  interface whose velocity is undefined at the data end (`velocity_at_data = False`: EDM at
  sigma = 0) the last step is the Euler step x', as in EDM (2 * num_steps - 1 evaluations).
  d2 is guided where the interval holds its own time t_{n+1}
  (`corrector_guidance = 'own_time'`).
  """
  final_step = 'heun'
  corrector_guidance = 'own_time'

  def step(self, drift, x, t, t_next, key, last):
    h = t_next - t
    d1 = drift(x, t)
    x_euler = x + h * d1
    guide_time = t if self.corrector_guidance == 'start_time' else t_next

    def heun():
      return x + 0.5 * h * (d1 + drift(x_euler, t_next, guide_time=guide_time))

    if drift.defined_at_end and self.final_step == 'heun':
      return heun()
    return jax.lax.cond(last, lambda: x_euler, heun)


class REPAHeun(Heun):
  """REPA's `euler_sampler(heun=True)`: Heun whose last step is the Euler step x' (2 *
  num_steps - 1 evaluations) and whose corrector d2 is guided where the interval holds the
  step's start time t_n (one guidance decision per step)."""
  final_step = 'euler'
  corrector_guidance = 'start_time'


def _diffusion(kind: str, norm: float, t):
  if kind == 'constant':
    return norm * jnp.ones_like(t)
  if kind == 'linear_kl':
    return norm * (t ** 2 / (1 - t) + t)
  if kind == 'linear':
    return norm * t
  if kind == 'cos':
    return 0.25 * (norm * jnp.cos(jnp.pi * t) + 1) ** 2
  return 0.25 * (norm * jnp.sin(jnp.pi * t) + 1) ** 2  # 'concave'


DIFFUSIONS = ('constant', 'linear_kl', 'linear', 'cos', 'concave')


class EulerMaruyama(Sampler):
  """Reverse SDE with the marginals of the flow, integrated by Euler-Maruyama:

      x_mean = x + [v(x, t) - w(t)/2 score(x, t)] (t_next - t)
      x_next = x_mean + sqrt(w(t)) sqrt(|t_next - t|) eps_n,   eps_n ~ N(0, 1)

  and the last step returns x_mean only (no noise). Step n's eps_n is
  `jax.random.normal(jax.random.split(key, num_steps)[n], x.shape)`. Any w(t) >= 0 keeps the marginals of the
  probability-flow ODE (w = 0 is Euler). The diffusion coefficient w(t), t = 1 noise
  (diffuse_nnx's options, `diffusion_norm` = c):
    'linear_kl' (default): c (t^2 / (1 - t) + t) = c t / (1 - t); infinite at t = 1, so the
                grid starts at t_start = 0.999 by default (as diffuse_nnx's REPA preset)
    'constant': c;   'linear': c t;   'cos': (c cos(pi t) + 1)^2 / 4;
    'concave': (c sin(pi t) + 1)^2 / 4.
  REPA's `euler_maruyama_sampler` is w(t) = 2t ('linear', c = 2) from t_start = 1 on
  linspace(1, 0.04, N) then 0 (`last_interval=0.04`; `experiments/common.py:repa_sde`).
  Guidance mixes the whole SDE drift (v and score together) on every step, the last
  included. For EDM (time = sigma) only 'constant' is meaningful.
  """

  def __init__(self, num_steps: int, diffusion: Literal['constant', 'linear_kl', 'linear',
                                                         'cos', 'concave'] = 'linear_kl',
               diffusion_norm: float = 1.0,
               sampling_time_dist: Literal['uniform', 'karras'] = 'uniform',
               t_start: float = 0.999, t_end: float = 0.0, t_shift_base: int = 4096,
               t_shift_cur: int = 4096, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0, guidance_scale: float = 1.0,
               guidance_interval: tuple[float, float] | None = None,
               guide_channels: int | None = None, last_interval: float | None = None):
    if diffusion not in DIFFUSIONS:
      raise ValueError(f'sampler.diffusion={diffusion!r}; expected one of {DIFFUSIONS}')
    if diffusion == 'linear_kl' and sampling_time_dist == 'uniform' and t_start >= 1.0:
      raise ValueError(f"sampler.diffusion='linear_kl' is infinite at t_start={t_start}; "
                       f"use t_start < 1 (e.g. 0.999)")
    super().__init__(num_steps, sampling_time_dist, t_start, t_end, t_shift_base, t_shift_cur,
                     sigma_min, sigma_max, rho, guidance_scale, guidance_interval,
                     guide_channels, last_interval)
    self.diffusion = diffusion
    self.diffusion_norm = diffusion_norm

  def diffusion_coeff(self, t):
    """w(t)."""
    return _diffusion(self.diffusion, self.diffusion_norm, t)

  def field(self, interface, network):

    def sde_drift(x, y, t):
      times = jnp.full((x.shape[0],), t)
      if hasattr(interface, 'score_from_velocity'):  # one network evaluation
        v = interface.velocity(network, x, times, y)
        score = interface.score_from_velocity(x, times, v)
      else:
        v = interface.velocity(network, x, times, y)
        score = interface.score(network, x, times, y)
      return v - 0.5 * self.diffusion_coeff(t) * score

    return sde_drift

  def step(self, drift, x, t, t_next, key, last):
    h = t_next - t
    mean = x + h * drift(x, t)
    kick = jnp.sqrt(self.diffusion_coeff(t) * jnp.abs(h)) * jax.random.normal(key, x.shape)
    return jnp.where(last, mean, mean + kick)


class EulerJump(Sampler):
  """Average-velocity jumps (MeanFlow): x_r = x_t + (r - t) u(x_t, t, r) with r the next grid
  time, from `interface.average_velocity`; `num_steps=1` is one network evaluation from t = 1
  to 0. Guidance is usually baked in by training (guidance_scale 1, the default); another
  scale mixes u for the label and the null class as the other samplers do.
  """

  def field(self, interface, network):

    def average_velocity(x, y, t, r):
      batch = x.shape[0]
      return interface.average_velocity(network, x, jnp.full((batch,), t),
                                        jnp.full((batch,), r), y)

    return average_velocity

  def step(self, drift, x, t, t_next, key, last):
    return x + (t_next - t) * drift(x, t, t_next)
