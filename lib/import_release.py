"""The import run mode: a workdir made from released weights.

    python launch.py --mode=import --checkpoint=SiT-XL-2-256x256.pt \
        --fdl_config=experiments/dit.py:xl2 --workdir=runs/sit
    python launch.py --workdir=runs/sit --mode=sample

It first sets the release's conventions in the config (`lib.weights.releases`: for this file
SiT's time, t = 1 at the data, its 0.18215 latent scaling and its learned-sigma head), then
writes an orbax checkpoint (the imported weights as both `params` and `ema`, a fresh optimizer
state, step 0 or `--step`) and `config.json` / `config.txt` / `effective.json` into the
workdir, which `launch.py --mode=sample` (or `--mode=train`, to fine-tune) then uses like any
run. `Experiment.init_from` instead starts a new run from a released file (`lib/train.py`;
`launch.py` sets the same conventions).
"""

import json
import os

import fiddle as fdl
import jax
import numpy as np
from flax import nnx

from lib import checkpoint as ckpt
from lib import errors, paths
from lib.config import presets, saved
from lib.train import Run
from lib.weights import registry, releases


def write_checkpoint(experiment, weights: nnx.State, workdir, step: int = 0):
  """An orbax checkpoint of step `step` in `workdir` that `lib.train` restores: params and EMA
  from the imported `weights` (and their fixed arrays), a freshly initialised optimizer state.
  Returns the checkpoint folder."""
  run = Run(experiment, workdir)
  state = run.imported_state(weights)
  state['step'] = jax.device_put(np.int32(step), run.replicated)
  manager = experiment.checkpoint.manager(workdir)
  try:
    if manager.latest_step() is not None:
      raise errors.UserError(f'{manager.directory} already holds checkpoints (step '
                             f'{manager.latest_step()}); import into an empty --workdir')
    ckpt.save(manager, step, state, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  return manager.directory / str(step)


def import_release(checkpoint: str, config: fdl.Buildable, workdir: str,
                   step: int = 0) -> tuple[str, list[str]]:
  """Makes `workdir` a run of the released weights `checkpoint`: sets the release's conventions
  in `config` (`lib.weights.releases.apply`, provenance `--checkpoint=FILE`), builds it, and
  writes the imported weights as the checkpoint of `step`, `config.json` / `config.txt` and
  `imported_from.json` (file, step, release, settings changed). Returns the checkpoint folder
  and one line per setting changed ('willisma/SiT: interface.network_time = ...').

  Raises:
    errors.UserError (ConfigError, WeightsMismatch, ...): nothing was written.
  """
  release, changed = releases.apply(config, checkpoint, f'--checkpoint={checkpoint}')
  experiment = presets.build(config)
  experiment.check_shapes()
  if experiment.init_from:
    raise errors.UsageError(f'init_from={experiment.init_from!r} is set; the imported --checkpoint '
                         'already gives the weights: drop the init_from override')
  params = registry.import_file(checkpoint, experiment)
  folder = write_checkpoint(experiment, params, workdir, step)
  saved.write_config(config, workdir)
  paths.write_atomic(paths.resolve(workdir, '--workdir') / 'imported_from.json', json.dumps({
      'checkpoint': os.fspath(paths.resolve(checkpoint, '--checkpoint')), 'step': step,
      'release': release.name, 'settings': changed}, indent=1))
  return folder, [f'{release.name or checkpoint}: {line}' for line in changed]


def run(checkpoint: str | None, config: fdl.Buildable, workdir, step: int | None) -> None:
  """`launch.py --mode=import`: `import_release`, then what was done and how to sample it.
  A file that cannot be read or imported is a `UserError` (launch.py's `error:` line)."""
  if not checkpoint:
    raise errors.UsageError('--mode=import needs --checkpoint=FILE, the released weights '
                         '(.pt/.pth/.bin/.ckpt/.safetensors/.npz)')
  try:
    folder, changed = import_release(checkpoint, config, workdir, step or 0)
  except errors.UserError:
    raise
  except (ValueError, FileNotFoundError) as e:
    raise errors.UserError(str(e)) from e
  for line in changed:
    print(f'release conventions of {line}')
  print(f'wrote {folder} and {paths.resolve(workdir, "--workdir") / "config.json"}; sample '
        f'with: python launch.py --workdir={workdir} --mode=sample')
