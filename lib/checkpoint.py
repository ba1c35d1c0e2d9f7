"""Orbax checkpointing of the whole training state, verified on restore.

A checkpoint `<workdir>/checkpoints/<step>` holds one pytree: the step, parameters,
optimizer state, EMA state and the network's fixed arrays (which may come from released
weights, e.g. a fixed Fourier time basis). The data position and the random keys are pure
functions of (seed, step), so the step is all a resumed run needs to continue exactly.
Sampling and evaluation read a part of it (`restore(..., partial=True)`): the weights they use,
never the optimizer's moments.
Orbax writes into a temporary folder and renames it when complete, so a run killed
while saving leaves its previous checkpoints intact and never a half-written one.

What is saved is checked twice:
- `save` refuses a state with a non-finite floating-point value (`NonFiniteError`), so a
  diverged run never rotates good checkpoints out with NaN ones.
- Each checkpoint records a digest of every array in its step metadata (orbax's
  `custom_metadata`); `restore` recomputes it, so a damaged file (even one flipped bit) is
  detected.

`restore` tells a checkpoint that does not fit from a damaged one:
- Before any array is read, the saved tree's metadata (paths, shapes, dtypes) is compared
  with the restore target (for a partial restore, only the part read). A difference means
  the checkpoint was saved by another config (another network): `CheckpointMismatch`, a
  user error naming the first differences and how to relaunch, and nothing moves.
- Damage is a checkpoint that cannot be read (files or metadata unreadable, pieces missing),
  fails its digest or holds non-finite values. Only a training launch (which holds the
  workdir's lock) moves it aside, to `<workdir>/checkpoints_set_aside/<step>` (renamed,
  never deleted) with a `REASON.txt`; sampling and evaluation leave it in place. Both log
  one line and try the next newest. A training launch left with no usable checkpoint but
  set-aside ones refuses to start again at step 0 (`lib.train.Run.restore_or_init`).

The digest of an array is its position-weighted 32-bit sum,
    sum_i  bits(x_i) * (2 i + 1)   mod 2^32,
over the flattened array (`bits`: the raw float bits as an unsigned integer). Integer
addition modulo 2^32 is associative, so the value does not depend on how the array is
sharded, and the weights are odd, so changing any single bit changes it.
"""

import contextlib
import gc
import inspect
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lib import errors, paths, storage

# orbax (and tensorstore below it) is imported by the functions that use it, so that building
# or printing a config, which constructs `Checkpointing`, does not pay for it.

SET_ASIDE = 'checkpoints_set_aside'


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
    errors.check_positive(save_interval_steps=save_interval_steps, max_to_keep=max_to_keep,
                          keep_period=keep_period)
    self.save_interval_steps = save_interval_steps
    self.max_to_keep = max_to_keep
    self.keep_period = keep_period
    self.async_save = async_save

  def manager(self, workdir, create: bool = True) -> 'ocp.CheckpointManager':
    """The orbax manager of `workdir/checkpoints` (`create=False`: readers such as sampling
    never create the folder)."""
    import orbax.checkpoint as ocp

    storage.limit_tensorstore_retries()  # a bucket that stops answering fails a save in time
    # Every `save_interval_steps` steps, or when JAX's preemption notice reaches every host;
    # unlike orbax's default policy, no extra save at a run's first step.
    policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(self.save_interval_steps),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policy, max_to_keep=self.max_to_keep, keep_period=self.keep_period,
        enable_async_checkpointing=self.async_save, create=create)
    return ocp.CheckpointManager(directory(workdir), options=options)


def directory(workdir) -> paths.Path:
  """`workdir/checkpoints` (local or in a bucket: orbax commits each step there by its own
  protocol, a rename locally, a `commit_success.txt` marker on an object store)."""
  return paths.resolve(workdir, '--workdir') / 'checkpoints'


# ------------------------------------------------------------------------------- digests
def _bits(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32 (floats bit-cast, narrower types widened)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize
  if jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.signedinteger):
    x = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width])
  return x.astype(jnp.uint32)


