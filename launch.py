"""Launches an experiment graph: train, sample, evaluate, import released weights, or print it.

    python launch.py --fdl_config=experiments/dit.py:digits --workdir=runs/digits
    python launch.py --fdl_config=experiments/dit.py:xl2 --fdl_set=optimizer.learning_rate=2e-4 \
        --print_config
    python launch.py --fdl_config=experiments/dit.py:digits --workdir=runs/digits --mode=sample
    python launch.py --config=configs/dit_imagenet.py:imagenet_256-XL_2 --config.seed=1 \
        --print_config
    python launch.py --mode=import --checkpoint=SiT-XL-2-256x256.pt \
        --fdl_config=experiments/dit.py:xl2 --workdir=runs/sit
    python launch.py --fdl_config=experiments/dit.py:xl2 --workdir=/shared/runs/xl2 \
        --launcher=slurm --launcher_set=nodes=2 --launcher_set=gpus_per_node=8
    python launch.py --fdl_config=experiments/dit.py:digits --workdir=runs/lr \
        --sweep=optimizer.learning_rate=1e-4,3e-4 --sweep=seed=0,1
    python launch.py --compare=runs/lr

`--fdl_set=PATH=VALUE` (repeatable, also written `--fdl.PATH=VALUE`) overrides any leaf
with a Python literal; paths and types are checked before anything runs.
"""

import logging as std_logging
import math
import os
import sys
import time
import traceback
from typing import Callable

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow (tf.data, CLU) start-up chatter

from absl import app, flags, logging
import fiddle as fdl
from fiddle import absl_flags  # registers --fdl_config(_file), --fdl_set, --fiddler, --fdl_tags_set
from ml_collections import config_flags

from experiments.legacy import config_files
from lib import errors, paths
from lib.cluster import slurm
from lib.config import overrides, presets, review, saved, values

LAUNCHERS = {'slurm': slurm.Slurm}  # --launcher: the config class of each

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, samples; a '
                                'local path or gs://BUCKET/PATH (with --bucket: the run\'s name).')
_BUCKET = flags.DEFINE_string('bucket', None, 'As diffuse_nnx: put the run in '
                              'gs://BUCKET/PREFIX/NNN_WORKDIR (an existing NNN_WORKDIR folder is '
                              'resumed; else NNN counts the run folders there).')
_PREFIX = flags.DEFINE_string('prefix', 'diffuse_nnx', 'With --bucket: the folder of the runs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'import'], 'What to do '
                          '(eval: the evaluation actions on a checkpoint, see --step; import: '
                          'make --workdir a run of the released weights --checkpoint).')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, '--mode=import: released weights file '
                                  '(.pt/.pth/.bin/.ckpt/.safetensors/.npz).')
