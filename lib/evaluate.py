"""Evaluating a checkpoint: `launch.py --mode=eval`, every evaluation action of a finished
(or paused) run.

    python launch.py --workdir=runs/xl2 --mode=eval        # the saved config, newest checkpoint
    python launch.py --workdir=runs/xl2 --mode=eval --step=100000
    evaluate(experiment, workdir, step=None)                # the same, from Python

Runs `evaluate(run, step)` of each node of `experiment.evaluate` that has one (FID actions
evaluate every guidance scale and sample count of their schedule, not only those due at that
step), with the EMA weights of the checkpoint, and writes the scalars at the checkpoint's step
through the run's writers (log, TensorBoard, `metrics.jsonl`).

Reads only what the actions use from the checkpoint (RESTORED: the trained and EMA weights,
whose held-out losses `ValidationLoss` compares, and the network's fixed arrays), never the
optimizer's moments. Damaged checkpoints are skipped and left in place, as by sampling
(`lib.sample`).
"""

import jax
from absl import logging

from lib import checkpoint as ckpt
from lib import errors, train

RESTORED = ('step', 'params', 'ema', 'buffers')  # the entries of the training state read


def evaluate(experiment, workdir: str, step: int | None = None) -> dict[str, float]:
  """Evaluates checkpoint `step` (default: the newest) of `workdir`; returns the scalars."""
  actions = [hook for hook in experiment.evaluate if hasattr(hook, 'evaluate')]
  if not actions:
    raise errors.UserError('the experiment has no evaluation actions (`evaluate` is empty); '
                           'add e.g. fdl.Config(lib.eval.actions.FIDEvaluation, ...) to it')
  if ckpt.latest_step(workdir) is None:
    raise errors.CheckpointError(f'no checkpoint in {ckpt.directory(workdir)}; train first '
                                 '(--mode=train) or point --workdir at a trained run')
  run = train.Run(experiment, workdir)
  manager = experiment.checkpoint.manager(workdir, create=False)
  try:
    for hook in actions:  # missing weights / statistics fail before anything is restored
      prepare = getattr(hook, 'prepare', None)
      if prepare is not None:
        prepare(run)
    run.load_encoder()
    step = run.restore(manager, step, parts=RESTORED, may_set_aside=False)  # no lock held
  finally:
    manager.close()
  run.writer = experiment.writers.create(workdir, jax.process_index() == 0)
  scalars = {}
  try:
    for hook in actions:
      logging.info('Evaluating %s on the checkpoint of step %d', type(hook).__name__, step)
      scalars.update(hook.evaluate(run, step) or {})
  finally:
    run.writer.flush()
    run.writer.close()
  for name, value in sorted(scalars.items()):
    logging.info('step %d: %s = %.4f', step, name, value)
  return scalars

