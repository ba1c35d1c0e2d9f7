"""Looking at graphs before running them: render, provenance, diff, relaunch, export."""

import importlib.util
import inspect
import json
import os
import re
import shutil

import fiddle as fdl
import pytest

from lib import optim
from lib.config import REPO_ROOT, overrides, presets, review, saved, values
from tests.conftest import launch


MAIN_COMPONENTS = ['Experiment', 'Digits', 'PixelEncoder', 'DiT', 'SiT', 'adamw', 'EMA', 'Heun',
                   'Checkpointing']


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('dot') is None, reason='graphviz `dot` is not installed')
def test_render_svg_names_the_main_components(tmp_path):
  result = launch('--fdl_config=experiments/dit.py:digits', f'--render={tmp_path}/graph.svg')
  assert result.returncode == 0, result.stderr
  svg = (tmp_path / 'graph.svg').read_text()
  assert svg.startswith('<?xml') and '<svg' in svg
  for name in MAIN_COMPONENTS:
    assert name in svg, name


def test_render_without_dot_writes_the_source_and_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setattr(shutil, 'which', lambda name: None)
  config = presets.load_preset('experiments/dit.py:digits')
  warning = review.render(config, str(tmp_path / 'graph.svg'))
  assert 'apt-get install graphviz' in warning
  dot = (tmp_path / 'graph.dot').read_text()
  assert dot.startswith('digraph') or dot.startswith('graph')
  for name in MAIN_COMPONENTS:
    assert name in dot, name


def test_shared_nodes_are_drawn_once(tmp_path):
  config = presets.load_preset('experiments/dit.py:digits')
  config.evaluate = [config.visualize, config.visualize]  # one node reached by three paths
  review.render(config, str(tmp_path / 'shared.dot'))
  dot = (tmp_path / 'shared.dot').read_text()
  assert dot.count('SampleGrid') == 1
  node = re.findall(r'^\t(\d+) \[label=', dot[:dot.index('SampleGrid')], re.M)[-1]
  assert len(re.findall(rf' -- {node}:c\b', dot)) == 3  # visualize, evaluate[0], [1]
  page = review.html_tree(config)
  assert page.count('Config[lib.hooks.SampleGrid]') == 1 and page.count('shared with') == 2


@pytest.mark.slow
def test_html_tree_is_foldable_with_sources(tmp_path):
  result = launch('--fdl_config=experiments/dit.py:digits', f'--render={tmp_path}/graph.html')
  assert result.returncode == 0, result.stderr
  page = (tmp_path / 'graph.html').read_text()
  assert page.count('<details') > 10 and 'Partial[lib.models.dit.DiT]' in page
  assert 'network.depth = 4' in page and 'experiments/dit.py:' in page


@pytest.mark.slow
def test_provenance_points_at_the_source_of_each_value():
  result = launch('--fdl_config=experiments/dit.py:digits', '--print_config', '--provenance',
                  '--fdl_set=sampler.num_steps=9')
  assert result.returncode == 0, result.stderr
  lines = {line.split(' = ')[0]: line for line in result.stdout.splitlines() if ' = ' in line}
  # the digits demo is the `digits` fiddler on DiT-S/2
  source = open(os.path.join(REPO_ROOT, 'experiments/fiddlers.py')).read().splitlines()
  depth_line = next(i + 1 for i, text in enumerate(source) if 'network.depth = 4' in text)
  assert lines['network.depth'].endswith(f'# experiments/fiddlers.py:{depth_line} (digits)')
  assert '# experiments/common.py:' in lines['network.mlp_ratio']  # a shared building block
  assert lines['network.mlp_ratio'].endswith('(dit_network)')
  assert lines['sampler.num_steps'].endswith('# --fdl_set=sampler.num_steps=9')


