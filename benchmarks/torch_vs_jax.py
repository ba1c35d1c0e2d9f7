"""The same DiT train step in PyTorch and in fiddlediff, side by side on this machine.

    python benchmarks/torch_vs_jax.py --size=S --batch_size=16 --steps=6
    python benchmarks/torch_vs_jax.py --size=B --batch_size=8 --steps=6

fiddlediff: the real jitted step of `lib.train.Run` for `experiments/dit.py:s2` (or `b2`), as
`train_step.py` times it: posterior sample of SD-VAE moments -> SiT velocity loss -> gradients
-> AdamW -> EMA, on a synthetic batch of 32x32x8 posterior moments.

PyTorch: diffusers' `DiTTransformer2DModel` set to the official DiT (facebookresearch/DiT
`models.py`, as `tests/weights/test_import_dit.py` pins it): adaLN-Zero, LayerNorm eps 1e-6, tanh GELU,
one time/label embedder shared by all blocks with the official sinusoid frequencies, no learned
sigma; the step of the official `train.py` with SiT's loss: the same posterior sample and
normalisation, label dropout once per sample, t ~ U(0, 1), x_t = (1 - t) x + t n, loss =
mean (v - (n - x))^2, `torch.optim.AdamW`, EMA `ema = d ema + (1 - d) p`. The learning rate,
betas, eps, weight decay, EMA decay, label-dropout rate and latent statistics are read from the
preset, which is checked to be this recipe (uniform times, no resolution shift, constant-rate
AdamW without clipping, plain EMA). Everything is float32 on both sides; torch uses as many
threads as this process may run on (`--threads`), XLA its default (all of them).

Each framework runs in its own worker process, so each has its own peak memory and neither's
thread pool competes with the other's. After compilation and `--warmup` steps the workers take
turns one step at a time (T J, J T, T J, ...), so both sides see the same minutes of a shared
machine. Prints one JSON object: per side the median and minimum step wall time, the median
process CPU time per step (user + sys of the worker: less sensitive to other jobs than wall
time), images/s, the final loss and memory; the ratio torch / fiddlediff of the median step
times (> 1: fiddlediff is faster), also as the median of the per-pair ratios and as the ratio
of the fastest steps (each side's least disturbed one); the load average before and after
(other jobs on the machine).

Memory: each worker's resident set before it imports its framework (`baseline`), its peak
during the timed steps (`VmHWM` reset just before them, after `malloc_trim` returned the heap
that setup and compilation freed, so compilation is excluded) and that peak minus the
baseline (the framework's runtime, model, optimizer, EMA, activations and allocator caches);
for fiddlediff also XLA's own account of the compiled step's buffers (arguments + outputs -
aliased + temp).
"""

import ctypes
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # noqa: E402

PRESETS = {'S': 'experiments/dit.py:s2', 'B': 'experiments/dit.py:b2'}
DEFAULT_BATCH = {'S': 16, 'B': 8}


# ------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise KeyError(field)


def reset_peak_rss() -> None:
  """Returns freed heap memory to the system (glibc `malloc_trim`: what setup and compilation
  left behind), then resets this process's peak resident set (VmHWM) to its current size."""
  ctypes.CDLL(None).malloc_trim(0)
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')


def memory_report(baseline_kib: int) -> dict:
  peak = _status_kib('VmHWM')
  gib = lambda kib: round(kib / 2**20, 3)  # noqa: E731
  return {'baseline_gib': gib(baseline_kib), 'peak_during_steps_gib': gib(peak),
          'step_gib': gib(peak - baseline_kib),
          'max_rss_gib': gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)}


# ------------------------------------------------------------------------------- workers
def _serve(conn, step, info: dict, baseline_kib: int) -> None:
  """Answers 'step' with one timed step, 'stop' with `info` and the memory report."""
  reset_peak_rss()
  while True:
    command = conn.recv()
    if command == 'stop':
      conn.send({**info, 'memory': {**info.get('memory', {}), **memory_report(baseline_kib)}})
      return
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    loss = step()
    conn.send({'wall_s': time.perf_counter() - start_wall,
               'cpu_s': time.process_time() - start_cpu, 'loss': loss})


