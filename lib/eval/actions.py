"""Evaluation actions of a run: FID / IS of EMA samples, and the digits demo's quality metric.

Like `lib.hooks.SampleGrid`, each is a configured object whose `action(run)` returns a CLU
periodic action bound to the running `lib.train.Run`, and whose `evaluate(run, step)` computes,
writes to `run.writer` and returns its scalars now (what `lib.evaluate.evaluate` calls
on a finished checkpoint). Files (network weights, reference statistics) are checked and
loaded in `action(run)`, at the start of training, never when a config is built.

Sampling protocol (both actions): samples come from the EMA weights through `run.generate`
with fixed noise (`seed`), so successive evaluations are comparable. Labels are
class-balanced by default: label k of n is k mod num_classes, so n = 50,000 gives exactly 50
images per ImageNet class (the "equal labels" protocol of RAE / Internal Guidance, about 0.1
FID lower than uniformly random labels at ~1-2 FID); `labels='uniform'` draws them uniformly at
random from `seed` instead (diffuse_nnx's and ADM's protocol). A smaller size evaluated at
the same step is the prefix of the larger one (FID-10K is the first 10,000 of the 50,000), so
it stays balanced whenever it is a multiple of the number of classes.
"""

import math
from typing import Literal

import numpy as np
from absl import logging

from lib import errors, hooks, paths
from lib.eval import fid as fid_lib


def eval_labels(num_samples: int, num_classes: int, kind: str = 'balanced',
                seed: int = 0) -> np.ndarray:
  """(num_samples,) int32 labels: k mod num_classes ('balanced') or uniform from `seed`."""
  if kind == 'balanced':
    return (np.arange(num_samples) % num_classes).astype(np.int32)
  if kind == 'uniform':
    return np.random.default_rng([seed, 0x1abe1]).integers(0, num_classes, num_samples,
                                                           dtype=np.int32)
  raise ValueError(f'labels={kind!r}; expected balanced or uniform')


def _size_name(n: int) -> str:
  return f'{n / 1000:g}K'


