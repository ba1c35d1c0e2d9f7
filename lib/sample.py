"""Sampling a checkpoint: `launch.py --mode=sample`.

    python launch.py --workdir=runs/digits --mode=sample --num_samples=64 [--step=N]
    sample(experiment, workdir, 64, labels=[3], guidance_scale=4.0)   # the same, from Python

Reads only what generating needs from the checkpoint (RESTORED: the EMA weights and the
network's fixed arrays), never the trained weights or the optimizer's moments: for Adam that is
about a quarter of a training state (weights, EMA, two moments). A damaged checkpoint is
skipped for the previous one and left in place (only training moves it aside); one saved by
another config is an error naming the difference (`lib.checkpoint.restore`).
"""

import io

import numpy as np
from absl import logging

from lib import checkpoint as ckpt
from lib import errors, hooks, paths, train
from lib.experiment import Experiment

RESTORED = ('step', 'ema', 'buffers')  # the entries of the training state sampling reads


def sample(experiment: Experiment, workdir, num_samples: int,
           labels: list[int] | None = None, guidance_scale: float | None = None,
           seed: int = 0, step: int | None = None) -> str:
  """Samples the EMA weights of checkpoint `step` (default: the newest good one) in `workdir`
  into `samples.npz` (`images` uint8 NHWC, `labels` int32) and `samples.png`. Returns the npz
  path."""
  num_classes = experiment.data.num_classes
  if labels:
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
      raise errors.UserError(f'--labels {bad} outside the {num_classes} classes 0..'
                             f'{num_classes - 1}')
  if ckpt.latest_step(workdir) is None:
    raise errors.CheckpointError(f'no checkpoint in {ckpt.directory(workdir)}; train first '
                                 f'(--mode=train) or point --workdir at a trained run')
  run = train.Run(experiment, workdir)
  manager = experiment.checkpoint.manager(workdir, create=False)
  run.load_encoder()
  try:
    step = run.restore(manager, step, parts=RESTORED, may_set_aside=False)  # no lock held
  finally:
    manager.close()
  if labels:
    label_array = np.resize(np.asarray(labels, np.int32), num_samples)
  else:
    label_array = np.arange(num_samples, dtype=np.int32) % run.num_classes
  scale = experiment.sampler.guidance_scale if guidance_scale is None else guidance_scale
  images = run.generate(label_array, scale, seed=seed)
  path = run.workdir / 'samples.npz'
  archive = io.BytesIO()
  np.savez(archive, images=images, labels=label_array)
  paths.write_atomic(path, archive.getvalue())
  hooks.save_png(run.workdir / 'samples.png', hooks.image_grid(images))
  logging.info('Wrote %d samples of step %d (guidance %g) to %s', num_samples, step, scale, path)
  return str(path)