@jax.jit
def _fingerprint(tree):
  """(per-leaf uint32 digests, per-leaf "all values finite")."""
  def digest(x):
    bits = _bits(x).reshape(-1)
    weights = 2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1
    return jnp.sum(bits * weights, dtype=jnp.uint32)

  def finite(x):
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else \
        jnp.ones((), bool)

  return jax.tree.map(digest, tree), jax.tree.map(finite, tree)


def fingerprint(tree) -> tuple[dict[str, int], list[str]]:
  """({array path: digest}, paths of arrays holding a non-finite value) of a pytree."""
  digests, finite = jax.device_get(_fingerprint(tree))
  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(digests)[0]]
  return (dict(zip(paths, (int(d) for d in jax.tree.leaves(digests)))),
          [p for p, ok in zip(paths, jax.tree.leaves(finite)) if not ok])


def _describe(paths: list[str]) -> str:
  return ', '.join(paths[:3]) + (f' and {len(paths) - 3} more' if len(paths) > 3 else '')


# ------------------------------------------------------------------------------- save
def save(manager: 'ocp.CheckpointManager', step: int, state, force: bool = False) -> bool:
  """Saves `state` at `step`, with the digests of its arrays, if the policy asks for it (or
  `force`). Raises `NonFiniteError` (and writes nothing) if any value is not finite."""
  import orbax.checkpoint as ocp

  if not force and not manager.should_save(step):
    return False
  digests, nonfinite = fingerprint(state)
  if nonfinite:
    raise errors.NonFiniteError(
        f'the state of step {step} holds non-finite values in {_describe(nonfinite)}; it was '
        f'not saved{newest_note(manager)}')
  return manager.save(step, args=ocp.args.StandardSave(state), force=True,
                      custom_metadata={'digests': digests})


def newest_note(manager: 'ocp.CheckpointManager') -> str:
  """'; the newest checkpoint is step N in DIR' (or that there is none), for messages."""
  manager.wait_until_finished()
  step = manager.latest_step()
  if step is None:
    return f'; there is no checkpoint in {manager.directory}'
  return f'; the newest checkpoint, step {step} in {manager.directory}, holds finite weights'


# ------------------------------------------------------------------------------- restore
def _verify(manager: 'ocp.CheckpointManager', step: int, state) -> None:
  """Raises ValueError if `state` (restored from `step`, all of it or a part) differs from
  what was saved: each restored array is compared with the digest recorded for its path."""
  digests, nonfinite = fingerprint(state)
  metadata_file = paths.Path(manager.directory) / str(step) / '_CHECKPOINT_METADATA'
  try:
    recorded = (json.loads(metadata_file.read_text()).get('custom_metadata') or
                {}).get('digests')
  except (OSError, ValueError) as error:
    raise ValueError(f'cannot read {metadata_file}: {error}') from None
  if recorded is None:  # written before checkpoints carried digests
    logging.warning('Checkpoint %d records no digests (an earlier fiddlediff wrote it); it is '
                    'checked for finite values only', step)
    recorded = digests
  changed = [path for path, digest in digests.items() if recorded.get(path) != digest]
  if changed:
    raise ValueError(f'content differs from what was saved in {_describe(changed)} (digest '
                     f'mismatch: the files were damaged)')
  if nonfinite:
    raise ValueError(f'non-finite values in {_describe(nonfinite)}')


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:400]


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def set_aside_folder(manager: 'ocp.CheckpointManager') -> paths.Path:
  """`<workdir>/checkpoints_set_aside`, where damaged checkpoints are kept."""
  return paths.Path(manager.directory).parent / SET_ASIDE


def set_aside_steps(manager: 'ocp.CheckpointManager') -> list[str]:
  """The names of the checkpoints set aside in the manager's workdir (sorted)."""
  folder = set_aside_folder(manager)
  return sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []


def set_aside(manager: 'ocp.CheckpointManager', step: int, reason: str) -> str:
  """Moves checkpoint `step` out of the manager's folder into `checkpoints_set_aside/`
  (process 0; never deletes it) and returns its new path."""
  source = paths.Path(manager.directory) / str(step)
  target = set_aside_folder(manager) / str(step)
  if target.exists():
    target = target.parent / (target.name + time.strftime('.%Y%m%d-%H%M%S'))
  if jax.process_index() == 0:
    paths.move(source, target)
    (target / 'REASON.txt').write_text(reason + '\n')
  from lib import distributed
  distributed.barrier(f'set aside {step}')
  manager.reload()
  return target


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/blocks/0/attn/qkv/kernel': (shape, dtype name)} of a pytree of arrays, of
  `jax.ShapeDtypeStruct`s or of orbax's saved-array metadata. PRNG keys count as their key
  data (uint32), as which they are saved; NNX's `value` wrapper is left out of the names."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.eval_shape(jax.random.key_data, leaf)
    name = '/'.join(str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))
                    for key in path).removesuffix('/value')
    flat[name] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
  return flat


def _misfit(saved_tree, abstract_state, partial: bool) -> list[str]:
  """How the saved tree (orbax's metadata of it) differs from `abstract_state`: arrays of
  another shape or dtype, arrays the target expects and the checkpoint lacks, and (unless
  `partial`, which reads a part of the saved tree) arrays saved but not expected."""
  saved, expected = _shapes(saved_tree), _shapes(abstract_state)

  def describe(shape_dtype):
    shape, dtype = shape_dtype
    return f'{dtype}{list(shape)}'

  differences = []
  for name, want in expected.items():
    if name not in saved:
      differences.append(f'{name} is not saved (expected {describe(want)})')
    elif saved[name] != want:
      differences.append(f'{name} saved {describe(saved[name])}, expected {describe(want)}')
  if not partial:
    differences += [f'{name} is saved but not expected' for name in saved
                    if name not in expected]
  return differences


class _Misfit(Exception):
  """A readable checkpoint whose tree does not fit the restore target (not damage)."""


def _read(directory: paths.Path, abstract_state, partial: bool):
  """The arrays of `abstract_state` (with `partial`, a part of the saved tree) from the tree
  saved in `directory`, by a handler of its own (a damaged step must not leave state in the
  manager). The saved tree's metadata is compared with the target before any array is read:
  `_Misfit` lists the differences; a metadata file that cannot be read is damage (raised as
  it comes), whatever part is read."""
  import orbax.checkpoint as ocp

  handler = ocp.PyTreeCheckpointHandler()
  try:
    differences = _misfit(handler.metadata(directory).tree, abstract_state, partial)
    if differences:
      raise _Misfit(differences)
    return handler.restore(directory, args=ocp.args.PyTreeRestore(
        item=abstract_state, partial_restore=partial,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)))
  finally:
    handler.close()


@contextlib.contextmanager
def _abandoned_reads_unreported():
  """orbax reads a tree's arrays in concurrent coroutines; when one read fails, the others
  are abandoned, and each repeats the failure with a traceback ("Exception ignored in
  <coroutine ...>") when it is collected. Collects them on leaving, without those reports
  (the failure itself is reported once, by `restore`)."""
  previous = sys.unraisablehook
  sys.unraisablehook = lambda report: (None if inspect.iscoroutine(report.object)
                                       else previous(report))
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous


def _mismatch_error(manager: 'ocp.CheckpointManager', step: int,
                    differences: list[str]) -> errors.CheckpointMismatch:
  workdir = paths.Path(manager.directory).parent
  return errors.CheckpointMismatch(
      f'checkpoint {step} in {manager.directory} does not fit the launched config, so it was '
      f'saved by another config (another network?): {_describe(differences)}. Nothing was '
      f'moved. Relaunch with the run\'s saved config: --fdl_config_file={workdir}/config.json '
      f'(--mode=sample or --mode=eval with --workdir={workdir} and no --fdl_config uses it), '
      f'or train this config in another --workdir')