class FIDEvaluation:
  """FID (and Inception Score) of EMA samples against reference statistics, periodically.

  The three schedule tuples align (as diffuse_nnx's `eval` config): guidance scale
  `all_guidance_scales[i]` is evaluated on `all_eval_samples_nums[i][j]` samples every
  `eval_every_steps[i][j]` steps. The defaults (diffuse_nnx's) give FID-10K at cfg 1.0 every 25k
  steps, FID-50K at cfg 1.0 and 1.5 every 100k. Scalars: `FID-10K (cfg=1.0)`,
  `IS-10K (cfg=1.0)` (diffuse_nnx's names).

  Args:
    inception_weights: local pytorch-fid `pt_inception-2015-12-05-6726825d.pth`.
    reference_stats: reference statistics (ADM `.npz` with mu / sigma, an EDM2 `.pkl`, or the
      output of `python -m lib.eval.fid --stats_from=...`).
    all_guidance_scales, all_eval_samples_nums, eval_every_steps: the schedule (see above).
    labels: 'balanced' (default) or 'uniform' (see the module docstring).
    samples_per_call: labels per `run.generate` call (host memory holds one call's images).
    generate_batch_size: batch size inside `run.generate`.
    inception_batch_size: images per Inception call (spread over the devices).
    inception_score: also report the Inception Score.
    fid_method: 'sqrtm' (scipy's matrix square root, as pytorch-fid / ADM) or 'eigh' (the same
      trace from symmetric eigendecompositions, several times faster; see
      `lib.eval.fid.frechet_distance`).
    seed: seed of the noise (and of uniform labels).
    on_load: also evaluate the whole schedule on the loaded weights before training continues
      (diffuse_nnx's `eval.on_load`; `lib.hooks.evaluate_on_load`).
  """

  def __init__(self, inception_weights: str | None = None, reference_stats: str | None = None,
               all_guidance_scales: tuple[float, ...] = (1.0, 1.5),
               all_eval_samples_nums: tuple[tuple[int, ...], ...] = ((10_000, 50_000), (50_000,)),
               eval_every_steps: tuple[tuple[int, ...], ...] = ((25_000, 100_000), (100_000,)),
               labels: Literal['balanced', 'uniform'] = 'balanced',
               samples_per_call: int = 1000, generate_batch_size: int = 256,
               inception_batch_size: int = 200, inception_score: bool = True,
               fid_method: Literal['sqrtm', 'eigh'] = 'sqrtm', seed: int = 42,
               on_load: bool = False):
    self.inception_weights = inception_weights
    self.reference_stats = reference_stats
    self.all_guidance_scales = tuple(all_guidance_scales)
    self.all_eval_samples_nums = tuple(tuple(n) for n in all_eval_samples_nums)
    self.eval_every_steps = tuple(tuple(e) for e in eval_every_steps)
    self.labels = labels
    self.samples_per_call = samples_per_call
    self.generate_batch_size = generate_batch_size
    self.inception_batch_size = inception_batch_size
    self.inception_score = inception_score
    self.fid_method = fid_method
    self.seed = seed
    self.on_load = on_load
    if not len(self.all_guidance_scales) == len(self.all_eval_samples_nums) == \
        len(self.eval_every_steps):
      raise ValueError(
          f'all_guidance_scales ({len(self.all_guidance_scales)}), all_eval_samples_nums '
          f'({len(self.all_eval_samples_nums)}) and eval_every_steps '
          f'({len(self.eval_every_steps)}) must have one entry per guidance scale')
    for i, (nums, every) in enumerate(zip(self.all_eval_samples_nums, self.eval_every_steps)):
      if len(nums) != len(every):
        raise ValueError(f'all_eval_samples_nums[{i}]={nums} and eval_every_steps[{i}]={every} '
                         'must align (one interval per sample count)')
      if any(n < 2 for n in nums) or any(e < 1 for e in every):
        raise ValueError(f'sample counts must be >= 2 and intervals >= 1, got {nums} / {every}')
    if labels not in ('balanced', 'uniform'):
      raise ValueError(f'labels={labels!r}; expected balanced or uniform')

  # --------------------------------------------------------------------------- schedule
  @property
  def every_steps(self) -> int:
    """The CLU action's period: the gcd of all intervals (due sizes are picked per step)."""
    return math.gcd(*[e for every in self.eval_every_steps for e in every])

  def due(self, step: int) -> list[tuple[float, tuple[int, ...]]]:
    """[(guidance scale, sample counts due at `step`), ...]."""
    out = []
    for scale, nums, every in zip(self.all_guidance_scales, self.all_eval_samples_nums,
                                  self.eval_every_steps):
      sizes = tuple(n for n, e in zip(nums, every) if step % e == 0)
      if sizes:
        out.append((scale, sizes))
    return out

  def everything(self) -> list[tuple[float, tuple[int, ...]]]:
    return [(scale, tuple(nums)) for scale, nums in
            zip(self.all_guidance_scales, self.all_eval_samples_nums)]

  # --------------------------------------------------------------------------- computing
  def check(self, experiment=None) -> None:
    """Raises UserError if the Inception weights or the reference statistics are missing
    (before a run touches its workdir)."""
    from lib.eval import inception

    without = ' (or train without FID: --fdl_set=evaluate=[])'
    try:
      inception.check_weights(self.inception_weights,
                              'evaluate: FIDEvaluation.inception_weights')
    except (FileNotFoundError, ValueError) as e:
      raise errors.UserError(f'{e}{without}') from None
    if not self.reference_stats:
      raise errors.UserError(
          'evaluate: FIDEvaluation.reference_stats is not set; give an ADM reference batch '
          '(.npz with mu / sigma) or the output of `python -m lib.eval.fid '
          f'--stats_from=DATA_DIR --out=FILE.npz`{without}')
    if not paths.is_file(self.reference_stats, 'evaluate: FIDEvaluation.reference_stats'):
      raise errors.UserError(f'evaluate: FIDEvaluation.reference_stats='
                             f'{self.reference_stats!r} is not a file{without}')

  def prepare(self, run) -> None:
    """Checks and loads the Inception weights and the reference statistics (once)."""
    if getattr(self, '_detector', None) is not None:
      return
    from lib.eval import inception

    self.check()
    self._reference = fid_lib.load_reference(self.reference_stats)
    if len(self._reference[0]) != inception.FEATURES:
      raise ValueError(f'{self.reference_stats}: statistics of {len(self._reference[0])}-d '
                       f'features, expected the {inception.FEATURES}-d Inception pool3')
    sharding = getattr(run, 'batch_sharding', None)
    self._detector = inception.Detector(self.inception_weights, self.inception_batch_size,
                                        sharding)

  def scores(self, run, scale: float, sizes: tuple[int, ...]) -> dict[str, float]:
    """FID (and IS) at guidance `scale` for each of `sizes` (prefixes of one sample set)."""
    self.prepare(run)
    sizes = sorted(set(sizes))
    labels = eval_labels(sizes[-1], run.num_classes, self.labels, self.seed)
    stats, score = fid_lib.FeatureStats(), fid_lib.InceptionScore()
    out = {}
    pending = list(sizes)
    for call, start in enumerate(range(0, sizes[-1], self.samples_per_call)):
      chunk = labels[start:start + self.samples_per_call]
      images = run.generate(chunk, scale, seed=(self.seed * 1_000_003 + call) % 2**31,
                            batch_size=self.generate_batch_size)
      pool, logits = self._detector(images)
      offset = 0
      while offset < len(pool):  # stop exactly at each requested size
        take = min(len(pool) - offset, pending[0] - stats.count)
        stats.add(pool[offset:offset + take])
        score.add(logits[offset:offset + take])
        offset += take
        if stats.count == pending[0]:
          n = pending.pop(0)
          out[f'FID-{_size_name(n)} (cfg={float(scale)})'] = fid_lib.frechet_distance(
              *stats.moments(), *self._reference, method=self.fid_method)
          if self.inception_score:
            out[f'IS-{_size_name(n)} (cfg={float(scale)})'] = score.value()
    return out

  def evaluate(self, run, step: int, pairs=None) -> dict[str, float]:
    """Evaluates `pairs` [(scale, sizes)] (default: everything in the schedule), writes the
    scalars at `step` and returns them."""
    scalars = {}
    for scale, sizes in (self.everything() if pairs is None else pairs):
      logging.info('FID: sampling %d images at guidance %g (step %d)', max(sizes), scale, step)
      scalars.update(self.scores(run, scale, sizes))
    if scalars:
      run.writer.write_scalars(step, scalars)
    return scalars

  def action(self, run):
    self.prepare(run)  # a missing file fails at the start of training
    if self.on_load:  # the whole schedule, as diffuse_nnx's eval.on_load
      hooks.evaluate_on_load(run, lambda step: self.evaluate(run, step))
    return hooks.every(self.every_steps,
                           lambda step: self.evaluate(run, step, self.due(step)))


