"""Train-step throughput and peak memory of a preset on the current backend.

    python benchmarks/train_step.py --fdl_config=experiments/dit.py:s2 --batch_size=8 --steps=10
    python benchmarks/train_step.py --fdl_config=experiments/dit.py:xl2 \
        --fdl_set=network.dtype=bfloat16 --batch_size=256 --steps=50

Times the real jitted step of `lib.train.Run` (encoder -> loss -> gradients -> optimizer ->
EMA) on one fixed batch, after compiling it (reported separately as `compile_s`) and `--warmup`
untimed steps. Each timed step is waited for (`block_until_ready`), so `step_ms` is the wall
time of one step including dispatch. Prints one JSON object.

Batches are synthetic by default, shaped like the data source's: posterior moments
(B, h, w, 2 * latent_channels) float32 `[mean, std]` for pre-extracted latents (so neither
ImageNet nor the VAE weights are needed: `StabilityVAE.encode` of moments reads no weights), or
uint8 pixels (B, H, W, C). `--real_data` takes the first batch of the configured data source.

Peak memory: on GPU/TPU the largest `peak_bytes_in_use` of the local devices' allocators; on
CPU the process's maximum resident set size (`resource.getrusage`), which also counts the
Python/JAX runtime and the compiler, not only the step's buffers.

`compile_step` (the experiment's `Run`, a fresh state, one batch, the compiled step) is shared
with `torch_vs_jax.py` and `profile_step.py`; importing this module defines no flags.
"""

import dataclasses
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # noqa: E402
import fiddle as fdl  # noqa: E402


