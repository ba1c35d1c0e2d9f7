"""Exponential moving average of the trained parameters.

    ema_0 = params_0          (a copy of the initial weights, not zeros)
    ema_k = decay * ema_{k-1} + (1 - decay) * params_k

An EMA object is configuration only; its state is a pytree the trainer carries and
checkpoints. `weights(state)` gives the parameters to sample or evaluate with.
`PowerEMA` is EDM2's power-function EMA, with post-hoc reconstruction (`posthoc_ema`).
"""

import jax
import jax.numpy as jnp
import numpy as np


class EMA:
  """Constant-decay EMA (diffuse_nnx's `ema`)."""

  def __init__(self, decay: float = 0.9999):
    if not 0.0 <= decay < 1.0:
      raise ValueError(f'ema.decay={decay}; expected 0 <= decay < 1')
    self.decay = decay

  def init(self, params):
    return jax.tree.map(jnp.copy, params)

  def update(self, state, params, step):
    del step
    return jax.tree.map(lambda e, p: self.decay * e + (1.0 - self.decay) * p, state, params)

  def weights(self, state):
    return state


# ------------------------------------------------------------------------------- power EMA
def exp_to_std(gamma):
  """Relative standard deviation of the power-function profile p(tau) ~ tau^gamma on [0, t]:
  std = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
  gamma = np.asarray(gamma, np.float64)
  return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_exp(std):
  """The exponent gamma of a relative std: the largest real root of
  gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2) = 0."""
  std = np.asarray(std, np.float64)
  out = []
  for s in std.reshape(-1):
    u = s ** -2.0
    roots = np.roots([1.0, 7.0, 16.0 - u, 12.0 - u])
    real = roots[np.abs(roots.imag) < 1e-9].real
    if not 0 < s < 0.2887 or not len(real) or real.max() <= -1:
      raise ValueError(f'ema std={s}; expected 0 < std < 0.2887 (sqrt(1/12), gamma = 0)')
    out.append(real.max())
  return np.asarray(out).reshape(std.shape)


def power_function_beta(gamma, t):
  """beta_t = (1 - 1/t)^(gamma + 1) for the t-th update (t >= 1; beta_1 = 0)."""
  t = jnp.asarray(t, jnp.float32)
  return jnp.exp((gamma + 1) * jnp.log1p(-1.0 / t))


def _profile_dot(t_a, gamma_a, t_b, gamma_b):
  """Inner product of two normalised power profiles p(tau) = (g + 1) tau^g / t^(g + 1)."""
  m = np.minimum(t_a, t_b)
  log = (np.log(gamma_a + 1) + np.log(gamma_b + 1) + (gamma_a + gamma_b + 1) * np.log(m)
         - np.log(gamma_a + gamma_b + 1) - (gamma_a + 1) * np.log(t_a)
         - (gamma_b + 1) * np.log(t_b))
  return np.exp(log)


def solve_posthoc_coefficients(steps, gammas, target_step, target_gamma) -> np.ndarray:
  """Least-squares coefficients x with sum_i x_i p(.; t_i, g_i) ~ p(.; target) in L2 over
  tau (continuous profiles; the discrete EMA weight of update k is exactly the integral of
  its profile over [k - 1, k])."""
  scale = float(max(max(steps), target_step))
  t = np.asarray(steps, np.float64) / scale
  g = np.asarray(gammas, np.float64)
  a = _profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
  b = _profile_dot(t, g, target_step / scale, float(target_gamma))
  return np.linalg.lstsq(a, b, rcond=None)[0]


def posthoc_ema(snapshots, target_std: float, target_step: int | None = None):
  """EMA of another std reconstructed from stored power-EMA snapshots (EDM2 post-hoc EMA).

  Args:
    snapshots: [(step, gamma, params), ...]: power-EMA weights with exponent gamma after
      `step` updates (`PowerEMA.snapshots(state, step)` of several checkpoints).
    target_std: relative std of the wanted profile.
    target_step: the step it should be the EMA of (default: the newest snapshot).
  Returns the parameters sum_i x_i params_i (float32 leaves).
  """
  steps = [s for s, _, _ in snapshots]
  gammas = [g for _, g, _ in snapshots]
  target_step = max(steps) if target_step is None else target_step
  coefficients = solve_posthoc_coefficients(steps, gammas, target_step,
                                            float(std_to_exp(target_std)))
  trees = [p for _, _, p in snapshots]
  return jax.tree.map(
      lambda *leaves: sum(float(c) * jnp.asarray(x, jnp.float32)
                          for c, x in zip(coefficients, leaves)), *trees)


class PowerEMA:
  """Power-function EMA (Karras et al. 2024, EDM2), one average per relative std.

      gamma = std_to_exp(std);  beta_t = (1 - 1/t)^(gamma + 1)  at the t-th update
      ema_t = beta_t ema_{t-1} + (1 - beta_t) params_t

  so ema_t = sum_k w_k params_k with w_k = (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1):
  the profile ~ tau^gamma on [0, t], whose width relative to t is `std`. The state is a tuple
  with one parameter tree per std (all checkpointed); `weights` gives the `sample_index`-th.
  Other stds are reconstructed after training from checkpoints with `posthoc_ema`
  (`snapshots` lists a state's averages).

  Args:
    stds: relative stds of the tracked profiles (EDM2: 0.050 and 0.100).
    sample_index: which profile samples and evaluations use.
  """

  def __init__(self, stds: tuple[float, ...] = (0.050, 0.100), sample_index: int = 0):
    if not stds or not 0 <= sample_index < len(stds):
      raise ValueError(f'ema.stds={stds}, sample_index={sample_index}; expected at least one '
                       f'std and an index into them')
    self.stds = tuple(stds)
    self.sample_index = sample_index
    self.gammas = tuple(float(g) for g in std_to_exp(np.asarray(self.stds)))

  def init(self, params):
    return tuple(jax.tree.map(jnp.copy, params) for _ in self.stds)

  def update(self, state, params, step):
    """`step`: updates made before this one (the trainer's pre-increment step)."""
    t = jnp.asarray(step, jnp.float32) + 1.0
    new = []
    for gamma, ema in zip(self.gammas, state):
      beta = power_function_beta(gamma, t)
      new.append(jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p, ema, params))
    return tuple(new)

  def weights(self, state):
    return state[self.sample_index]

  def snapshots(self, state, step: int) -> list:
    """[(step, gamma, params)] of a state after `step` updates, for `posthoc_ema`."""
    return [(int(step), gamma, ema) for gamma, ema in zip(self.gammas, state)]
