"""Orbax checkpointing of the whole training state.

A checkpoint `<workdir>/checkpoints/<step>` holds one pytree: the step, parameters,
optimizer state, EMA state and the network's fixed arrays (which may come from released
weights, e.g. a fixed Fourier time basis). The data position and the random keys are pure
functions of (seed, step), so the step is all a resumed run needs to continue exactly.
Orbax writes into a temporary folder and renames it when complete, so a run killed
while saving leaves its previous checkpoints intact and never a half-written one.
"""

import os

import jax
import orbax.checkpoint as ocp


class Checkpointing:
  """Checkpoint policy (diffuse_nnx's `checkpoint.options`).

  Args:
    save_interval_steps: save every this many steps (and at the end of the run).
    max_to_keep: keep at most this many recent checkpoints ...
    keep_period: ... plus every checkpoint whose step is a multiple of this.
    async_save: write in a background thread while training continues.
  """

  def __init__(self, save_interval_steps: int = 50_000, max_to_keep: int | None = 8,
               keep_period: int | None = 100_000, async_save: bool = False):
    self.save_interval_steps = save_interval_steps
    self.max_to_keep = max_to_keep
    self.keep_period = keep_period
    self.async_save = async_save

  def manager(self, workdir: str) -> ocp.CheckpointManager:
    # Every `save_interval_steps` steps, or when JAX's preemption notice reaches every host;
    # unlike orbax's default policy, no extra save at a run's first step.
    policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(self.save_interval_steps),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policy, max_to_keep=self.max_to_keep, keep_period=self.keep_period,
        enable_async_checkpointing=self.async_save, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                                 options=options)


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
  """Saves `state` at `step` if the policy asks for it (or `force`)."""
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores the newest (or the given) step into the structure and shardings of
  `abstract_state` (a pytree of `jax.ShapeDtypeStruct`). Returns (step, state)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint found in {manager.directory}')
  return step, manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def latest_step(workdir: str) -> int | None:
  """Newest complete checkpoint step in `workdir`, without opening a manager."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return None
  steps = ocp.utils.checkpoint_steps(directory)
  return max(steps) if steps else None


def abstract(tree, shardings=None):
  """Shape/dtype (and sharding) skeleton of a pytree of arrays."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
