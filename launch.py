"""Launches an experiment graph: train, sample, or print it.

    python launch.py --fdl_config=experiments/dit.py:digits --workdir=runs/digits
    python launch.py --fdl_config=experiments/dit.py:xl2 --fdl_set=optimizer.learning_rate=2e-4 \
        --print_config
    python launch.py --fdl_config=experiments/dit.py:digits --workdir=runs/digits --mode=sample
    python launch.py --config=configs/dit_imagenet.py:imagenet_256-XL_2 --config.seed=1 \
        --print_config

`--fdl_set=PATH=VALUE` (repeatable, also written `--fdl.PATH=VALUE`) overrides any leaf
with a Python literal; paths and types are checked before anything runs.
"""

import logging as std_logging
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow (tf.data, CLU) start-up chatter

from absl import app, flags, logging
import fiddle as fdl
from fiddle import absl_flags  # registers --fdl_config, --fdl_config_file and --fdl_set
from ml_collections import config_flags

from lib import cli, review

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, samples.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to do (eval: '
                           'the evaluation actions on the newest checkpoint).')
_PRINT_CONFIG = flags.DEFINE_bool(
    'print_config', False, 'Print the resolved config and the parameter count, then exit.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 64, '--mode=sample: number of samples.')
_LABELS = flags.DEFINE_list('labels', None, '--mode=sample: class labels (default: all '
                            'classes in turn).')
_GUIDANCE = flags.DEFINE_float('guidance_scale', None, '--mode=sample: guidance weight '
                               '(default: sampler.guidance_scale).')
_SAMPLE_SEED = flags.DEFINE_integer('sample_seed', 0, '--mode=sample: seed of the noise.')
_PROVENANCE = flags.DEFINE_bool(
    'provenance', False, 'With --print_config: where each value was set (file:line or flag).')
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
    'config', None, 'A legacy (seed-library) ml_collections config, PATH.py[:OPTIONS], with '
    '--config.FIELD=VALUE overrides; converted by lib/legacy.py, then run like a preset.')
_ACCEPT_CONFIG_CHANGE = flags.DEFINE_bool(
    'accept_config_change', False, 'Resume a workdir although its saved config differs from the '
    'launched one (the old config is kept as config.replaced_<time>.json).')


def resolve_config() -> fdl.Buildable:
  """The preset named by --fdl_config (the saved config of --fdl_config_file, or the converted
  legacy --config) with every --fdl_set applied, in command-line order."""
  spec, saved = flags.FLAGS.fdl_config, flags.FLAGS.fdl_config_file
  legacy_config = _LEGACY_CONFIG.value
  if sum(map(bool, (spec, saved, legacy_config is not None))) > 1:
    raise cli.UsageError('give one of --fdl_config, --fdl_config_file and --config (a legacy '
                         'ml_collections config), not several')
  if not spec and not saved and legacy_config is None and _WORKDIR.value and \
      os.path.exists(os.path.join(_WORKDIR.value, 'config.json')):
    saved = os.path.join(_WORKDIR.value, 'config.json')  # continue or sample a saved run
  if legacy_config is not None:
    from lib import legacy

    config = legacy.convert(legacy_config)
  elif saved:
    config = review.load_config_file(os.fspath(saved))
  elif spec:
    config = cli.load_preset(spec)
  else:
    raise cli.UsageError('--fdl_config=PATH.py:PRESET (or --fdl_config_file=RUN/config.json) is '
                         'required; preset files: ' + ', '.join(cli.preset_files()))
  for assignment in flags.FLAGS.fdl_set:
    cli.apply_override(config, assignment)
  if getattr(config, 'init_from', None):  # the released weights' conventions
    from lib.models import releases
    releases.apply_init_from(config)
  return config


def load_other(spec: str) -> fdl.Buildable:
  """--diff_against: a preset (FILE.py:PRESET) or a saved run's config."""
  if os.path.exists(spec):
    return review.load_config_file(spec)
  return cli.load_preset(spec)