def synthetic_batch(experiment, batch_size: int, seed: int = 0) -> dict:
  """A random batch shaped like the data source's (see the module docstring)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  data = experiment.data
  labels = rng.integers(0, data.num_classes, size=batch_size).astype(np.int32)
  if getattr(data, 'kind', 'pixels') == 'posterior':
    side, _, channels = experiment.latent_shape
    mean = rng.normal(size=(batch_size, side, side, channels)) * 5.0
    std = np.exp(rng.normal(size=mean.shape) * 0.1 - 2.0)
    image = np.concatenate([mean, std], axis=-1).astype(np.float32)
  else:
    image = rng.integers(0, 256, size=(batch_size, data.image_size, data.image_size,
                                       data.channels)).astype(np.uint8)
  return {'image': image, 'label': labels}


def peak_memory() -> dict:
  import jax

  stats = [device.memory_stats() or {} for device in jax.local_devices()]
  peaks = [s['peak_bytes_in_use'] for s in stats if 'peak_bytes_in_use' in s]
  if peaks:
    return {'bytes': max(peaks), 'gib': round(max(peaks) / 2**30, 3),
            'source': 'device memory_stats peak_bytes_in_use (max over local devices)'}
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  return {'bytes': rss, 'gib': round(rss / 2**30, 3),
          'source': 'CPU: process max RSS (resource.getrusage), includes the Python/JAX '
                    'runtime and the compiler'}


@dataclasses.dataclass
class CompiledStep:
  """The compiled train step of an experiment and the arguments of its first call:
  `state, metrics = compiled(state, *rest)` with `state, *rest = args`."""
  experiment: object
  run: object
  compiled: object
  args: tuple
  compile_s: float
  source: str
  encoder_note: str


def compile_step(config: fdl.Buildable, real_data: bool = False) -> CompiledStep:
  """Builds the experiment, its `lib.train.Run`, a fresh state and one batch (synthetic, or
  the data source's first with `real_data`), and compiles the jitted step for them."""
  import jax

  from lib import cpu_runtime
  from lib.train import Run

  cpu_runtime.run_inline()  # as launch.py runs (lib/cpu_runtime.py), before the backend starts
  cpu_runtime.keep_freed_memory()
  experiment = fdl.build(config)
  run = Run(experiment, workdir='/nonexistent-benchmark-workdir')  # nothing is written
  state = run.initial_state()
  data = experiment.data
  posterior = getattr(data, 'kind', 'pixels') == 'posterior'
  try:
    encoder_state = jax.device_put(experiment.encoder.load(), run.replicated)
    encoder_note = 'loaded'
  except (ValueError, FileNotFoundError):
    if not posterior:
      raise
    encoder_state, encoder_note = {}, 'not loaded (posterior batches need no VAE weights)'
  run.load_objective()  # REPA's DINOv2 weights (none without REPA)
  if real_data:
    data.check()
    host_batch = next(data.batches(0, jax.process_index(), jax.process_count()))
    source = f'{type(data).__name__} (first batch)'
  else:
    host_batch = synthetic_batch(experiment, data.batch_size)
    source = 'synthetic ' + ('posterior moments' if posterior else 'uint8 pixels')
  source += f' {tuple(host_batch["image"].shape)} {host_batch["image"].dtype}'
  batch = {k: jax.make_array_from_process_local_data(run.batch_sharding, v)
           for k, v in host_batch.items()}
  args = (state, encoder_state, batch, run.objective_state)
  start = time.perf_counter()
  compiled = run._train_step.lower(*args).compile()
  return CompiledStep(experiment, run, compiled, args, time.perf_counter() - start, source,
                      encoder_note)


def benchmark(config: fdl.Buildable, overrides: list[str], steps: int, warmup: int,
              real_data: bool) -> dict:
  import jax
  import numpy as np

  step = compile_step(config, real_data)
  experiment, run, compiled = step.experiment, step.run, step.compiled
  state, *rest = step.args
  for _ in range(warmup):
    state, metrics = compiled(state, *rest)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, *rest)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'the benchmarked step produced loss {loss}')
  step_ms = np.asarray(times) * 1e3
  device = jax.devices()[0]
  batch_size = experiment.data.batch_size
  return {
      'preset': flags.FLAGS.fdl_config,
      'overrides': overrides,
      'batch': batch_size,
      'input': step.source,
      'latent_shape': list(experiment.latent_shape),
      'network': f'{getattr(experiment.network, "func", experiment.network).__name__}, '
                 f'{run.param_count:,} parameters',
      'encoder_weights': step.encoder_note,
      'devices': jax.device_count(),
      'device_kind': device.device_kind,
      'backend': jax.default_backend(),
      'compile_s': round(step.compile_s, 3),
      'warmup_steps': warmup,
      'steps': steps,
      'step_ms': {'mean': round(float(step_ms.mean()), 3), 'std': round(float(step_ms.std()), 3),
                  'min': round(float(step_ms.min()), 3)},
      'images_per_s': round(batch_size / float(step_ms.mean() / 1e3), 3),
      'final_loss': round(loss, 5),
      'peak_memory': peak_memory(),
  }


def main(argv) -> int:
  from lib import errors
  from lib.config import overrides, presets
  from lib.experiment import ConfigError

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  assignments = list(flags.FLAGS.fdl_set)
  try:
    if not flags.FLAGS.fdl_config:
      raise errors.UsageError('--fdl_config=PATH.py:PRESET is required')
    config = presets.load_preset(flags.FLAGS.fdl_config)
    for assignment in assignments:
      overrides.apply_override(config, assignment)
    if flags.FLAGS.batch_size is not None:
      overrides.apply_override(config, f'data.batch_size={flags.FLAGS.batch_size}')
    result = benchmark(config, assignments, flags.FLAGS.steps, flags.FLAGS.warmup,
                       flags.FLAGS.real_data)
  except (errors.UsageError, ConfigError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(result, indent=1))
  return 0


if __name__ == '__main__':
  from fiddle import absl_flags  # registers --fdl_config and --fdl_set

  flags.DEFINE_integer('batch_size', None, 'Global batch size (default: the preset\'s).')
  flags.DEFINE_integer('steps', 10, 'Timed steps.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_bool('real_data', False, 'Use a batch of the configured data source instead of '
                    'a synthetic one.')
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=absl_flags.flags_parser)
