"""Metric writers and periodic actions of a run, configured in the experiment graph.

Each hook is a small configured object whose `action(run)` returns a CLU periodic
action bound to the running trainer (`run` is a `lib.train.Run`). CLU is imported
only there, at training time: it pulls in TensorFlow, which the config path must not.
"""

import io
import json
import math

import numpy as np

from lib import errors, paths


class Writers:
  """CLU metric writers: log lines, TensorBoard event files, `metrics.jsonl`, and optionally
  a Weights & Biases run (`lib.tracking`).

  Only process 0 writes; other processes get a logging-only writer at WARNING level.

  Args:
    wandb: also log to Weights & Biases (project `wandb_project`, entity `wandb_entity`,
      run name `wandb_name`, default the workdir's name); `WANDB_MODE=offline` logs locally.
  """

  def __init__(self, tensorboard: bool = True, jsonl: bool = True, asynchronous: bool = True,
               wandb: bool = False, wandb_project: str = 'fiddlediff',
               wandb_entity: str | None = None, wandb_name: str | None = None):
    self.tensorboard = tensorboard
    self.jsonl = jsonl
    self.asynchronous = asynchronous
    self.wandb = wandb
    self.wandb_project = wandb_project
    self.wandb_entity = wandb_entity
    self.wandb_name = wandb_name

  def check(self, experiment) -> None:
    """Raises UserError, before the workdir is touched, if the tracker cannot log in."""
    if self.wandb:
      from lib import tracking
      tracking.check_credentials()

  def create(self, workdir, is_main: bool, start_step: int | None = None):
    """The writers of process 0 (`is_main`) into `workdir`. A training run starting at
    `start_step` first drops the rows `metrics.jsonl` holds of later steps (those a killed
    run logged past the checkpoint it resumes from, which it logs again); evaluation, which
    adds rows at a checkpoint's step, passes None."""
    from lib import tf_devices
    tf_devices.hide_accelerators()
    from clu import metric_writers

    if not is_main:
      return metric_writers.MultiWriter([])
    folder = paths.resolve(workdir, '--workdir')
    writers = [metric_writers.LoggingWriter()]
    if self.tensorboard:  # TensorFlow's own file system: a local path or a gs:// URL
      writers.append(metric_writers.SummaryWriter(str(folder)))
    if self.jsonl:
      if start_step is not None:
        drop_rows_after(folder / 'metrics.jsonl', start_step)
      writers.append(_jsonl_writer(folder / 'metrics.jsonl'))
    if self.wandb:
      from lib import tracking
      writers.append(tracking.writer(folder, self.wandb_project, self.wandb_entity,
                                     self.wandb_name))
    writer = metric_writers.MultiWriter(writers)
    return metric_writers.AsyncWriter(writer) if self.asynchronous else writer


def jsonl_row(record: dict) -> str:
  """One line of `metrics.jsonl`: strict JSON (RFC 8259), a non-finite value written as null
  (`{"step": 7, "train/loss": null}`), never `NaN` or `Infinity`."""
  clean = {key: None if isinstance(value, float) and not math.isfinite(value) else value
           for key, value in record.items()}
  return json.dumps(clean, allow_nan=False) + '\n'


def drop_rows_after(path: paths.Path, step: int) -> None:
  """Rewrites `path` (a `metrics.jsonl`, local or in a bucket) atomically without its rows of
  steps after `step`, and without lines that are not a row (the last one cut by a kill); the
  rows kept are written as `jsonl_row` writes them. Unchanged if there is nothing to drop."""
  if not path.exists():
    return
  text = path.read_text()
  kept = []
  for line in text.splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get('step'), int) \
        and record['step'] <= step:
      kept.append(jsonl_row(record))
  if ''.join(kept) != text:
    paths.write_atomic(path, ''.join(kept))


