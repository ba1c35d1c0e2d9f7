"""launch.py's config handling: presets by path, checked overrides, derived values."""

import os

import fiddle as fdl
import pytest

from lib import errors
from lib.config import REPO_ROOT, overrides, presets
from lib.experiment import ConfigError
from tests.conftest import launch


@pytest.mark.slow
def test_nested_override_and_print_config():
  result = launch('--fdl_config=experiments/dit.py:b2', '--print_config',
                  '--fdl_set=optimizer.learning_rate=2e-4', '--fdl.network.depth=6',
                  '--fdl_set=sampler.num_steps=8')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert 'optimizer.learning_rate = 0.0002' in lines
  assert 'network.depth = 6' in lines
  assert 'sampler.num_steps = 8' in lines
  # B/2 with 6 of its 12 blocks: 130,303,504 - 6 * (18 * 768^2 + 15 * 768)
  assert f'# network parameters: {130_303_504 - 6 * (18 * 768 ** 2 + 15 * 768):,} ' \
         f'(computed abstractly)' in lines


@pytest.mark.slow
def test_preset_call_arguments_and_relative_paths(tmp_path):
  result = launch(f'--fdl_config={REPO_ROOT}/experiments/dit.py:s2(image_size=512)',
                  '--print_config', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert 'data.image_size = 512' in result.stdout
  assert 'network.input_size = 64' in result.stdout  # derived: 512 / 8


@pytest.mark.parametrize('args,message', [
    (['--fdl_config=experiments/nope.py:xl2'], "no file 'experiments/nope.py'; preset files: "
                                               "experiments/ddt.py, experiments/dit.py"),
    (['--fdl_config=experiments/dit.py:xl3'], "has no preset 'xl3'; its presets: b2, digits, "
                                              "dit, l2, s2, xl2"),
    (['--fdl_config=experiments/dit.py:xl2(depth=3)'], 'does not take these arguments'),
    (['--fdl_config=experiments/dit.py:xl2', '--fdl_set=network.dpeth=4'],
     "'network.dpeth' does not exist: network has no field 'dpeth'"),
    (['--fdl_config=experiments/dit.py:xl2', '--fdl_set=optimizer.learning_rate=fast'],
     "quote strings"),
    (['--fdl_config=experiments/dit.py:xl2', '--fdl_set=network.depth=2.5'],
     'network.depth expects int, got 2.5'),
    (['--fdl_config=experiments/dit.py:xl2', '--fdl_set=network.input_size=16'],
     'network.input_size=16 contradicts data.image_size=256 / encoder.downsample_factor=8 = 32'),
])
@pytest.mark.slow
def test_bad_input_fails_before_running(args, message, tmp_path):
  result = launch(*args, f'--workdir={tmp_path}/run')
  assert result.returncode == 2
  assert message in result.stderr, result.stderr
  assert not os.path.exists(tmp_path / 'run')  # nothing ran, nothing written


def test_path_errors_suggest_the_closest_paths():
  config = presets.load_preset('experiments/dit.py:digits')
  with pytest.raises(errors.UsageError, match=r'Closest existing paths: data\.image_size'):
    overrides.apply_override(config, 'data.img_size=16')
  with pytest.raises(errors.UsageError, match=r"its fields: .*hidden_size, depth"):
    overrides.apply_override(config, 'network.hiden_size=16')
  with pytest.raises(errors.UsageError, match=r'evaluate has no field 3'):
    overrides.apply_override(config, 'evaluate[3].every_steps=3')
  with pytest.raises(errors.UsageError, match='set one of its fields instead'):
    overrides.apply_override(config, 'data=3')


def test_type_checks_and_coercions():
  config = presets.load_preset('experiments/dit.py:digits')
  overrides.apply_override(config, 'optimizer.learning_rate=1')  # int -> float field
  assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate, float)
  overrides.apply_override(config, 'visualize.guidance_scales=[1, 4]')
  assert config.visualize.guidance_scales == (1.0, 4.0)
  overrides.apply_override(config, 'interface.time_dist=logit_normal')  # unquoted Literal string
  assert config.interface.time_dist == 'logit_normal'
  overrides.apply_override(config, 'optimizer.grad_clip_norm=None')
  assert config.optimizer.grad_clip_norm is None
  overrides.apply_override(config, 'evaluate[0].every_steps=7')
  assert config.evaluate[0].every_steps == 7
  for bad, message in [('network.depth=True', 'expects int, got True'),
                       ('interface.time_dist=gamma', "must be one of 'uniform', 'logit_normal'"),
                       ('network.num_heads="4"', 'expects int'),
                       ('total_steps=1e3', 'total_steps expects int, got 1000.0')]:
    with pytest.raises(errors.UsageError, match=message):
      overrides.apply_override(config, bad)


def test_override_provenance_is_the_flag():
  from fiddle import history  # noqa: F401  (history is recorded on every Buildable)
  config = presets.load_preset('experiments/dit.py:digits')
  overrides.apply_override(config, 'network.depth=3')
  entry = config.network.__argument_history__['depth'][-1]
  assert entry.location.filename == '--fdl_set=network.depth=3'


def test_derived_values_follow_overrides():
  config = presets.load_preset('experiments/dit.py:xl2')
  overrides.apply_override(config, 'data.image_size=512')
  experiment = fdl.build(config)
  assert experiment.latent_shape == (64, 64, 4)
  assert experiment.network.keywords['input_size'] == 64
  config = presets.load_preset('experiments/dit.py:digits')
  overrides.apply_override(config, 'data.image_size=16')
  assert fdl.build(config).network.keywords['input_size'] == 16


def test_inconsistent_values_name_both_sides():
  config = presets.load_preset('experiments/dit.py:xl2')
  overrides.apply_override(config, 'network.patch_size=3')
  with pytest.raises(ConfigError, match=r'network.patch_size=3 does not divide the latent size '
                                        r'32 \(data.image_size=256 / encoder.downsample_factor=8'):
    fdl.build(config)
  config = presets.load_preset('experiments/dit.py:digits')
  overrides.apply_override(config, 'network.in_channels=3')
  with pytest.raises(ConfigError, match=r'network.in_channels=3 contradicts data.channels=1'):
    fdl.build(config)
