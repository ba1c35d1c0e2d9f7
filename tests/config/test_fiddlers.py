"""Fiddle's command-line pieces that launch.py applies: --fiddler (experiments/fiddlers.py and
any module), --fdl_tags_set, and creating a node below a None field with --fdl_set."""

import importlib

import fiddle as fdl
import jax
import pytest
from flax import nnx

from lib import errors, hooks
from lib.config import overrides, presets, values
from tests.conftest import launch


class ImageSize(fdl.Tag):
  """The data's image size (a tag for the tests)."""


def digits() -> fdl.Config:
  return presets.load_preset('experiments/dit.py:digits')


def test_fiddlers_by_name_file_and_module_apply_in_order():
  config = digits()
  for spec in ('tiny', 'tiny(total_steps=40, batch_size=4)', 'experiments/fiddlers.py:bf16'):
    config = presets.apply_fiddler(config, spec)
  assert (config.network.hidden_size, config.network.depth, config.network.num_heads) == \
      (64, 2, 2)
  assert (config.total_steps, config.data.batch_size, config.checkpoint.save_interval_steps) == \
      (40, 4, 20)
  assert config.network.dtype == 'bfloat16'
  assert values.value_source(config.network, 'hidden_size') == \
      '--fiddler=tiny(total_steps=40, batch_size=4)'
  other = presets.apply_fiddler(digits(), 'experiments.fiddlers:bf16')
  assert other.network.dtype == 'bfloat16' and other.network.depth == 4


