"""ODE samplers over a time grid, with classifier-free guidance, as one compiled loop.

A sampler integrates dx/dt = v(x, t) from the interface's noise time to its data time
(t = 1 -> 0 for SiT) along a grid of `num_steps + 1` times. The drift is the guided
velocity

    v_guided = v(x, t, null) + w * (v(x, t, y) - v(x, t, null))

for t inside `guidance_interval` (w = 1 outside it), evaluated as one batched call on
[y, null]. `guide_channels=3` reproduces the DiT/SiT/LightningDiT reference samplers,
which guide only the first three channels; the default guides all channels.
The loop over grid intervals is a `lax.scan`, so the whole sampler compiles once.
"""

import abc
from typing import Literal

import jax
import jax.numpy as jnp

from lib.flow.sit import time_shift


class Sampler(abc.ABC):
  """Base class: the time grid, guidance and the integration loop.

  Args:
    num_steps: number of grid intervals.
    sampling_time_dist: 'uniform' grid `linspace(t_start, t_end, num_steps + 1)`.
    t_start, t_end: ends of the grid (noise end first).
    t_shift_base, t_shift_cur: the grid is shifted by s = sqrt(t_shift_cur / t_shift_base)
      (s = 1 by default), as t <- s t / (1 + (s - 1) t).
    guidance_scale: default classifier-free guidance weight w (1 = no guidance).
    guidance_interval: (t_low, t_high): guidance applies where t_low <= t <= t_high.
    guide_channels: guide only the first k channels (None: all).
  """

  def __init__(self, num_steps: int, sampling_time_dist: Literal['uniform'] = 'uniform',
               t_start: float = 1.0, t_end: float = 0.0, t_shift_base: int = 4096,
               t_shift_cur: int = 4096, guidance_scale: float = 1.0,
               guidance_interval: tuple[float, float] = (0.0, 1.0),
               guide_channels: int | None = None):
    if num_steps < 1:
      raise ValueError(f'sampler.num_steps={num_steps}; expected a positive integer')
    if sampling_time_dist != 'uniform':
      raise ValueError(f"sampler.sampling_time_dist={sampling_time_dist!r}; expected 'uniform'")
    self.num_steps = num_steps
    self.t_start, self.t_end = t_start, t_end
    self.shift = (t_shift_cur / t_shift_base) ** 0.5
    self.guidance_scale = guidance_scale
    self.guidance_interval = tuple(guidance_interval)
    self.guide_channels = guide_channels

  def time_grid(self) -> jax.Array:
    """(num_steps + 1,) times from t_start to t_end."""
    grid = jnp.linspace(self.t_start, self.t_end, self.num_steps + 1)
    return time_shift(grid, self.shift)

  def guided_velocity(self, interface, network, null_label: int, guidance_scale):
    """drift(x, t, y) with guidance folded in; `guidance_scale` is a static Python float."""

    def drift(x, t, y):
      batch = x.shape[0]
      times = jnp.full((2 * batch,), t)
      labels = jnp.concatenate([y, jnp.full_like(y, null_label)])
      both = interface.velocity(network, jnp.concatenate([x, x]), times, labels)
      cond, uncond = both[:batch], both[batch:]
      low, high = self.guidance_interval
      scale = jnp.where((t >= low) & (t <= high), guidance_scale, 1.0)
      guided = uncond + scale * (cond - uncond)
      if self.guide_channels is not None:
        guided = jnp.concatenate(
            [guided[..., :self.guide_channels], cond[..., self.guide_channels:]], axis=-1)
      return guided

    def plain(x, t, y):
      return interface.velocity(network, x, jnp.full((x.shape[0],), t), y)

    return plain if guidance_scale == 1.0 else drift

  @abc.abstractmethod
  def step(self, drift, x, t, t_next, key):
    """One grid interval t -> t_next; `drift(x, t)` is the guided velocity."""

  def __call__(self, interface, network, noise: jax.Array, labels: jax.Array,
               guidance_scale: float | None = None, key: jax.Array | None = None) -> jax.Array:
    """Integrates from `noise` (B, H, W, C) at t_start to samples at t_end.

    `guidance_scale` overrides the configured weight; pass the network's null class
    through `network.num_classes`.
    """
    scale = self.guidance_scale if guidance_scale is None else guidance_scale
    drift = self.guided_velocity(interface, network, network.num_classes, scale)
    drift_y = lambda x, t: drift(x, t, labels)
    grid = self.time_grid()
    keys = jax.random.split(jax.random.key(0) if key is None else key, self.num_steps)

    def body(x, inputs):
      t, t_next, step_key = inputs
      return self.step(drift_y, x, t, t_next, step_key), None

    x, _ = jax.lax.scan(body, noise.astype(jnp.float32), (grid[:-1], grid[1:], keys))
    return x


class Euler(Sampler):
  """First order: x_{n+1} = x_n + (t_{n+1} - t_n) v(x_n, t_n). One evaluation per step."""

  def step(self, drift, x, t, t_next, key):
    return x + (t_next - t) * drift(x, t)


class Heun(Sampler):
  """Second order (explicit trapezoid), two evaluations per step, on every step:

      d1 = v(x_n, t_n);  x' = x_n + h d1;  d2 = v(x', t_{n+1});  x_{n+1} = x_n + h (d1 + d2) / 2

  The velocity of a flow-matching model is defined at t = 0, so the last step is a
  full Heun step too (2 * num_steps evaluations in all).
  """

  def step(self, drift, x, t, t_next, key):
    h = t_next - t
    d1 = drift(x, t)
    d2 = drift(x + h * d1, t_next)
    return x + 0.5 * h * (d1 + d2)
