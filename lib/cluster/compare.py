"""Runs side by side (`launch.py --compare=RUN_OR_SWEEP,...`): per run its state and step, the
config values that differ between the runs (effective values, `effective.json`), its final and
best metrics (`metrics.jsonl`), and one PNG of every run's training loss and evaluation curves.

    runs = collect(['runs/lr_sweep'])   # a sweep folder (sweep.json) gives its members
    print(report(runs))
    plot(runs, 'runs/lr_sweep/compare.png')

States: `done` (the newest checkpoint is at total_steps), `running` (a live run holds the
lock, or its Slurm job runs), `pending` (its Slurm job waits in the queue), `failed` (its Slurm
job ended before the last step), `stopped` (ended before the last step, not on Slurm: a
preempted or interrupted local run), `not started`. Workdirs may be local or gs:// paths.
"""

import dataclasses
import fcntl
import json
import os
import re

from lib import checkpoint, errors, paths
from lib.cluster import runs as cluster_runs, slurm
from lib.config import saved

# Metrics where higher is better (the rest, losses and distances, lower is better).
HIGHER_IS_BETTER = re.compile(r'accuracy|inception_score|(^|/)is\b|precision|recall')


@dataclasses.dataclass
class Run:
  name: str
  workdir: paths.Path
  values: dict  # effective values, by path ({} before the run has started)
  state: str
  step: int | None
  total_steps: int | None
  metrics: dict[str, list[tuple[int, float]]]  # name -> [(step, value)], in step order


def _workdirs(spec: str) -> list[tuple[str, paths.Path]]:
  """A sweep folder's members (from sweep.json), or the run folder itself."""
  folder = paths.resolve(spec, '--compare')
  if not folder.is_dir():
    raise errors.UsageError(f'--compare: {spec} is not a run or sweep folder')
  record = folder / cluster_runs.SWEEP_RECORD
  if record.exists():
    return [(member['name'], paths.resolve(member['workdir'], '--compare'))
            for member in json.loads(record.read_text())['members']]
  return [(folder.name, folder)]


def read_metrics(workdir: paths.Path) -> dict[str, list[tuple[int, float]]]:
  """`metrics.jsonl`: per scalar its (step, value) points in step order (the last value of a
  step written twice wins)."""
  file = workdir / 'metrics.jsonl'
  out: dict[str, list[tuple[int, float]]] = {}
  if not file.exists():
    return out
  for line in file.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # a line being written
      continue
    for name, value in record.items():
      if name != 'step' and isinstance(value, (int, float)):
        out.setdefault(name, []).append((int(record['step']), float(value)))
  return {name: sorted(dict(points).items()) for name, points in out.items()}


def _locked(workdir: paths.Path) -> bool:
  """A live run holds the workdir's lock (local: its flock; bucket: its lock object)."""
  lock = workdir / 'lock'
  if paths.is_url(workdir):
    return lock.exists()
  if not lock.exists():
    return False
  with open(os.fspath(lock)) as f:
    try:
      fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return True
    fcntl.flock(f, fcntl.LOCK_UN)
  return False


def _state(workdir: paths.Path, step: int | None, total_steps: int | None) -> str:
  if step is not None and total_steps is not None and step >= total_steps:
    return 'done'
  record = slurm.last_record(workdir)
  queued = slurm.queue_state(record['job_id']) if record else None
  if queued in slurm.WAITING_STATES:
    return 'pending'
  if queued in slurm.ACTIVE_STATES or _locked(workdir):
    return 'running'
  if record is not None:
    return 'failed'
  return 'stopped' if step is not None or (workdir / 'run.json').exists() else 'not started'


def collect(specs: list[str]) -> list[Run]:
  """The runs named by `specs` (run or sweep folders), in order."""
  out = []
  for spec in specs:
    for name, workdir in _workdirs(spec):
      has_config = (workdir / saved.EFFECTIVE).exists() or (workdir / 'config.json').exists()
      values = saved.saved_values(workdir, '--compare') if has_config else {}
      total = values.get('total_steps', {}).get('value')
      total_steps = int(total) if total is not None else None
      step = checkpoint.latest_step(workdir)
      out.append(Run(name, workdir, values, _state(workdir, step, total_steps), step,
                     total_steps, read_metrics(workdir)))
  return out


def differing_paths(runs: list[Run]) -> list[str]:
  """The config paths whose effective value is not the same in every run that has started."""
  started = [run.values for run in runs if run.values]
  every = sorted(set().union(*started)) if started else []
  return [path for path in every
          if len({values.get(path, {}).get('value') for values in started}) > 1]


def label(run: Run, differing: list[str]) -> str:
  """The run's differing values (`a=1, b=2`), or its name when nothing differs."""
  shown = [f'{path}={run.values[path]["value"]}' for path in differing if path in run.values]
  return ', '.join(shown) if shown else run.name


def summary(points: list[tuple[int, float]], name: str) -> str:
  best = (max if HIGHER_IS_BETTER.search(name) else min)(points, key=lambda p: p[1])
  return (f'final {points[-1][1]:.6g} (step {points[-1][0]}), best {best[1]:.6g} '
          f'(step {best[0]})')


def report(runs: list[Run]) -> str:
  differing = differing_paths(runs)
  lines = [f'# {len(runs)} runs; values that differ: {", ".join(differing) or "none"}']
  for run in runs:
    progress = f'step {run.step if run.step is not None else "-"}'
    progress += f' of {run.total_steps}' if run.total_steps is not None else ''
    lines.append(f'{run.name}: {run.state}, {progress} ({os.fspath(run.workdir)})')
    lines += [f'  {path} = {run.values[path]["value"]}' for path in differing
              if path in run.values]
    lines += [f'  {name}: {summary(points, name)}' for name, points in sorted(run.metrics.items())
              if points and (name.startswith('eval/') or name == 'train/loss')]
  return '\n'.join(lines)


def plot(runs: list[Run], path: str) -> None:
  """One PNG: a panel per metric (training loss first, then the evaluations), a line per run
  in its own colour, labelled by its differing values."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot

  names = sorted({name for run in runs for name in run.metrics
                  if name == 'train/loss' or name.startswith('eval/')},
                 key=lambda name: (name != 'train/loss', name))
  if not names:
    raise errors.UsageError('--compare: no run has metrics (metrics.jsonl) yet; nothing to plot')
  differing = differing_paths(runs)
  figure, axes = pyplot.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
  colours = pyplot.get_cmap('tab10' if len(runs) <= 10 else 'tab20')
  for axis, name in zip(axes[0], names):
    for index, run in enumerate(runs):
      if run.metrics.get(name):
        steps, values = zip(*run.metrics[name])
        axis.plot(steps, values, marker='.' if len(steps) < 20 else None,
                  color=colours(index % colours.N), label=label(run, differing))
    axis.set_title(name)
    axis.set_xlabel('step')
    axis.grid(alpha=0.3)
  axes[0][0].legend(fontsize='small')
  figure.tight_layout()
  target = paths.resolve(path, '--compare_plot')
  with target.open('wb') as f:
    figure.savefig(f, format='png', dpi=100)
  pyplot.close(figure)


def compare(specs: list[str], plot_path: str | None) -> int:
  """--compare: prints the report, writes the plot; exit status 0."""
  runs = collect(specs)
  print(report(runs))
  if plot_path is None:
    plot_path = os.path.join(specs[0], 'compare.png') if len(specs) == 1 else 'compare.png'
  plot(runs, plot_path)
  print(f'wrote {plot_path}')
  return 0