@pytest.mark.slow
def test_diff_of_b2_against_xl2_lists_exactly_the_size_fields():
  result = launch('--fdl_config=experiments/dit.py:b2', '--diff_against=experiments/dit.py:xl2')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == ['network.depth: 28 -> 12',
                                        'network.hidden_size: 1152 -> 768',
                                        'network.num_heads: 16 -> 12']


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('dot') is None, reason='graphviz `dot` is not installed')
def test_rendered_diff(tmp_path):
  result = launch('--fdl_config=experiments/dit.py:b2', '--diff_against=experiments/dit.py:xl2',
                  f'--render={tmp_path}/diff.svg')
  assert result.returncode == 0, result.stderr
  svg = (tmp_path / 'diff.svg').read_text()
  assert '768' in svg and '1152' in svg


@pytest.mark.slow
def test_relaunch_from_a_saved_config_equals_the_original(tmp_path):
  config = presets.load_preset('experiments/dit.py:digits')
  overrides.apply_override(config, 'network.depth=2')
  (tmp_path / 'config.json').write_text(saved.dump_config(config))
  assert saved.load_config_file(str(tmp_path / 'config.json')) == config
  # in a fresh process, with one more override on top: exactly that override differs
  result = launch(f'--fdl_config_file={tmp_path}/config.json', '--fdl_set=seed=5',
                  f'--diff_against={tmp_path}')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == ['seed: 0 -> 5']
  result = launch(f'--fdl_config_file={tmp_path}/config.json', f'--diff_against={tmp_path}')
  assert result.stdout.strip() == '# no difference'


def test_a_saved_config_keeps_where_each_value_was_set(tmp_path):
  config = presets.load_preset('experiments/dit.py:digits')
  overrides.apply_override(config, 'network.depth=2')
  saved.write_config(config, str(tmp_path))
  printed = values.flat_lines(config, with_source=True)
  assert 'network.depth = 2  # --fdl_set=network.depth=2' in printed
  assert values.flat_lines(saved.load_config_file(str(tmp_path)), with_source=True) == printed


@pytest.mark.slow
def test_resuming_with_a_different_config_shows_the_difference_and_refuses(tmp_path):
  tiny = ['--fdl_config=experiments/dit.py:digits', '--fdl_set=network.hidden_size=16',
          '--fdl_set=network.depth=1', '--fdl_set=network.num_heads=2', '--fdl_set=total_steps=2',
          '--fdl_set=data.batch_size=8', '--fdl_set=visualize=None', '--fdl_set=evaluate=[]',
          f'--workdir={tmp_path}']
  assert launch(*tiny).returncode == 0
  changed = launch(*tiny, '--fdl_set=optimizer.learning_rate=0.5')
  assert changed.returncode == 2
  assert 'optimizer.learning_rate: 0.001 -> 0.5' in changed.stderr
  assert '--accept_config_change' in changed.stderr
  assert launch(*tiny).returncode == 0  # the same config resumes (nothing left to do)
  # The code changed a default since the run started: its effective.json says what it used.
  path, old_value, value, owner = CHANGED_DEFAULT
  effective = json.loads((tmp_path / saved.EFFECTIVE).read_text())
  assert effective[path] == {'value': value, 'default_of': owner}
  effective[path]['value'] = old_value
  (tmp_path / saved.EFFECTIVE).write_text(json.dumps(effective))
  changed_default = launch(*tiny)
  assert changed_default.returncode == 2
  assert f'{path}: {old_value} (default of {owner}) -> {value} (default of {owner})' in \
      changed_default.stderr
  effective[path]['value'] = value
  (tmp_path / saved.EFFECTIVE).write_text(json.dumps(effective))
  bookkeeping = launch(*tiny, '--fdl_set=checkpoint.max_to_keep=1')  # observation only
  assert bookkeeping.returncode == 0, bookkeeping.stderr
  accepted = launch(*tiny, '--fdl_set=optimizer.learning_rate=0.5', '--fdl_set=total_steps=3',
                    '--accept_config_change')
  assert accepted.returncode == 0, accepted.stderr
  assert any(name.startswith('config.replaced_') for name in os.listdir(tmp_path))
  assert any(name.startswith('effective.replaced_') for name in os.listdir(tmp_path))
  assert saved.load_config_file(str(tmp_path)).optimizer.learning_rate == 0.5