def _steps_newest_first(manager: 'ocp.CheckpointManager', reload: bool = False) -> list[int]:
  if reload:
    manager.reload()
  return sorted(manager.all_steps(), reverse=True)


MAX_REFRESHES = 20  # read-only restores: how often one re-lists the steps a training run rotates


def restore(manager: 'ocp.CheckpointManager', abstract_state, step: int | None = None,
            partial: bool = False, *, may_set_aside: bool = False):
  """Restores the newest good checkpoint (or exactly `step`) into the structure and
  shardings of `abstract_state` (a pytree of `jax.ShapeDtypeStruct`); returns (step, state).
  With `partial`, `abstract_state` may hold a part of the saved tree (sampling: the EMA
  weights without the optimizer state); only its arrays are read, compared and verified
  against their recorded digests.

  A checkpoint that does not fit `abstract_state` (another tree, shapes or dtypes: another
  config) raises `CheckpointMismatch` and nothing moves. A damaged one (see the module
  docstring) is logged in one line and the next newest is tried; with `may_set_aside` (a
  training launch, which holds the workdir's lock) it is first moved aside, otherwise it is
  left in place, and the steps are listed again: a step that fails while a newer one
  appears or that disappears (a training run rotated it out while it was read) is skipped
  for the newest one present, with an info line instead of a damage warning.
  Raises `CheckpointError` when none (or not `step`) is good, listing what was found."""
  steps = _steps_newest_first(manager)
  if step is not None:
    if step not in steps:
      raise errors.CheckpointError(
          f'no checkpoint of step {step} in {manager.directory}; its checkpoints: '
          f'{", ".join(map(str, sorted(steps))) or "none"} (choose one with --step=N)')
    steps = [step]
  if not steps:
    raise errors.CheckpointError(f'no checkpoint found in {manager.directory}')
  problems, tried, refreshes = [], set(), 0
  while steps:
    candidate = steps.pop(0)
    tried.add(candidate)
    folder = paths.Path(manager.directory) / str(candidate)
    with _abandoned_reads_unreported():
      try:
        state = _read(folder / 'default', abstract_state, partial)
        _verify(manager, candidate, state)
        reason = None
      except _Misfit as misfit:
        raise _mismatch_error(manager, candidate, misfit.args[0]) from None
      except Exception as error:  # any damage: unreadable files or metadata, missing pieces
        reason = _first_line(error)
    if _all_processes_agree(reason is None):
      return candidate, state
    reason = reason or 'another process could not restore it'
    if may_set_aside:
      moved = set_aside(manager, candidate, reason)
      logging.warning('Checkpoint %d is damaged (%s); moved it to %s and trying the previous '
                      'one', candidate, reason, moved)
      problems.append(f'step {candidate}: {reason} (moved to {moved})')
      continue
    present = _steps_newest_first(manager, reload=True)
    newer = [s for s in present if s > candidate and s not in tried]
    if newer or not folder.exists():  # a training run saved a newer step and rotates this out
      logging.info('Checkpoint %d could not be read while a training run replaced it (%s); '
                   'trying the newest one present', candidate, reason)
      problems.append(f'step {candidate}: replaced while it was read ({reason})')
    else:
      logging.warning('Checkpoint %d is damaged (%s); left it in place (a training launch '
                      'sets it aside) and trying the previous one', candidate, reason)
      problems.append(f'step {candidate}: {reason} (left in place)')
    if step is None and refreshes < MAX_REFRESHES:
      refreshes += 1
      steps = [s for s in present if s not in tried]
  raise errors.CheckpointError(f'no usable checkpoint in {manager.directory}:\n  ' +
                               '\n  '.join(problems))


def latest_step(workdir) -> int | None:
  """Newest complete checkpoint step in `workdir`, without opening a manager."""
  import orbax.checkpoint as ocp

  folder = directory(workdir)
  if not folder.is_dir():
    return None
  steps = ocp.utils.checkpoint_steps(folder)
  return max(steps) if steps else None


def abstract(tree, shardings=None):
  """Shape/dtype (and sharding) skeleton of a pytree of arrays."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
