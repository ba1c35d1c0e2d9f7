"""Looking at graphs before running them: render, provenance, diff, relaunch, export."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from lib import cli, review


def launch(*args, cwd=cli.REPO_ROOT):
  return subprocess.run([sys.executable, os.path.join(cli.REPO_ROOT, 'launch.py'), *args],
                        capture_output=True, text=True, cwd=cwd, timeout=600)


MAIN_COMPONENTS = ['Experiment', 'Digits', 'PixelEncoder', 'DiT', 'SiT', 'adamw', 'EMA', 'Heun',
                   'Checkpointing']


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
  config = cli.load_preset('experiments/dit.py:digits')
  warning = review.render(config, str(tmp_path / 'graph.svg'))
  assert 'apt-get install graphviz' in warning
  dot = (tmp_path / 'graph.dot').read_text()
  assert dot.startswith('digraph') or dot.startswith('graph')
  for name in MAIN_COMPONENTS:
    assert name in dot, name


def test_shared_nodes_are_drawn_once(tmp_path):
  config = cli.load_preset('experiments/dit.py:digits')
  config.evaluate = [config.visualize, config.visualize]  # one node reached by three paths
  review.render(config, str(tmp_path / 'shared.dot'))
  dot = (tmp_path / 'shared.dot').read_text()
  assert dot.count('SampleGrid') == 1
  node = re.findall(r'^\t(\d+) \[label=', dot[:dot.index('SampleGrid')], re.M)[-1]
  assert len(re.findall(rf' -- {node}:c\b', dot)) == 3  # visualize, evaluate[0], [1]
  page = review.html_tree(config)
  assert page.count('Config[lib.hooks.SampleGrid]') == 1 and page.count('shared with') == 2


def test_html_tree_is_foldable_with_sources(tmp_path):
  result = launch('--fdl_config=experiments/dit.py:digits', f'--render={tmp_path}/graph.html')
  assert result.returncode == 0, result.stderr
  page = (tmp_path / 'graph.html').read_text()
  assert page.count('<details') > 10 and 'Partial[lib.models.dit.DiT]' in page
  assert 'network.depth = 4' in page and 'experiments/dit.py:' in page


def test_provenance_points_at_the_source_of_each_value():
  result = launch('--fdl_config=experiments/dit.py:digits', '--print_config', '--provenance',
                  '--fdl_set=sampler.num_steps=9')
  assert result.returncode == 0, result.stderr
  lines = {line.split(' = ')[0]: line for line in result.stdout.splitlines() if ' = ' in line}
  dit_source = open(os.path.join(cli.REPO_ROOT, 'experiments/dit.py')).read().splitlines()
  depth_line = next(i + 1 for i, text in enumerate(dit_source) if 'network.depth = 4' in text)
  assert lines['network.depth'].endswith(f'# experiments/dit.py:{depth_line} (digits)')
  assert '# experiments/common.py:' in lines['network.mlp_ratio']  # a shared building block
  assert lines['network.mlp_ratio'].endswith('(dit_network)')
  assert lines['sampler.num_steps'].endswith('# --fdl_set=sampler.num_steps=9')


def test_diff_of_b2_against_xl2_lists_exactly_the_size_fields():
  result = launch('--fdl_config=experiments/dit.py:b2', '--diff_against=experiments/dit.py:xl2')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == ['network.depth: 28 -> 12',
                                        'network.hidden_size: 1152 -> 768',
                                        'network.num_heads: 16 -> 12']


@pytest.mark.skipif(shutil.which('dot') is None, reason='graphviz `dot` is not installed')
def test_rendered_diff(tmp_path):
  result = launch('--fdl_config=experiments/dit.py:b2', '--diff_against=experiments/dit.py:xl2',
                  f'--render={tmp_path}/diff.svg')
  assert result.returncode == 0, result.stderr
  svg = (tmp_path / 'diff.svg').read_text()
  assert '768' in svg and '1152' in svg


def test_relaunch_from_a_saved_config_equals_the_original(tmp_path):
  config = cli.load_preset('experiments/dit.py:digits')
  cli.apply_override(config, 'network.depth=2')
  (tmp_path / 'config.json').write_text(review.dump_config(config))
  assert review.load_config_file(str(tmp_path / 'config.json')) == config
  # in a fresh process, with one more override on top: exactly that override differs
  result = launch(f'--fdl_config_file={tmp_path}/config.json', '--fdl_set=seed=5',
                  f'--diff_against={tmp_path}')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == ['seed: 0 -> 5']
  result = launch(f'--fdl_config_file={tmp_path}/config.json', f'--diff_against={tmp_path}')
  assert result.stdout.strip() == '# no difference'


def test_a_saved_config_keeps_where_each_value_was_set(tmp_path):
  config = cli.load_preset('experiments/dit.py:digits')
  cli.apply_override(config, 'network.depth=2')
  cli.write_config(config, str(tmp_path))
  printed = cli.flat_lines(config, with_source=True)
  assert 'network.depth = 2  # --fdl_set=network.depth=2' in printed
  assert cli.flat_lines(review.load_config_file(str(tmp_path)), with_source=True) == printed


def test_config_files_may_only_import_the_project_and_its_libraries(tmp_path):
  config = json.loads(review.dump_config(cli.load_preset('experiments/dit.py:digits')))
  text = json.dumps(config).replace('"module": "lib.models.dit"', '"module": "os"').replace(
      '"name": "DiT"', '"name": "system"')
  (tmp_path / 'config.json').write_text(text)
  result = launch(f'--fdl_config_file={tmp_path}/config.json', '--print_config')
  assert result.returncode == 2
  assert 'refers to code outside the project' in result.stderr


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
  bookkeeping = launch(*tiny, '--fdl_set=checkpoint.max_to_keep=1')  # observation only
  assert bookkeeping.returncode == 0, bookkeeping.stderr
  accepted = launch(*tiny, '--fdl_set=optimizer.learning_rate=0.5', '--fdl_set=total_steps=3',
                    '--accept_config_change')
  assert accepted.returncode == 0, accepted.stderr
  assert any(name.startswith('config.replaced_') for name in os.listdir(tmp_path))
  assert review.load_config_file(str(tmp_path)).optimizer.learning_rate == 0.5


def test_exported_preset_rebuilds_an_equal_graph(tmp_path):
  path = tmp_path / 'my_digits.py'
  result = launch('--fdl_config=experiments/dit.py:digits', '--fdl_set=network.depth=3',
                  f'--export_python={path}')
  assert result.returncode == 0, result.stderr
  spec = importlib.util.spec_from_file_location('my_digits', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  expected = cli.load_preset('experiments/dit.py:digits')
  cli.apply_override(expected, 'network.depth=3')
  assert module.my_digits() == expected
