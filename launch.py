"""Launches an experiment graph: train, sample, or print it.

    python launch.py --fdl_config=experiments/dit.py:digits --workdir=runs/digits
    python launch.py --fdl_config=experiments/dit.py:xl2 --fdl_set=optimizer.learning_rate=2e-4 \
        --print_config
    python launch.py --fdl_config=experiments/dit.py:digits --workdir=runs/digits --mode=sample

`--fdl_set=PATH=VALUE` (repeatable, also written `--fdl.PATH=VALUE`) overrides any leaf
with a Python literal; paths and types are checked before anything runs.
"""

import logging as std_logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow (tf.data, CLU) start-up chatter

from absl import app, flags, logging
import fiddle as fdl
from fiddle import absl_flags  # registers --fdl_config, --fdl_config_file and --fdl_set
from fiddle.experimental import serialization

from lib import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, samples.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample'], 'What to do.')
_PRINT_CONFIG = flags.DEFINE_bool(
    'print_config', False, 'Print the resolved config and the parameter count, then exit.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 64, '--mode=sample: number of samples.')
_LABELS = flags.DEFINE_list('labels', None, '--mode=sample: class labels (default: all '
                            'classes in turn).')
_GUIDANCE = flags.DEFINE_float('guidance_scale', None, '--mode=sample: guidance weight '
                               '(default: sampler.guidance_scale).')
_SAMPLE_SEED = flags.DEFINE_integer('sample_seed', 0, '--mode=sample: seed of the noise.')


def resolve_config() -> fdl.Buildable:
  """The preset named by --fdl_config with every --fdl_set applied, in order."""
  spec = flags.FLAGS.fdl_config
  if not spec:
    raise cli.UsageError('--fdl_config=PATH.py:PRESET is required; preset files: '
                         + ', '.join(cli.preset_files()))
  config = cli.load_preset(spec)
  for assignment in flags.FLAGS.fdl_set:
    cli.apply_override(config, assignment)
  return config


def print_config(config: fdl.Buildable, experiment) -> None:
  from flax import nnx
  import jax

  print('\n'.join(cli.flat_lines(config)))
  print(f'# derived: latent_shape = {experiment.latent_shape}; network.input_size = '
        f'{experiment.latent_shape[0]}, network.in_channels = {experiment.latent_shape[2]}, '
        f'network.num_classes = {experiment.data.num_classes}')
  abstract = nnx.eval_shape(experiment.make_network)
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  print(f'# network parameters: {count:,} (computed abstractly)')


def write_config(config: fdl.Buildable, workdir: str) -> None:
  """The resolved config as Fiddle JSON (reloadable) and as readable text."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(serialization.dump_json(config, indent=2))
  with open(os.path.join(workdir, 'config.txt'), 'w') as f:
    f.write('\n'.join(cli.flat_lines(config)) + '\n')


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the run log (warnings still pass)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from lib.experiment import ConfigError

  try:
    config = resolve_config()
    experiment = fdl.build(config)
  except (cli.UsageError, ConfigError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if _PRINT_CONFIG.value:
    print_config(config, experiment)
    return 0
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
  if jax.process_index() == 0:
    write_config(config, _WORKDIR.value)
  step = train.train(experiment, _WORKDIR.value)
  logging.info('Stopped at step %d of %d.', step, experiment.total_steps)
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=absl_flags.flags_parser)