@pytest.mark.slow
def test_exported_preset_rebuilds_an_equal_graph(tmp_path):
  path = tmp_path / 'my_digits.py'
  result = launch('--fdl_config=experiments/dit.py:digits', '--fdl_set=network.depth=3',
                  f'--export_python={path}')
  assert result.returncode == 0, result.stderr
  spec = importlib.util.spec_from_file_location('my_digits', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  expected = presets.load_preset('experiments/dit.py:digits')
  overrides.apply_override(expected, 'network.depth=3')
  assert module.my_digits() == expected


# ------------------------------------------------------------------------------- defaults
# Arguments the digits preset leaves at their constructor defaults: (path, printed value,
# owner). A preset that starts setting one moves it out of this list.
DIGITS_DEFAULTS = [('sampler.guide_channels', 'None', 'lib.flow.samplers.Heun'),
                   ('network.learn_sigma', 'False', 'lib.models.dit.DiT'),
                   ('visualize.seed', '42', 'lib.hooks.SampleGrid')]
DIGITS_SET = ['network.depth = 4', 'ema.decay = 0.995',  # set by the preset: never marked
              'sampler.guidance_scale = 3.0']
# A default as an older version of the code had it: (path, old value, value now, owner).
CHANGED_DEFAULT = ('network.learn_sigma', 'True', 'False', 'lib.models.dit.DiT')


@pytest.mark.slow
def test_print_config_marks_defaults_and_hide_defaults_leaves_them_out():
  full = launch('--fdl_config=experiments/dit.py:digits', '--print_config')
  assert full.returncode == 0, full.stderr
  lines = full.stdout.splitlines()
  for path, value, owner in DIGITS_DEFAULTS:
    assert f'{path} = {value}  # default of {owner}' in lines
  assert all(line in lines for line in DIGITS_SET)
  assert any(line.startswith('# derived: ') for line in lines)
  assert any(line.startswith('# network parameters: ') for line in lines)
  compact = launch('--fdl_config=experiments/dit.py:digits', '--print_config', '--hide_defaults')
  assert compact.returncode == 0, compact.stderr
  lines = compact.stdout.splitlines()
  assert not [line for line in lines if 'default of' in line]
  for path, _, _ in DIGITS_DEFAULTS:
    assert not [line for line in lines if line.startswith(f'{path} = ')]
  assert all(line in lines for line in DIGITS_SET)


def test_html_tree_shows_defaults_marked(tmp_path):
  config = presets.load_preset('experiments/dit.py:digits')
  review.render(config, str(tmp_path / 'full.html'))
  page = (tmp_path / 'full.html').read_text()
  for path, value, owner in DIGITS_DEFAULTS:
    assert f'<li class="default"><code>{path} = {value}</code><span class="src">default of ' \
           f'{owner}</span></li>' in page
  review.render(config, str(tmp_path / 'compact.html'), defaults=False)
  page = (tmp_path / 'compact.html').read_text()
  assert 'default of' not in page and 'network.depth = 4' in page


def test_setting_a_default_explicitly_makes_no_difference():
  digits = presets.load_preset('experiments/dit.py:digits')
  explicit = presets.load_preset('experiments/dit.py:digits')
  for path, value, _ in DIGITS_DEFAULTS:
    overrides.apply_override(explicit, f'{path}={value}')
  assert review.diff_lines(digits, explicit) == []


@pytest.mark.slow
def test_diff_of_presets_differing_only_in_a_class_default():
  result = launch('--fdl_config=tests/presets_with_defaults.py:guided_heun',
                  '--diff_against=tests/presets_with_defaults.py:heun')
  assert result.returncode == 0, result.stderr
  guided = 'tests.presets_with_defaults.GuidedHeun'
  assert result.stdout.splitlines() == [
      f'sampler: Config[lib.flow.samplers.Heun] -> Config[{guided}]',
      f'sampler.guidance_scale: 1.0 (default of lib.flow.samplers.Heun) -> 4.0 (default of '
      f'{guided})']


def test_an_override_of_a_default_shows_the_flag_as_its_source():
  config = presets.load_preset('experiments/dit.py:digits')
  path, _, _ = DIGITS_DEFAULTS[-1]
  overrides.apply_override(config, f'{path}=5')
  assert f'{path} = 5' in values.flat_lines(config)
  assert f'{path} = 5  # --fdl_set={path}=5' in values.flat_lines(config, with_source=True)
  assert f'{path} = 5' in values.flat_lines(config, defaults=False)


def test_saved_config_keeps_only_what_was_set_and_effective_json_has_the_defaults(tmp_path):
  config = presets.load_preset('experiments/dit.py:digits')
  saved.write_config(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'config.txt', saved.EFFECTIVE]
  loaded = saved.load_config_file(str(tmp_path))
  assert loaded == config
  effective = json.loads((tmp_path / saved.EFFECTIVE).read_text())
  text = (tmp_path / 'config.txt').read_text().splitlines()
  for path, value, owner in DIGITS_DEFAULTS:
    node, name = path.split('.')
    assert name not in getattr(loaded, node).__arguments__  # not written as if a preset set it
    assert effective[path] == {'value': value, 'default_of': owner}
    assert f'{path} = {value}  # default of {owner}' in text
  assert effective['network.depth'] == {'value': '4'}
  assert saved.saved_values(str(tmp_path)) == effective == values.effective_values(config)
  os.remove(tmp_path / saved.EFFECTIVE)  # a run saved before effective.json: today's defaults
  assert saved.saved_values(str(tmp_path / 'config.json')) == effective


def _layer(width: int, rules: list = [('.*', 'data')],  # noqa: B006 (a mutable default)
           schedule=fdl.Partial(optim.cosine, warmup_steps=5), activation=optim.constant):
  """A target whose defaults are a list, a Fiddle node and a function."""
  return width, rules, schedule, activation


def test_defaults_that_are_nodes_functions_factories_or_mutable():
  owner = values.qualified_name(_layer)
  config = fdl.Config(_layer, width=3)
  assert values.flat_lines(config) == [
      'width = 3',
      f"rules = [('.*', 'data')]  # default of {owner}",
      f'schedule = Partial[lib.optim.cosine]  # default of {owner}',
      f'schedule.warmup_steps = 5  # default of {owner}',
      'schedule.min_lr = 0.0  # default of lib.optim.cosine',
      f'activation = lib.optim.constant  # default of {owner}']
  overrides.apply_override(config, 'schedule.warmup_steps=9')  # edits this config's copy
  overrides.apply_override(config, "rules[0]=('x', 'y')")
  values.with_defaults(config).schedule.min_lr = 0.5
  values.with_defaults(fdl.Config(_layer, width=1)).rules.append(('z', 'z'))
  defaults = inspect.signature(_layer).parameters
  assert defaults['schedule'].default.warmup_steps == 5
  assert defaults['schedule'].default == fdl.Partial(optim.cosine, warmup_steps=5)
  assert defaults['rules'].default == [('.*', 'data')]
  assert config.schedule.warmup_steps == 9 and config.rules == [('x', 'y')]
  experiment = presets.load_preset('experiments/dit.py:digits')
  del experiment.evaluate  # a dataclass field with a default_factory
  assert 'evaluate = []  # default of lib.experiment.Experiment' in values.flat_lines(experiment)


def test_effective_values_survive_the_saved_json_of_every_preset():
  """A resumed run compares the launched config with what it saved: reloading must not read
  as a difference."""
  for spec in [f'{path}:{name}' for path in presets.preset_files()
               for name in presets.presets_of(importlib.import_module(presets.module_name(path)))]:
    config = presets.load_preset(spec)
    assert review.diff_lines(config, saved.normalized(config)) == [], spec