class DigitsQuality:
  """Sample quality of the digits demo, judged by a small CNN trained on real digits
  (`lib.eval.digits_classifier`, weights committed in the repository).

  Reports, per guidance scale, `eval/digits_fd (cfg=g)`: the Frechet distance between the
  classifier's penultimate (64-d) features of `num_samples` EMA samples and of the held-out
  real digits (`data.eval_batches`), and `eval/digits_accuracy (cfg=g)`: the fraction of
  samples that the classifier assigns to the class they were generated for. Held-out real
  digits score an accuracy of 0.97 (the classifier's held-out accuracy) and a distance of 0
  against themselves; 300 training digits score 1.0 and a distance of 30-45 (the trace of
  the reference covariance is ~570); uniform noise scores 0.11 and ~380.

  Args:
    every_steps: how often.
    num_samples: samples per guidance scale, labels class-balanced.
    guidance_scales: classifier-free guidance weights to evaluate.
    seed: seed of the noise.
    weights: classifier weights (.npz; None: the committed `digits_classifier.npz`).
    on_load: also evaluate the loaded weights before training continues
      (`lib.hooks.evaluate_on_load`).
  """

  def __init__(self, every_steps: int = 500, num_samples: int = 512,
               guidance_scales: tuple[float, ...] = (1.0,), seed: int = 123,
               weights: str | None = None, on_load: bool = False):
    errors.check_positive(every_steps=every_steps, num_samples=num_samples)
    self.every_steps = every_steps
    self.num_samples = num_samples
    self.guidance_scales = tuple(guidance_scales)
    self.seed = seed
    self.weights = weights
    self.on_load = on_load

  def check(self, experiment) -> None:
    """Raises UserError unless the data are 10-class greyscale digits."""
    data = experiment.data
    if data.num_classes != 10 or data.channels != 1:
      raise errors.UserError(
          f'evaluate: DigitsQuality evaluates 10-class greyscale digits; the data has '
          f'{data.num_classes} classes and {data.channels} channels (remove it from evaluate)')

  def prepare(self, run) -> None:
    """Loads the classifier and the held-out statistics of the run's data (once)."""
    if getattr(self, '_classify', None) is not None:
      return
    import jax
    from flax import nnx
    from lib.eval import digits_classifier

    self.check(run.experiment)
    data = run.experiment.data
    graphdef, state = nnx.split(digits_classifier.load(self.weights))
    apply = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    self._classify = lambda images: tuple(np.asarray(a) for a in apply(state, images))
    stats = fid_lib.FeatureStats()
    for batch in data.eval_batches(256):
      stats.add(self._classify(batch['image'])[0])
    self._reference = stats.moments()

  def scores(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(Frechet distance to the held-out digits, accuracy w.r.t. `labels`) of uint8 images."""
    features, logits = self._classify(images)
    stats = fid_lib.FeatureStats()
    stats.add(features)
    distance = fid_lib.frechet_distance(*stats.moments(), *self._reference)
    return distance, float(np.mean(np.argmax(logits, -1) == labels))

  def evaluate(self, run, step: int) -> dict[str, float]:
    self.prepare(run)
    labels = eval_labels(self.num_samples, run.num_classes)
    scalars = {}
    for scale in self.guidance_scales:
      images = run.generate(labels, scale, seed=self.seed)
      distance, accuracy = self.scores(images, labels)
      scalars[f'eval/digits_fd (cfg={float(scale)})'] = distance
      scalars[f'eval/digits_accuracy (cfg={float(scale)})'] = accuracy
    run.writer.write_scalars(step, scalars)
    return scalars

  def action(self, run):
    self.prepare(run)
    if self.on_load:
      hooks.evaluate_on_load(run, lambda step: self.evaluate(run, step))
    return hooks.every(self.every_steps, lambda step: self.evaluate(run, step))