def _jsonl_writer(path: paths.Path):
  """A CLU MetricWriter appending one row (`jsonl_row`) per step of scalars."""
  from clu.metric_writers import interface

  class JsonlWriter(interface.MetricWriter):

    def __init__(self):
      self._file = paths.AppendLog(path)  # locally line-buffered: `tail -f`-able

    def write_scalars(self, step, scalars):
      record = {'step': int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
      self._file.write(jsonl_row(record))

    def _ignore(self, *args, **kwargs):
      """Only scalars go to metrics.jsonl; the other writers take the rest."""

    write_summaries = write_images = write_videos = write_audios = _ignore
    write_texts = write_histograms = write_hparams = _ignore

    def flush(self):
      self._file.flush()

    def close(self):
      self._file.close()

  return JsonlWriter()


class ReportProgress:
  """CLU ReportProgress: steps/s, ETA and uptime, every `every_steps` or `every_secs`."""

  def __init__(self, every_steps: int | None = 100, every_secs: float | None = 60.0):
    errors.check_positive(every_steps=every_steps)
    self.every_steps = every_steps
    self.every_secs = every_secs

  def action(self, run):
    from clu import periodic_actions

    return periodic_actions.ReportProgress(
        num_train_steps=run.total_steps, writer=run.writer, every_steps=self.every_steps,
        every_secs=self.every_secs)


class Profile:
  """CLU Profile: a JAX trace (TensorBoard's profile tab; files under
  `<workdir>/plugins/profile/`) of at least `num_profile_steps` steps and `profile_duration_ms`,
  starting `first_profile` steps after the run starts or resumes, then again every
  `every_steps` steps or `every_secs` seconds (None: not again). The defaults are diffuse_nnx's
  (CLU's: 5 steps from step 10, at least 3 s, again every hour); `profile=None` traces nothing.
  A trace that cannot be written is a warning in the log, never a failed run.
  """

  def __init__(self, num_profile_steps: int = 5, first_profile: int = 10,
               every_steps: int | None = None, every_secs: float | None = 3600.0,
               profile_duration_ms: int | None = 3000):
    errors.check_positive(num_profile_steps=num_profile_steps, every_steps=every_steps)
    self.num_profile_steps = num_profile_steps
    self.first_profile = first_profile
    self.every_steps = every_steps
    self.every_secs = every_secs
    self.profile_duration_ms = profile_duration_ms

  def action(self, run):
    from absl import logging
    from clu import periodic_actions, profiler

    class Profile(periodic_actions.Profile):
      def __call__(self, step, t=None):
        try:
          return super().__call__(step, t)
        except Exception as error:  # the trace could not be written
          self._failed(error)

      def close(self):
        """Ends (and writes) a trace still recording when the run stops: CLU ends a trace
        only at a later step, and a trace left running records everything the process
        does afterwards."""
        if self._session_running:
          try:
            self._end_session(profiler.stop())
          except Exception as error:
            self._failed(error)

      def _failed(self, error: Exception) -> None:
        """A trace that cannot be written is a warning: the run goes on (or ends) as it would."""
        self._session_running, self._session_started = False, None
        logging.warning('The profiler could not write its trace to %s/plugins/profile (%s: %s); '
                        'training is not affected', self._logdir, type(error).__name__,
                        str(error).strip().splitlines()[0][:300] if str(error).strip() else '')

    return Profile(
        logdir=str(run.workdir), num_profile_steps=self.num_profile_steps,
        first_profile=int(run.state['step']) + self.first_profile,
        every_steps=self.every_steps, every_secs=self.every_secs,
        profile_duration_ms=self.profile_duration_ms)


def every(every_steps: int, fn):
  """A CLU periodic action calling fn(step) every `every_steps` steps."""
  from clu import periodic_actions

  return periodic_actions.PeriodicCallback(
      every_steps=every_steps, callback_fn=lambda step, t: fn(step), pass_step_and_time=True)


def image_grid(images: np.ndarray) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*H, cols*W, 3) uint8 grid, rows = ceil(N / cols)."""
  n, h, w, c = images.shape
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  if c == 1:
    images = np.repeat(images, 3, axis=-1)
  grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), np.uint8)
  for i, image in enumerate(images):
    r, q = divmod(i, cols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = image
  return grid


def save_png(path: paths.Path, grid: np.ndarray, min_side: int = 256) -> None:
  """Writes a uint8 image, upscaled (nearest) so that small images stay visible."""
  from PIL import Image

  scale = max(1, int(np.ceil(min_side / max(grid.shape[:2]))))
  png = io.BytesIO()
  Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                               Image.NEAREST).save(png, format='PNG')
  paths.write_atomic(paths.Path(path), png.getvalue())


class SampleGrid:
  """Sample grids to `<workdir>/samples/*.png` and TensorBoard: of the EMA weights at each of
  `guidance_scales` (`step_<step>_cfg<g>.png`, `samples/cfg<g>`) and of the trained (raw,
  not averaged) weights at each of `trained_guidance_scales` (`step_<step>_trained_cfg<g>.png`,
  `samples/trained_cfg<g>`), every `every_steps` steps and at the last step. The defaults
  draw what diffuse_nnx draws: both weights at cfg 1, the EMA also at its guidance scale, and
  one set of grids when a run starts or resumes.

  Labels cycle through the classes (row-major), the noise is fixed by `seed`, so grids
  of successive steps are comparable.

  Args:
    every_steps: how often (also drawn at the last step).
    num_samples: images per grid.
    guidance_scales: one grid of the EMA weights per classifier-free guidance weight.
    trained_guidance_scales: one grid of the trained weights per guidance weight (() for none).
    at_start: also draw before the first step of a run or of its resumption (at that step:
      step 0 shows the initial weights).
    seed: seed of the noise.
    reconstructions: also draw, at the first step of the run (or of its resumption), held-out
      images above their encoder round trip decode(encode(x)) (diffuse_nnx's
      `visualize_reconstruction`; pixel data only).
  """

  def __init__(self, every_steps: int = 25_000, num_samples: int = 64,
               guidance_scales: tuple[float, ...] = (1.0, 2.0),
               trained_guidance_scales: tuple[float, ...] = (1.0,), at_start: bool = True,
               seed: int = 42, reconstructions: bool = False):
    errors.check_positive(every_steps=every_steps, num_samples=num_samples)
    self.every_steps = every_steps
    self.num_samples = num_samples
    self.guidance_scales = tuple(guidance_scales)
    self.trained_guidance_scales = tuple(trained_guidance_scales)
    self.at_start = at_start
    self.seed = seed
    self.reconstructions = reconstructions

  def draw(self, run, step: int) -> None:
    labels = np.arange(self.num_samples) % run.num_classes
    images = {}
    for prefix, params, scales in (('', run.ema_params(), self.guidance_scales),
                                   ('trained_', run.state['params'],
                                    self.trained_guidance_scales)):
      for scale in scales:
        samples = run.generate(labels, scale, seed=self.seed, params=params)
        if run.is_main:
          grid = image_grid(samples)
          (run.workdir / 'samples').mkdir(parents=True, exist_ok=True)
          save_png(run.workdir / 'samples' / f'step_{step:08d}_{prefix}cfg{scale:g}.png', grid)
          images[f'samples/{prefix}cfg{scale:g}'] = grid[None]
    run.writer.write_images(step, images)

  def draw_reconstructions(self, run, step: int) -> None:
    originals = next(iter(run.experiment.data.eval_batches(self.num_samples)))['image']
    rebuilt = run.reconstruct(originals)
    if run.is_main:
      grid = image_grid(np.concatenate([originals, rebuilt]))
      (run.workdir / 'samples').mkdir(parents=True, exist_ok=True)
      save_png(run.workdir / 'samples' / f'step_{step:08d}_reconstructions.png', grid)
      run.writer.write_images(step, {'samples/reconstructions': grid[None]})

  def check(self, experiment) -> None:
    """Raises UserError if the data cannot be shown as asked."""
    if self.reconstructions and experiment.data.kind != 'pixels':
      raise errors.UserError('visualize.reconstructions needs pixel data to show originals; '
                             f'data.kind={experiment.data.kind!r}')

  def action(self, run):
    """The periodic grids; with `at_start`, draws the first ones now, before training
    continues."""
    self.check(run.experiment)
    start = int(run.state['step'])
    if self.at_start:
      self.draw(run, start)
    grids = every(self.every_steps, lambda step: self.draw(run, step))
    if not self.reconstructions:
      return grids
    from clu import periodic_actions

    first = periodic_actions.PeriodicCallback(
        on_steps=[start + 1], callback_fn=lambda step, t: (
            self.draw_reconstructions(run, step)), pass_step_and_time=True)
    return lambda step: (first(step), grids(step))


def evaluate_on_load(run, evaluate) -> None:
  """diffuse_nnx's `eval.on_load`: `evaluate(step)` on the weights the run starts from, before
  training continues, when they were loaded (a checkpoint, or `init_from`); a fresh random
  initialisation is not evaluated."""
  from absl import logging

  step = int(run.state['step'])
  if step > 0 or run.experiment.init_from:
    logging.info('Evaluating the loaded weights (step %d) before training continues', step)
    evaluate(step)


class ValidationLoss:
  """The training loss of the EMA and the trained weights on held-out data, with
  fixed times and noise (`seed`), so successive values are comparable.

  Args:
    on_load: also evaluate the loaded weights before training continues (`evaluate_on_load`).
  """

  def __init__(self, every_steps: int = 1000, batch_size: int = 256, seed: int = 7,
               on_load: bool = False):
    errors.check_positive(every_steps=every_steps, batch_size=batch_size)
    self.every_steps = every_steps
    self.batch_size = batch_size
    self.seed = seed
    self.on_load = on_load

  def evaluate(self, run, step: int) -> dict[str, float]:
    scalars = run.validation_loss(self.batch_size, self.seed)
    run.writer.write_scalars(step, scalars)
    return scalars

  def action(self, run):
    if self.on_load:
      evaluate_on_load(run, lambda step: self.evaluate(run, step))
    return every(self.every_steps, lambda step: self.evaluate(run, step))