_PRINT_CONFIG = flags.DEFINE_bool(
    'print_config', False, 'Print the resolved config and the parameter count, then exit.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 64, '--mode=sample: number of samples.')
_LABELS = flags.DEFINE_list('labels', None, '--mode=sample: class labels (default: all '
                            'classes in turn).')
_GUIDANCE = flags.DEFINE_float('guidance_scale', None, '--mode=sample: guidance weight '
                               '(default: sampler.guidance_scale).')
_SAMPLE_SEED = flags.DEFINE_integer('sample_seed', 0, '--mode=sample: seed of the noise.')
_STEP = flags.DEFINE_integer('step', None, '--mode=sample and --mode=eval: the checkpoint step '
                             '(default: the newest); --mode=import: the step to write '
                             '(default 0).')
_PROVENANCE = flags.DEFINE_bool(
    'provenance', False, 'With --print_config: where each value was set (file:line or flag).')
_HIDE_DEFAULTS = flags.DEFINE_bool(
    'hide_defaults', False, 'With --print_config or --render: list only the values presets and '
    'flags set, not the arguments left at their constructor defaults.')
_RENDER = flags.DEFINE_string(
    'render', None, 'Draw the config graph to FILE.svg, .png, .dot or .html (a foldable tree), '
    'or with --diff_against the graph of the difference; then exit.')
_DIFF_AGAINST = flags.DEFINE_string(
    'diff_against', None, 'Print the leaf-by-leaf difference from another experiment, '
    'FILE.py:PRESET or a saved run (RUN_DIR or RUN_DIR/config.json); then exit.')
_EXPORT_PYTHON = flags.DEFINE_string(
    'export_python', None, 'Write the resolved config as a plain Python preset function to '
    'FILE.py (Fiddle codegen); then exit.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-host: host:port of process 0 (with --num_processes and '
    '--process_id); without them the cluster environment is detected (SLURM, MPI, TPU pods).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
_LEGACY_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A legacy (diffuse_nnx) ml_collections config, PATH.py[:OPTIONS], with '
    '--config.FIELD=VALUE overrides; loaded with its project root importable (its '
    '`configs` package), converted by experiments/legacy/converter.py, then run like a preset.')
flags.FLAGS['config'].parser = config_files.FileParser()
_LAUNCHER = flags.DEFINE_enum(
    'launcher', None, list(LAUNCHERS), 'Run elsewhere: slurm submits the run (or sweep: one job '
    'array) with submitit after checking it here; its options: --launcher_set.')
_LAUNCHER_SET = flags.DEFINE_multi_string(
    'launcher_set', [], 'FIELD=VALUE of the launcher (lib/cluster/slurm.py Slurm: nodes, '
    'gpus_per_node, time_min, partition, ...), checked as --fdl_set; shown by --print_config.')
_SWEEP = flags.DEFINE_multi_string(
    'sweep', [], 'PATH=V1,V2,...: run the experiment once per value (repeatable: the cartesian '
    'product), each member in its own folder under --workdir, NNN_PATH=VALUE...')
_SWEEP_PARALLEL = flags.DEFINE_integer(
    'sweep_parallel', 1, 'Without --launcher: the sweep members that run at once here.')
_COMPARE = flags.DEFINE_list(
    'compare', None, 'RUN_OR_SWEEP,...: print the runs\' states, differing config values and '
    'metrics side by side, plot their curves to --compare_plot; then exit.')
_COMPARE_PLOT = flags.DEFINE_string(
    'compare_plot', None, 'With --compare: the PNG of the curves (default: SWEEP/compare.png '
    'for one folder, else compare.png).')
_ACCEPT_CONFIG_CHANGE = flags.DEFINE_bool(
    'accept_config_change', False, 'Resume a workdir although its saved config differs from the '
    'launched one (the old config is kept as config.replaced_<time>.json).')
_RESTART_FROM_SCRATCH = flags.DEFINE_bool(
    'restart_from_scratch', False, 'Train from step 0 although every checkpoint of the workdir '
    'was set aside as damaged (kept in WORKDIR/checkpoints_set_aside/); else such a launch is '
    'refused.')


def resolve_workdir():
  """--workdir as a path (`lib.paths`), or with --bucket the diffuse_nnx run folder; None if
  not given."""
  from lib import workdir as workdirs

  if _BUCKET.value:
    if not _WORKDIR.value:
      raise errors.UsageError('--bucket needs --workdir=NAME, the name of the run folder')
    return workdirs.in_bucket(_BUCKET.value, _PREFIX.value, _WORKDIR.value)
  return paths.resolve(_WORKDIR.value, '--workdir') if _WORKDIR.value else None


def resolve_config(workdir=None) -> fdl.Buildable:
  """The preset named by --fdl_config (the saved config of --fdl_config_file, or the converted
  legacy --config) with every --fiddler, --fdl_tags_set and --fdl_set applied, each kind in
  command-line order; without a config flag, the config saved in `workdir`."""
  spec, saved_file = flags.FLAGS.fdl_config, flags.FLAGS.fdl_config_file
  legacy_config = _LEGACY_CONFIG.value
  if sum(map(bool, (spec, saved_file, legacy_config is not None))) > 1:
    raise errors.UsageError('give one of --fdl_config, --fdl_config_file and --config (a legacy '
                            'ml_collections config), not several')
  if not spec and not saved_file and legacy_config is None and workdir is not None and \
      (workdir / 'config.json').exists():
    saved_file = workdir / 'config.json'  # continue or sample a saved run
  if legacy_config is not None:
    from experiments.legacy import converter

    flag = flags.FLAGS['config']
    config = converter.convert(legacy_config, config_files.source(
        config_flags.get_config_filename(flag), config_flags.get_override_values(flag)))
  elif saved_file:
    config = saved.load_config_file(os.fspath(saved_file))
  elif spec:
    config = presets.load_preset(spec)
  else:
    raise errors.UsageError('--fdl_config=PATH.py:PRESET (or --fdl_config_file=RUN/config.json) is '
                            'required; preset files: ' + ', '.join(presets.preset_files()))
  for spec in flags.FLAGS.fiddler:  # Fiddle's order: fiddlers, tags, then --fdl_set
    config = presets.apply_fiddler(config, spec)
  for assignment in flags.FLAGS.fdl_tags_set:
    overrides.apply_tag_override(config, assignment)
  for assignment in flags.FLAGS.fdl_set:
    overrides.apply_override(config, assignment)
  if getattr(config, 'init_from', None):  # the released weights' conventions
    from lib.weights import releases
    releases.apply_init_from(config)
  return config


def load_other(spec: str) -> tuple[fdl.Buildable, dict]:
  """--diff_against: a preset (FILE.py:PRESET) or a saved run's config, with its effective
  values (those a run saved, defaults included)."""
  if paths.is_url(spec) or os.path.exists(spec):
    return (saved.load_config_file(spec, '--diff_against'),
            saved.saved_values(spec, '--diff_against'))
  other = presets.load_preset(spec)
  return other, values.effective_values(other)


def review_config(config: fdl.Buildable) -> int:
  """--render, --diff_against and --export_python: look at the graph without building it."""
  other, other_values = load_other(_DIFF_AGAINST.value) if _DIFF_AGAINST.value else (None, None)
  if other is not None and not _RENDER.value:
    lines = review.values_diff_lines(other_values, values.effective_values(config))
    print('\n'.join(lines) if lines else '# no difference')
  if _RENDER.value:
    warning = review.render(config, _RENDER.value, old=other,
                            defaults=not _HIDE_DEFAULTS.value)
    if warning:
      print(f'warning: {warning}', file=sys.stderr)
      return 1
    print(f'wrote {_RENDER.value}')
  if _EXPORT_PYTHON.value:
    name = os.path.splitext(os.path.basename(_EXPORT_PYTHON.value))[0]
    with open(_EXPORT_PYTHON.value, 'w') as f:
      f.write(review.python_source(config, 'preset' if not name.isidentifier() else name))
    print(f'wrote {_EXPORT_PYTHON.value}')
  return 0


# Differences under these paths change how a run is observed or laid out on devices, not
# what it computes, so a resumed run may change them without --accept_config_change
# (`init_from` is read only by a run's first start).
BOOKKEEPING = ('checkpoint', 'writers', 'report', 'profile', 'visualize', 'evaluate',
               'log_every_steps', 'sharding', 'init_from')


def check_saved_config(config: fdl.Buildable, workdir) -> Callable[[], None] | None:
  """Refuses to resume a workdir whose saved effective values (defaults included, so a class
  default changed in the code counts) differ in what the run computes, unless accepted;
  bookkeeping differences (BOOKKEEPING) are allowed and logged. Changes nothing: returns the
  function that keeps the old config aside (None if there is none to keep), which the run
  calls once its state is restored."""
  path = workdir / 'config.json'
  if not path.exists():
    return None
  lines = review.values_diff_lines(saved.saved_values(path, '--workdir'),
                                   values.effective_values(config))
  if not lines:
    return None
  difference = '\n  '.join(lines)
  bookkeeping = all(overrides.parse_path(line.split(':')[0])[0] in BOOKKEEPING for line in lines)
  if not bookkeeping and not _ACCEPT_CONFIG_CHANGE.value:
    raise errors.UsageError(f'{workdir} holds a run whose saved config differs from this one:\n  '
                            f'{difference}\nuse another --workdir, relaunch the saved config with '
                            f'--fdl_config_file={path}, or pass --accept_config_change')

  def keep_old_config():
    stamp = time.strftime("%Y%m%d-%H%M%S")
    replaced = workdir / f'config.replaced_{stamp}.json'
    path.replace(replaced)
    if (workdir / saved.EFFECTIVE).exists():
      (workdir / saved.EFFECTIVE).replace(workdir / f'effective.replaced_{stamp}.json')
    logging.warning('Config changed on resume (old config kept as %s):\n  %s', replaced,
                    difference)
  return keep_old_config


def print_config(config: fdl.Buildable, experiment) -> None:
  from flax import nnx
  import jax

  print('\n'.join(values.flat_lines(config, with_source=_PROVENANCE.value,
                                    defaults=not _HIDE_DEFAULTS.value)))
  print(f'# derived: latent_shape = {experiment.latent_shape}; network.input_size = '
        f'{experiment.latent_shape[0]}, network.in_channels = {experiment.latent_shape[2]}, '
        f'network.num_classes = {experiment.data.num_classes}')
  abstract = experiment.abstract_network()
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  print(f'# network parameters: {count:,} (computed abstractly)')


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the run log (warnings still pass); and, for a
  failed write, the traceback of CLU's background writer and asyncio's reports of orbax's
  other writes that failed alike (the run's `error:` line says what failed; `--verbosity=1`
  keeps them)."""

  def filter(self, record):
    if flags.FLAGS.verbosity < 1:
      if record.name == 'asyncio' and 'exception was never retrieved' in str(record.msg):
        return False
      if '/clu/asynclib.py' in record.pathname:
        record.exc_info = record.exc_text = None
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from lib import errors

  try:
    return run_command()
  except errors.UserError as e:
    return _report(e, 2)
  except errors.NonFiniteError as e:
    return _report(e, 1)
  except errors.Preempted as e:  # a checkpoint of the step is saved: relaunch to resume
    print(f'stopped: {e}', file=sys.stderr)
    return errors.PREEMPTED_STATUS
  except KeyboardInterrupt:  # Ctrl-C before training started (or after it ended)
    print('error: interrupted (Ctrl-C)', file=sys.stderr)
    return errors.INTERRUPTED_STATUS


def _report(error: Exception, status: int) -> int:
  """One `error:` line (the traceback too with --verbosity=1 or FIDDLEDIFF_TRACEBACK=1)."""
  if flags.FLAGS.verbosity >= 1 or os.environ.get('FIDDLEDIFF_TRACEBACK') not in (None, '', '0'):
    traceback.print_exception(error)
  # Our messages name the values; Fiddle's appended dump of the root's arguments is noise.
  print(f'error: {str(error).split(chr(10) * 2 + "Fiddle context:")[0]}', file=sys.stderr)
  return status


def _sample_arguments(num_classes: int) -> tuple[list[int] | None, float | None]:
  """--labels and --guidance_scale of --mode=sample, checked."""
  if _NUM_SAMPLES.value < 1:
    raise errors.UsageError(f'--num_samples={_NUM_SAMPLES.value}; expected a positive count')
  labels = None
  if _LABELS.value:
    try:
      labels = [int(label) for label in _LABELS.value]
    except ValueError:
      raise errors.UsageError(f'--labels={",".join(_LABELS.value)}: expected comma-separated '
                              f'integer class labels in 0..{num_classes - 1}') from None
  if _GUIDANCE.value is not None and not math.isfinite(_GUIDANCE.value):
    raise errors.UsageError(f'--guidance_scale={_GUIDANCE.value}; expected a finite number '
                            '(1: no guidance)')
  return labels, _GUIDANCE.value


def run_command() -> int:
  from lib import cpu_runtime, distributed, workdir as workdirs

  cpu_runtime.run_inline()  # before any backend starts
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _STEP.value is not None and _MODE.value == 'train':
    raise errors.UsageError(f'--step={_STEP.value} chooses the checkpoint of --mode=sample or '
                            '--mode=eval; training resumes from the newest checkpoint')
  if _RESTART_FROM_SCRATCH.value and _MODE.value != 'train':
    raise errors.UsageError('--restart_from_scratch is read by --mode=train only')
  if _CHECKPOINT.value and _MODE.value != 'import':
    raise errors.UsageError(f'--checkpoint={_CHECKPOINT.value} is read by --mode=import only; '
                            'to train from released weights set --fdl_set=init_from=FILE')
  if _COMPARE.value:
    from lib.cluster import compare
    return compare.compare(_COMPARE.value, _COMPARE_PLOT.value)
  workdir = resolve_workdir()
  config = resolve_config(workdir)
  launcher = resolve_launcher()
  if _RENDER.value or _DIFF_AGAINST.value or _EXPORT_PYTHON.value:
    return review_config(config)
  if _MODE.value == 'import':
    from lib import import_release

    if workdir is None:
      raise errors.UsageError('--mode=import needs --workdir=DIR, the run to create')
    import_release.run(_CHECKPOINT.value, config, workdir, _STEP.value)
    return 0
  experiment = presets.build(config)
  if _PRINT_CONFIG.value:
    print_config(config, experiment)
    if launcher is not None:
      print('\n'.join(f'launcher.{line}' for line in values.flat_lines(launcher)))
    return 0
  if launcher is not None or _SWEEP.value:
    return launch_elsewhere(workdir, config, launcher)
  if workdir is None:
    raise errors.UsageError('--workdir is required to train, sample or evaluate')
  workdirs.check_usable(workdir)
  from lib import evaluate, sample, train
  import jax

  cpu_runtime.keep_freed_memory()
  if _MODE.value == 'sample':
    experiment.check_shapes()
    labels, guidance = _sample_arguments(experiment.data.num_classes)
    sample.sample(experiment, workdir, _NUM_SAMPLES.value, labels, guidance,
                  _SAMPLE_SEED.value, _STEP.value)
    return 0
  if _MODE.value == 'eval':
    experiment.check()
    evaluate.evaluate(experiment, workdir, _STEP.value)
    return 0
  # Training: everything that can be checked is checked before the workdir is touched; the
  # config is written (or replaced) only once the run's state is restored.
  experiment.check()
  lock = workdirs.WorkdirLock(workdir)
  lock.acquire()
  try:
    keep_old_config = check_saved_config(config, workdir)

    def on_start(step: int) -> None:
      # Every process has compared the saved config before process 0 replaces it.
      distributed.barrier('config checked')
      if jax.process_index() == 0:
        if keep_old_config is not None:
          keep_old_config()
        saved.write_config(config, workdir)
        workdirs.record_launch(workdir, step)

    step = train.train(experiment, workdir, on_start, lock,
                       restart_from_scratch=_RESTART_FROM_SCRATCH.value)
  finally:
    lock.release()
  logging.info('Finished: step %d of %d.', step, experiment.total_steps)
  return 0


def resolve_launcher() -> fdl.Config | None:
  """The --launcher's config (`LAUNCHERS`) with every --launcher_set applied; None without
  --launcher."""
  if _LAUNCHER.value is None:
    if _LAUNCHER_SET.value:
      raise errors.UsageError('--launcher_set needs --launcher=' + '|'.join(LAUNCHERS))
    return None
  launcher = fdl.Config(LAUNCHERS[_LAUNCHER.value])
  for assignment in _LAUNCHER_SET.value:
    try:
      overrides.apply_override(launcher, assignment)
    except errors.UsageError as e:
      raise errors.UsageError(str(e).replace('--fdl_set', '--launcher_set')) from None
  return launcher


def launch_elsewhere(workdir, config: fdl.Buildable, launcher: fdl.Config | None) -> int:
  """--launcher and --sweep: every member (or the one run) resolved, built and checked, its
  workdir compared with a saved config, before `lib.cluster.runs` queues or starts any."""
  from lib.cluster import runs
  from lib.config import sweeps

  if workdir is None:
    raise errors.UsageError('--workdir is required with --launcher or --sweep (with --sweep: '
                            'the folder of its members)')
  if _MODE.value != 'train':
    raise errors.UsageError(f'--mode={_MODE.value} runs here; --launcher and --sweep train')
  if launcher is not None:
    try:
      launcher = fdl.build(launcher)
    except ValueError as e:
      raise errors.UsageError(f'--launcher_set: {e}') from None
    slurm.require_sbatch()
  members = sweeps.expand([sweeps.parse_axis(spec) for spec in _SWEEP.value]) \
      if _SWEEP.value else None
  plans = []
  for member in members or [None]:
    member_config = sweeps.member_config(config, member) if member else config
    member_workdir = workdir / member.name if member else workdir
    try:
      experiment = presets.build(member_config)
      experiment.check()
      check_saved_config(member_config, member_workdir)
    except errors.UserError as e:
      if member is None:
        raise
      raise type(e)(f'--sweep member {member.name}: {e}') from None
    plans.append(runs.Planned(member_workdir, member.assignments if member else (),
                              experiment.total_steps, member.name if member else ''))
  return runs.launch(plans, base_command(), launcher, workdir if members else None,
                     _SWEEP_PARALLEL.value)


# Flags that choose where and what to launch; the launched command has none of them.
LAUNCH_FLAGS = ('launcher', 'launcher_set', 'sweep', 'sweep_parallel', 'workdir', 'bucket',
                'prefix')


def base_command() -> list[str]:
  """This command line without LAUNCH_FLAGS (a member adds --workdir and its --fdl_set)."""
  arguments, skip = [], False
  for argument in sys.argv[1:]:
    name = argument.lstrip('-').split('=', 1)[0]
    if skip:
      skip = False
    elif argument.startswith('-') and name in LAUNCH_FLAGS:
      skip = '=' not in argument  # --flag VALUE
    else:
      arguments.append(argument)
  return [sys.executable, os.path.abspath(sys.argv[0]), *arguments]


def parse_flags(argv):
  """Fiddle's flag parser; a legacy --config file that fails to load (it is run while the
  flags are parsed) is one error message and exit 2, as a errors.UsageError in main is."""
  try:
    return absl_flags.flags_parser(argv)
  except config_files.LegacyFileError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing field
    legacy_overrides = [arg for arg in argv[1:] if arg.startswith('--config.')]
    if not legacy_overrides:
      raise
    print(f'error: {" ".join(legacy_overrides)}: the legacy config has no field '
          f'{str(e).strip(chr(34) + chr(39))!r} (--config.FIELD '
          'overrides change existing fields, they cannot add any)', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