def jax_worker(conn, preset: str, batch_size: int, warmup: int) -> None:
  """fiddlediff's compiled `Run` step; first sends the recipe the torch side must follow."""
  baseline = _status_kib('VmRSS')
  import jax
  import jaxlib
  import numpy as np

  import train_step
  from lib import ema as ema_lib
  from lib.config import overrides, presets
  from lib.flow import sit

  config = presets.load_preset(preset)
  overrides.apply_override(config, f'data.batch_size={batch_size}')
  compiled = train_step.compile_step(config)
  experiment, run = compiled.experiment, compiled.run
  optimizer = config.optimizer
  interface = experiment.interface
  checks = {
      'interface is SiT with uniform times, data at t=0': isinstance(interface, sit.SiT) and
      interface.time_dist == 'uniform' and interface.network_time == 'data_at_0' and
      (interface.n_mu, interface.n_sigma) == (0.0, 1.0),
      'no resolution shift': interface.shift(experiment.latent_shape) == 1.0,
      'constant-rate AdamW without clipping': optimizer.__fn_or_cls__.__name__ == 'adamw' and
      optimizer.schedule.__fn_or_cls__.__name__ == 'constant' and
      optimizer.grad_clip_norm is None,
      'plain EMA': type(experiment.ema) is ema_lib.EMA,
      'float32 network': config.network.dtype == 'float32',
      'SD-VAE posterior sampled': getattr(experiment.encoder, 'sample_posterior', False),
  }
  failed = [name for name, ok in checks.items() if not ok]
  if failed:
    raise ValueError(f'{preset} is not the recipe the torch side implements: {failed}')
  hidden, depth, heads = (config.network.hidden_size, config.network.depth,
                          config.network.num_heads)
  state, *rest = compiled.args
  host_batch = {k: np.asarray(v) for k, v in rest[1].items()}
  recipe = {
      'hidden': hidden, 'depth': depth, 'heads': heads, 'patch': config.network.patch_size,
      'latent_shape': list(experiment.latent_shape), 'num_classes': experiment.data.num_classes,
      'label_dropout': config.network.class_dropout_prob, 'learning_rate': optimizer.learning_rate,
      'betas': (optimizer.b1, optimizer.b2), 'eps': optimizer.eps,
      'weight_decay': optimizer.weight_decay, 'ema_decay': experiment.ema.decay,
      'latent_statistics': {k: getattr(experiment.encoder, k) for k in
                            ('raw_mean', 'raw_std', 'final_mean', 'final_std')},
      'batch': host_batch,
  }
  holder = [state]

  def step():
    holder[0], metrics = compiled.compiled(holder[0], *rest)
    return float(metrics['loss'])  # waits for the step

  for _ in range(warmup):
    step()
  stats = compiled.compiled.memory_analysis()
  buffers = (stats.argument_size_in_bytes + stats.output_size_in_bytes -
             stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  info = {'version': f'jax {jax.__version__}, jaxlib {jaxlib.__version__}',
          'model': f'lib.models.dit.DiT via {preset}, {run.param_count:,} parameters',
          'setup_s': round(compiled.compile_s, 2), 'setup': 'compile_s (XLA compilation)',
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'memory': {'xla_step_buffers_gib': round(buffers / 2**30, 3),
                     'xla_temp_gib': round(stats.temp_size_in_bytes / 2**30, 3)}}
  conn.send({'recipe': recipe})
  _serve(conn, step, info, baseline)


def torch_worker(conn, recipe: dict, threads: int, warmup: int) -> None:
  """The official DiT recipe in PyTorch (module docstring), on the batch fiddlediff uses."""
  baseline = _status_kib('VmRSS')
  import diffusers
  import torch

  torch.set_num_threads(threads)
  start = time.perf_counter()
  side, _, channels = recipe['latent_shape']
  num_classes = recipe['num_classes']
  torch.manual_seed(0)
  model = diffusers.DiTTransformer2DModel(
      num_attention_heads=recipe['heads'], attention_head_dim=recipe['hidden'] // recipe['heads'],
      in_channels=channels, out_channels=channels, num_layers=recipe['depth'], sample_size=side,
      patch_size=recipe['patch'], num_embeds_ada_norm=num_classes, norm_type='ada_norm_zero',
      norm_eps=1e-6)
  shared = model.transformer_blocks[0].norm1.emb
  for block in model.transformer_blocks:
    block.norm1.emb = shared  # the official model has one t/y embedder
  shared.time_proj.downscale_freq_shift = 0  # official sinusoid frequencies (i / half)
  shared.class_embedder.dropout_prob = 0.0  # labels are dropped once per sample, below
  model.train()
  params = [p for p in model.parameters()]
  ema = [p.detach().clone() for p in params]
  optimizer = torch.optim.AdamW(params, lr=recipe['learning_rate'], betas=recipe['betas'],
                                eps=recipe['eps'], weight_decay=recipe['weight_decay'])
  moments = torch.from_numpy(recipe['batch']['image']).permute(0, 3, 1, 2).contiguous()
  labels = torch.from_numpy(recipe['batch']['label']).long()
  latent = recipe['latent_statistics']  # z_norm = z * scale + bias, as StabilityVAE
  scale = latent['final_std'] / torch.tensor(latent['raw_std']).view(1, -1, 1, 1)
  bias = latent['final_mean'] - torch.tensor(latent['raw_mean']).view(1, -1, 1, 1) * scale
  batch, decay = labels.shape[0], recipe['ema_decay']

  def step():
    mean, std = moments.chunk(2, dim=1)
    x = (mean + std * torch.randn_like(mean)) * scale + bias
    y = torch.where(torch.rand(batch) < recipe['label_dropout'], num_classes, labels)
    t = torch.rand(batch)
    noise = torch.randn_like(x)
    x_t = (1 - t).view(-1, 1, 1, 1) * x + t.view(-1, 1, 1, 1) * noise
    prediction = model(x_t, timestep=t, class_labels=y).sample
    loss = ((prediction - (noise - x)) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
      torch._foreach_mul_(ema, decay)
      torch._foreach_add_(ema, params, alpha=1.0 - decay)
    return loss.item()

  for _ in range(warmup):
    step()
  info = {'version': f'torch {torch.__version__}, diffusers {diffusers.__version__}',
          'model': f'diffusers DiTTransformer2DModel (official DiT), '
                   f'{sum(p.numel() for p in params):,} parameters',
          'threads': torch.get_num_threads(),
          'setup_s': round(time.perf_counter() - start, 2),
          'setup': 'model construction and warm-up steps'}
  conn.send({'ready': True})
  _serve(conn, step, info, baseline)


# ------------------------------------------------------------------------------- driver
def _summary(samples: list[dict], batch: int, info: dict) -> dict:
  wall = [s['wall_s'] for s in samples]
  return {**info, 'step_s': {'median': round(statistics.median(wall), 3),
                             'min': round(min(wall), 3), 'all': [round(w, 3) for w in wall]},
          'cpu_s_per_step': round(statistics.median(s['cpu_s'] for s in samples), 3),
          'images_per_s': round(batch / statistics.median(wall), 3),
          'final_loss': round(samples[-1]['loss'], 5)}


def compare(size: str, batch: int, steps: int, warmup: int, threads: int) -> dict:
  context = multiprocessing.get_context('spawn')
  load_before = os.getloadavg()
  pipes, workers = {}, []
  pipes['jax'], child = context.Pipe()
  workers.append(context.Process(target=jax_worker, args=(child, PRESETS[size], batch, warmup)))
  workers[-1].start()
  recipe = pipes['jax'].recv()['recipe']
  pipes['torch'], child = context.Pipe()
  workers.append(context.Process(target=torch_worker, args=(child, recipe, threads, warmup)))
  workers[-1].start()
  pipes['torch'].recv()
  samples = {'torch': [], 'jax': []}
  for i in range(steps):
    for side in (('torch', 'jax') if i % 2 == 0 else ('jax', 'torch')):
      pipes[side].send('step')
      samples[side].append(pipes[side].recv())
  infos = {}
  for side, pipe in pipes.items():
    pipe.send('stop')
    infos[side] = pipe.recv()
  for worker in workers:
    worker.join()
  torch_side = _summary(samples['torch'], batch, infos['torch'])
  jax_side = _summary(samples['jax'], batch, infos['jax'])
  pairs = [t['wall_s'] / j['wall_s'] for t, j in zip(samples['torch'], samples['jax'])]
  return {
      'size': size, 'preset': PRESETS[size], 'batch': batch, 'steps': steps, 'warmup': warmup,
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
                 f'{_cpu_model()}',
      'load_average': {'before': [round(x, 2) for x in load_before],
                       'after': [round(x, 2) for x in os.getloadavg()]},
      'torch': torch_side,
      'fiddlediff': jax_side,
      'ratio_torch_over_fiddlediff': {
          'median_step': round(torch_side['step_s']['median'] / jax_side['step_s']['median'], 3),
          'median_of_pairs': round(statistics.median(pairs), 3),
          'min_step': round(torch_side['step_s']['min'] / jax_side['step_s']['min'], 3),
          'cpu_per_step': round(torch_side['cpu_s_per_step'] / jax_side['cpu_s_per_step'], 3),
          'step_memory': round(torch_side['memory']['step_gib'] /
                               jax_side['memory']['step_gib'], 3)},
  }


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return 'unknown CPU'


SIZE = flags.DEFINE_enum('size', 'S', list(PRESETS), 'DiT size: S (DiT-S/2) or B (DiT-B/2).')
BATCH = flags.DEFINE_integer('batch_size', None, 'Batch size (default: 16 for S, 8 for B).')
STEPS = flags.DEFINE_integer('steps', 6, 'Timed steps per side, taken in alternation.')
WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps per side after setup.')
THREADS = flags.DEFINE_integer('threads', None, 'torch threads (default: the CPUs this '
                               'process may run on).')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if STEPS.value < 1 or WARMUP.value < 0:
    raise app.UsageError(f'--steps={STEPS.value} / --warmup={WARMUP.value}: need steps >= 1 '
                         f'and warmup >= 0')
  batch = BATCH.value or DEFAULT_BATCH[SIZE.value]
  threads = THREADS.value or len(os.sched_getaffinity(0))
  print(json.dumps(compare(SIZE.value, batch, STEPS.value, WARMUP.value, threads), indent=1))


if __name__ == '__main__':
  app.run(main)