def review_config(config: fdl.Buildable) -> int:
  """--render, --diff_against and --export_python: look at the graph without building it."""
  other = load_other(_DIFF_AGAINST.value) if _DIFF_AGAINST.value else None
  if other is not None and not _RENDER.value:
    lines = review.diff_lines(other, config)
    print('\n'.join(lines) if lines else '# no difference')
  if _RENDER.value:
    warning = review.render(config, _RENDER.value, old=other)
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


def check_saved_config(config: fdl.Buildable, workdir: str) -> None:
  """Refuses to resume a workdir whose saved config differs in what the run computes,
  unless accepted; bookkeeping differences (BOOKKEEPING) are allowed and logged."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  saved = review.load_config_file(path)
  if saved == review.normalized(config):
    return
  lines = review.diff_lines(saved, config)
  difference = '\n  '.join(lines)
  bookkeeping = all(cli.parse_path(line.split(':')[0])[0] in BOOKKEEPING for line in lines)
  if not bookkeeping and not _ACCEPT_CONFIG_CHANGE.value:
    raise cli.UsageError(f'{workdir} holds a run whose saved config differs from this one:\n  '
                         f'{difference}\nuse another --workdir, relaunch the saved config with '
                         f'--fdl_config_file={path}, or pass --accept_config_change')
  import jax

  if jax.process_index() == 0:
    replaced = os.path.join(workdir, f'config.replaced_{time.strftime("%Y%m%d-%H%M%S")}.json')
    os.replace(path, replaced)
    logging.warning('Config changed on resume (old config kept as %s):\n  %s', replaced,
                    difference)


def print_config(config: fdl.Buildable, experiment) -> None:
  from flax import nnx
  import jax

  print('\n'.join(cli.flat_lines(config, with_source=_PROVENANCE.value)))
  print(f'# derived: latent_shape = {experiment.latent_shape}; network.input_size = '
        f'{experiment.latent_shape[0]}, network.in_channels = {experiment.latent_shape[2]}, '
        f'network.num_classes = {experiment.data.num_classes}')
  abstract = nnx.eval_shape(experiment.make_network)
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  print(f'# network parameters: {count:,} (computed abstractly)')


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the run log (warnings still pass)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from lib import distributed
  from lib.experiment import ConfigError

  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

  try:
    config = resolve_config()
    if _RENDER.value or _DIFF_AGAINST.value or _EXPORT_PYTHON.value:
      return review_config(config)
    experiment = fdl.build(config)
    if _PRINT_CONFIG.value:
      print_config(config, experiment)
      return 0
    if _WORKDIR.value and _MODE.value == 'train':
      check_saved_config(config, _WORKDIR.value)
  except (cli.UsageError, ConfigError) as e:
    # Our messages name the values; Fiddle's appended dump of the root's arguments is noise.
    print(f'error: {str(e).split(chr(10) * 2 + "Fiddle context:")[0]}', file=sys.stderr)
    return 2
  if not _WORKDIR.value:
    print('error: --workdir is required to train or sample', file=sys.stderr)
    return 2
  from lib import train
  import jax

  if _MODE.value == 'sample':
    labels = [int(label) for label in _LABELS.value] if _LABELS.value else None
    try:
      train.sample(experiment, _WORKDIR.value, _NUM_SAMPLES.value, labels, _GUIDANCE.value,
                   _SAMPLE_SEED.value)
    except (FileNotFoundError, ValueError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    return 0
  if _MODE.value == 'eval':
    from lib.eval import standalone
    try:
      standalone.evaluate(experiment, _WORKDIR.value)
    except (FileNotFoundError, ValueError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    return 0
  # Every process has compared the saved config (check_saved_config) before process 0
  # replaces it.
  distributed.barrier('config checked')
  if jax.process_index() == 0:
    cli.write_config(config, _WORKDIR.value)
  step = train.train(experiment, _WORKDIR.value)
  logging.info('Stopped at step %d of %d.', step, experiment.total_steps)
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=absl_flags.flags_parser)