def test_a_fiddler_may_return_a_new_config(tmp_path, monkeypatch):
  (tmp_path / 'my_fiddlers.py').write_text(
      'import copy\n'
      'def longer(config, steps=7):\n'
      '  config = copy.deepcopy(config)\n'
      '  config.total_steps = steps\n'
      '  return config\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  original = digits()
  changed = presets.apply_fiddler(original, 'my_fiddlers:longer(steps=9)')
  assert changed.total_steps == 9 and original.total_steps == 2000


@pytest.mark.parametrize('spec,message', [
    ('nope', "experiments.fiddlers has no fiddler 'nope'; its fiddlers: bf16, digits, tiny"),
    ('tiny(steps=3)', 'experiments.fiddlers:tiny does not take these arguments'),
    ('experiments/nope.py:tiny', "--fiddler: no file 'experiments/nope.py'"),
    ('no_such_module:tiny', "cannot import 'no_such_module'"),
    ('tiny extra', "--fiddler='tiny extra': expected NAME"),
])
def test_fiddler_errors_name_what_exists(spec, message):
  with pytest.raises(errors.UsageError, match=message.replace('(', r'\(').replace(')', r'\)')):
    presets.apply_fiddler(digits(), spec)


@pytest.mark.parametrize('path', presets.preset_files())
def test_tiny_shrinks_every_preset(path):
  module = importlib.import_module(presets.module_name(path))
  for name in presets.presets_of(module):
    config = presets.apply_fiddler(presets.load_preset(f'{path}:{name}'), 'tiny')
    experiment = fdl.build(config)
    params = nnx.state(nnx.eval_shape(experiment.make_network), nnx.Param)
    count = sum(x.size for x in jax.tree.leaves(params))
    assert count < 3_000_000, (name, count)
    assert experiment.total_steps == 20 and experiment.data.batch_size == 8


def test_tags_set_every_tagged_field_with_type_checks():
  config = digits()
  fdl.add_tag(config.data, 'image_size', ImageSize)
  overrides.apply_tag_override(config, 'ImageSize=16')
  assert config.data.image_size == 16
  assert values.value_source(config.data, 'image_size') == '--fdl_tags_set=ImageSize=16'
  overrides.apply_tag_override(config, f'{ImageSize.name}=12')  # module-qualified, as Fiddle's flag
  assert config.data.image_size == 12
  with pytest.raises(errors.UsageError, match=rf'--fdl_tags_set: {ImageSize.name} expects int, '
                                           r'got 2\.5'):
    overrides.apply_tag_override(config, 'ImageSize=2.5')
  with pytest.raises(errors.UsageError, match=r"no field is tagged 'Size'; tags of this config: "
                                           + ImageSize.name):
    overrides.apply_tag_override(config, 'Size=3')
  with pytest.raises(errors.UsageError, match=r'this config has no tags; set fields with '
                                           r'--fdl_set=PATH=VALUE'):
    overrides.apply_tag_override(digits(), 'ImageSize=3')


def test_a_field_below_a_none_node_says_how_to_create_it():
  config = digits()
  overrides.apply_override(config, 'profile=None')
  with pytest.raises(errors.UsageError, match=(
      r"profile is None, so profile\.num_profile_steps does not exist; create the Profile node "
      r"first: --fdl_set='profile=Profile\(num_profile_steps=\.\.\.\)' \(Profile fields: "
      r'num_profile_steps, first_profile')):
    overrides.apply_override(config, 'profile.num_profile_steps=5')
  overrides.apply_override(config, 'profile=Profile(num_profile_steps=3)')
  overrides.apply_override(config, 'profile.first_profile=2')
  assert fdl.build(config).profile.num_profile_steps == 3
  assert values.value_source(config.profile, 'num_profile_steps') == \
      '--fdl_set=profile=Profile(num_profile_steps=3)'
  for assignment, message in (
      ('profile=SampleGrid()', 'profile holds a Profile node, not SampleGrid'),
      ('profile=Profile(steps=3)', "Profile has no field 'steps'; its fields: "
                                   'num_profile_steps'),
      ('profile=Profile(num_profile_steps=2.5)', 'profile.num_profile_steps expects int'),
      ('visualize=Profile()', 'visualize holds a SampleGrid node, not Profile'),
      ('profile=5', "profile is a Profile node; set one of its fields")):
    with pytest.raises(errors.UsageError, match=message.replace('(', r'\(').replace(')', r'\)')):
      overrides.apply_override(config, assignment)
  overrides.apply_override(config, 'visualize=None')
  with pytest.raises(errors.UsageError, match=r"visualize holds a SampleGrid node or None, not 5; "
                                           r"e\.g\. --fdl_set='visualize=SampleGrid\(\)'"):
    overrides.apply_override(config, 'visualize=5')
  overrides.apply_override(config, 'visualize=SampleGrid(every_steps=5)')
  assert fdl.build(config).visualize.every_steps == 5


def test_every_preset_carries_a_profile_node():
  for path in presets.preset_files():
    module = importlib.import_module(presets.module_name(path))
    for name in presets.presets_of(module):
      profile = presets.load_preset(f'{path}:{name}').profile
      assert isinstance(profile, fdl.Config) and fdl.get_callable(profile) is hooks.Profile, name


@pytest.mark.slow
def test_launch_applies_fiddle_flags_and_rejects_misuse(tmp_path):
  result = launch('--fdl_config=experiments/dit.py:digits', '--fiddler=tiny',
                  '--fdl_set=profile.num_profile_steps=3', '--print_config')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert 'network.hidden_size = 64' in lines and 'profile.num_profile_steps = 3' in lines
  for args, message in (
      (['--fdl_tags_set=ImageSize=3'], 'error: --fdl_tags_set: no field is tagged'),
      (['--fiddler=tiny(steps=1)'], 'error: experiments.fiddlers:tiny does not take'),
      ([f'--workdir={tmp_path}', '--step=2'], 'error: --step=2 chooses the checkpoint of '
                                              '--mode=sample or --mode=eval'),
      ([f'--workdir={tmp_path}', '--mode=sample', '--step=2'], 'error: no checkpoint in')):
    result = launch('--fdl_config=experiments/dit.py:digits', *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
  result = launch('--config=tests/legacy_configs/dit_imagenet.py:imagenet_64-B_2',
                  '--print_config')
  assert result.returncode == 0, result.stderr
  assert 'data = Config[lib.data.prepared.PreparedImages]' in result.stdout
  assert 'encoder = Config[lib.encoders.pixels.PixelEncoder]' in result.stdout
