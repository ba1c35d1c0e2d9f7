"""Exponential moving average of the trained parameters.

    ema_0 = params_0          (a copy of the initial weights, not zeros)
    ema_k = decay * ema_{k-1} + (1 - decay) * params_k

An EMA object is configuration only; its state is a pytree the trainer carries and
checkpoints. `weights(state)` gives the parameters to sample or evaluate with.
"""

import jax
import jax.numpy as jnp


class EMA:
  """Constant-decay EMA (the seed's `ema`)."""

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
