"""Optimizers and learning-rate schedules, as project factories over optax.

A preset configures `optimizer=fdl.Partial(adamw, learning_rate=1e-4, schedule=fdl.Partial(
cosine, warmup_steps=...))`; the trainer calls it with the run length, so schedules that
decay over the run stay consistent when `total_steps` is overridden. Wrapping optax in
project functions keeps saved configs independent of optax's private module paths.

Schedules are called as `schedule(learning_rate, total_steps) -> optax.Schedule`.
"""

import dataclasses
from typing import Callable

import jax.numpy as jnp
import optax

from lib import errors

Schedule = Callable[[float, int], optax.Schedule]


def constant(learning_rate: float, total_steps: int) -> optax.Schedule:
  """lr at every step."""
  del total_steps
  return optax.constant_schedule(learning_rate)


def linear_constant(learning_rate: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Linear warmup 0 -> lr over `warmup_steps`, then constant."""
  del total_steps
  return optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)) if warmup_steps else \
      optax.constant_schedule(learning_rate)


def linear(learning_rate: float, total_steps: int, warmup_steps: int = 0,
           min_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup 0 -> lr, then linear decay to `min_lr` at `total_steps`."""
  decay = optax.linear_schedule(learning_rate, min_lr, max(total_steps - warmup_steps, 1))
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def constant_then_linear(learning_rate: float, total_steps: int, decay_start: int = 0,
                         decay_end: int = 1, min_lr: float = 0.0) -> optax.Schedule:
  """lr until `decay_start`, linear decay to `min_lr` at `decay_end`, then `min_lr` (RAE's
  `linear` scheduler, whose "warmup" holds lr)."""
  del total_steps
  decay = optax.linear_schedule(learning_rate, min_lr, max(decay_end - decay_start, 1))
  return optax.join_schedules([optax.constant_schedule(learning_rate), decay], [decay_start])


def cosine(learning_rate: float, total_steps: int, warmup_steps: int = 0,
           min_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup 0 -> lr, then cosine decay to `min_lr` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), end_value=min_lr)


def polynomial(learning_rate: float, total_steps: int, warmup_steps: int = 0,
               power: float = 2.0) -> optax.Schedule:
  """Polynomial warmup 0 -> lr (power `power`), then polynomial decay to 0 at `total_steps`."""
  decay = optax.polynomial_schedule(learning_rate, 0.0, power,
                                    max(total_steps - warmup_steps, 1))
  if not warmup_steps:
    return decay
  warmup = optax.polynomial_schedule(0.0, learning_rate, power, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def inverse_sqrt(learning_rate: float, total_steps: int, ref_steps: int = 70_000,
                 rampup_steps: int = 0) -> optax.Schedule:
  """EDM2: lr / sqrt(max(step / ref_steps, 1)) * min(step / rampup_steps, 1).

  EDM2 states `ref_steps` and `rampup_steps` in images (`lr_ref_batches`,
  `lr_rampup_Mimg`); here they are in optimizer steps.
  """
  del total_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    lr = learning_rate / jnp.sqrt(jnp.maximum(step / ref_steps, 1.0))
    if rampup_steps:
      lr = lr * jnp.minimum(step / rampup_steps, 1.0)
    return lr

  return schedule


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """What the trainer needs: the optax transformation and the schedule (for logging)."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def _check(learning_rate: float, grad_clip_norm: float | None) -> None:
  """A learning rate >= 0 and a clipping norm > 0 (or None), or ValueError naming it."""
  errors.check_in_range(0, learning_rate=learning_rate)
  if grad_clip_norm is not None:
    errors.check_in_range(0, open_low=True, grad_clip_norm=grad_clip_norm)


def _finish(tx: optax.GradientTransformation, schedule: optax.Schedule,
            grad_clip_norm: float | None) -> Optimizer:
  if grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return Optimizer(tx, schedule)


def adamw(learning_rate: float = 1e-4, schedule: Schedule = constant, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
          grad_clip_norm: float | None = None, *, total_steps: int) -> Optimizer:
  """AdamW with a schedule and optional clipping of the global gradient norm."""
  _check(learning_rate, grad_clip_norm)
  lr = schedule(learning_rate, total_steps)
  return _finish(optax.adamw(lr, b1, b2, eps, weight_decay=weight_decay), lr, grad_clip_norm)


def adam(learning_rate: float = 1e-4, schedule: Schedule = constant, b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-8, grad_clip_norm: float | None = None, *,
         total_steps: int) -> Optimizer:
  """Adam with a schedule and optional clipping of the global gradient norm."""
  _check(learning_rate, grad_clip_norm)
  lr = schedule(learning_rate, total_steps)
  return _finish(optax.adam(lr, b1, b2, eps), lr, grad_clip_norm)


def sgd(learning_rate: float = 1e-2, schedule: Schedule = constant, momentum: float | None = None,
        nesterov: bool = False, grad_clip_norm: float | None = None, *,
        total_steps: int) -> Optimizer:
  """SGD (optionally with momentum) with a schedule and optional gradient clipping."""
  _check(learning_rate, grad_clip_norm)
  lr = schedule(learning_rate, total_steps)
  return _finish(optax.sgd(lr, momentum, nesterov), lr, grad_clip_norm)
