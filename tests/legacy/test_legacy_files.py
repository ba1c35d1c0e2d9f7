"""diffuse_nnx config files load from the user's own checkout (lib/config_files.py): the file's
project root is importable while it runs, each checkout gets its own `configs` package, a file
that fails is one message (a known diffuse_nnx defect names its native replacement), and a
converted run's provenance names the file."""

import os
import subprocess
import sys
import types

import fiddle as fdl
import jax
import pytest
from flax import nnx

from experiments.legacy import config_files, converter
from lib.config import REPO_ROOT, overrides, saved, values
from tests.conftest import launch

FIXTURES = os.path.join(REPO_ROOT, 'tests', 'legacy_configs')
FIXTURE_IMPORT = 'from tests.legacy_configs import'

# diffuse_nnx's lightning_ddt_imagenet.py as published: it reads DiT sizes from a DDT preset.
PUBLISHED_DDT = '''import ml_collections

from configs import common_specs, lightning_dit_imagenet


def get_config(options='imagenet_256-XL_2'):
  config = lightning_dit_imagenet.get_config(options)
  size = options.split('-')[1].split('_')[0]
  network_preset = ml_collections.ConfigDict(common_specs._ddt_network_presets[size])
  config.network.hidden_size = network_preset.hidden_size
  return config
'''


def make_checkout(folder, replace: dict[str, str] | None = None) -> str:
  """A diffuse_nnx checkout: `configs/` holding the project's fixture files, importing each
  other as diffuse_nnx's do (`from configs import common_specs`); `replace` swaps the text of
  some files (name -> text)."""
  configs = os.path.join(folder, 'configs')
  os.makedirs(configs)
  for name in sorted(os.listdir(FIXTURES)):
    if name.endswith('.py'):
      with open(os.path.join(FIXTURES, name)) as f:
        text = f.read()
      assert name == 'common_specs.py' or FIXTURE_IMPORT in text, name
      with open(os.path.join(configs, name), 'w') as f:
        f.write((replace or {}).get(name, text.replace(FIXTURE_IMPORT, 'from configs import')))
  return str(folder)


@pytest.fixture(scope='module')
def checkout(tmp_path_factory):
  return make_checkout(tmp_path_factory.mktemp('diffuse_nnx'))


def parameter_count(config: fdl.Buildable) -> int:
  """The network's parameter count, as `launch.py --print_config` computes it."""
  abstract = nnx.eval_shape(fdl.build(config).make_network)
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def launch_from(folder: str, *args) -> subprocess.CompletedProcess:
  """launch.py run from `folder` as a migrating user runs it: nothing on PYTHONPATH."""
  environment = {'PATH': os.environ['PATH'], 'HOME': os.environ.get('HOME', folder),
                 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2'}
  return launch(*args, cwd=folder, env=environment, inherit_env=False)


# ------------------------------------------------------------------------------- launch.py
@pytest.mark.slow
def test_launch_converts_a_file_of_a_diffuse_nnx_checkout(checkout):
  result = launch_from(checkout, '--config=configs/dit_imagenet.py:imagenet_256-XL_2',
                       '--config.seed=3', '--print_config', '--provenance')
  assert result.returncode == 0, result.stderr
  assert '# network parameters: 674,816,272 (computed abstractly)' in result.stdout
  source = f'--config={checkout}/configs/dit_imagenet.py:imagenet_256-XL_2 --config.seed=3'
  assert f'seed = 3  # {source}' in result.stdout.splitlines()
  assert f'network.depth = 28  # {source}' in result.stdout.splitlines()


@pytest.mark.slow
def test_launch_names_the_known_diffuse_nnx_defect(tmp_path):
  folder = make_checkout(tmp_path, {'lightning_ddt_imagenet.py': PUBLISHED_DDT})
  result = launch_from(folder, '--config=configs/lightning_ddt_imagenet.py:imagenet_256-XL_2',
                       '--print_config')
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr and result.stdout == ''
  assert result.stderr.count('\n') == 1, result.stderr  # one message
  assert result.stderr.startswith(
      "error: --config=configs/lightning_ddt_imagenet.py:imagenet_256-XL_2: "
      "configs/lightning_ddt_imagenet.py: get_config('imagenet_256-XL_2') raised "
      "AttributeError: \"'hidden_size'\" (at configs/lightning_ddt_imagenet.py:10 in "
      "get_config). This is a known diffuse_nnx defect")
  assert result.stderr.rstrip().endswith(
      'the native preset replacing it is --fdl_config=experiments/lightning_ddt.py:xl2')


# ------------------------------------------------------------------------------- in-process
@pytest.mark.parametrize('spec,count', [
    ('configs/lightning_dit_imagenet.py:imagenet_256-XL_2', 675_219_856),
    ('configs/mf_imagenet.py:imagenet_256-XL_2', 676_440_592),
    ('configs/rae_imagenet.py:imagenet_raw_256-XL_1', 838_380_628),
    ('configs/dit_imagenet.py', 130_297_356),  # get_config(): the default imagenet_64-B_2
])
def test_checkout_files_convert_with_their_parameter_counts(checkout, monkeypatch, spec, count):
  monkeypatch.chdir(checkout)
  path = sys.path[:]
  config = converter.convert(config_files.load(spec))
  assert sys.path == path
  assert parameter_count(config) == count


def test_each_checkout_imports_its_own_configs_package(checkout, tmp_path, monkeypatch):
  other = make_checkout(tmp_path / 'other')
  specs = os.path.join(other, 'configs', 'common_specs.py')
  with open(specs) as f:
    text = f.read()
  with open(specs, 'w') as f:
    f.write(text.replace("'XL': dict(hidden_size=1152,", "'XL': dict(hidden_size=1024,"))
  unrelated = types.ModuleType('configs')  # a `configs` imported from elsewhere before
  unrelated.__file__ = str(tmp_path / 'elsewhere' / 'configs.py')
  monkeypatch.setitem(sys.modules, 'configs', unrelated)
  cached = lambda: {name: module for name, module in sys.modules.items()
                    if name.split('.')[0] == 'configs'}
  before = cached()
  size = lambda folder: config_files.load(
      f'{folder}/configs/dit_imagenet.py:imagenet_256-XL_2').network.hidden_size
  assert (size(checkout), size(other), size(checkout)) == (1152, 1024, 1152)
  assert cached() == before and sys.modules['configs'] is unrelated


def test_project_fixtures_load_from_any_working_directory(tmp_path, monkeypatch):
  from tests.legacy_configs import mf_imagenet

  monkeypatch.chdir(tmp_path)
  loaded = config_files.load(f'{FIXTURES}/mf_imagenet.py:imagenet_256-B_2')
  assert loaded == mf_imagenet.get_config('imagenet_256-B_2')
  assert config_files.project_root(f'{FIXTURES}/mf_imagenet.py') == REPO_ROOT


def test_project_root_is_the_folder_holding_the_imported_package(checkout, tmp_path,
                                                                  monkeypatch):
  assert config_files.project_root(f'{checkout}/configs/mf_imagenet.py') == checkout
  (tmp_path / 'flat').mkdir()
  (tmp_path / 'flat' / 'specs.py').write_text('SIZE = 3\n')
  (tmp_path / 'flat' / 'exp.py').write_text(
      'import ml_collections\nimport specs\n\n\ndef get_config():\n'
      '  return ml_collections.ConfigDict(dict(size=specs.SIZE))\n')
  assert config_files.project_root(str(tmp_path / 'flat' / 'exp.py')) == str(tmp_path / 'flat')
  assert config_files.load(str(tmp_path / 'flat' / 'exp.py')).size == 3
  # a file outside the checkout importing its `configs`: the working directory
  (tmp_path / 'mine.py').write_text('from configs import common_specs\n')
  monkeypatch.chdir(checkout)
  assert config_files.project_root(str(tmp_path / 'mine.py')) == checkout


@pytest.mark.parametrize('options,ending', [
    ('imagenet_256-S_2', '. This is a known diffuse_nnx defect: the file reads hidden_size, '
                         'depth and num_heads from the DDT size presets '
                         '(common_specs._ddt_network_presets), which hold encoder and decoder '
                         'sizes instead; the native preset replacing it is '
                         '--fdl_config=experiments/lightning_ddt.py:s2'),
    ('imagenet_512-XL_2', 'the native preset replacing it is '
                          '--fdl_config=experiments/lightning_ddt.py:xl2(image_size=512)'),
    # diffuse_nnx has no DDT preset of size B: another error, no defect named
    ('imagenet_256-B_2', "raised KeyError: 'B' (at configs/lightning_ddt_imagenet.py:9 in "
                         "get_config)"),
])
def test_known_defect_names_the_native_preset_of_the_size(tmp_path, monkeypatch, options,
                                                          ending):
  monkeypatch.chdir(make_checkout(tmp_path, {'lightning_ddt_imagenet.py': PUBLISHED_DDT}))
  with pytest.raises(config_files.LegacyFileError) as error:
    config_files.load(f'configs/lightning_ddt_imagenet.py:{options}')
  assert str(error.value).endswith(ending), str(error.value)


def test_other_failures_name_the_file_the_options_and_the_error(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'broken.py').write_text('def get_config(options):\n  return 1 / 0\n')
  (tmp_path / 'missing.py').write_text('import no_such_module\n')
  with pytest.raises(config_files.LegacyFileError) as error:
    config_files.load('broken.py:x')
  assert str(error.value) == ("--config=broken.py:x: broken.py: get_config('x') raised "
                              "ZeroDivisionError: division by zero (at broken.py:2 in "
                              "get_config)")
  with pytest.raises(config_files.LegacyFileError, match="--config=missing.py: running "
                     "missing.py raised ModuleNotFoundError: No module named 'no_such_module'"):
    config_files.load('missing.py')
  with pytest.raises(config_files.LegacyFileError, match="no file 'absent.py'"):
    config_files.load('absent.py:x')
  (tmp_path / 'empty.py').write_text('X = 1\n')
  with pytest.raises(config_files.LegacyFileError, match='empty.py defines no get_config'):
    config_files.load('empty.py')


def test_a_converted_run_records_the_file_in_its_saved_provenance(checkout, tmp_path,
                                                                   monkeypatch):
  monkeypatch.chdir(checkout)
  spec = 'configs/mf_imagenet.py:imagenet_256-B_2'
  source = config_files.source(spec, {'optimizer.b2': 0.9})
  assert source == f'--config={checkout}/{spec} --config.optimizer.b2=0.9'
  config = converter.convert(config_files.load(spec), source)
  overrides.apply_override(config, 'seed=4')
  printed = values.flat_lines(config, with_source=True)
  assert f'interface.t_mu = -0.4  # {source}' in printed
  assert 'seed = 4  # --fdl_set=seed=4' in printed
  saved.write_config(config, str(tmp_path))
  assert (tmp_path / 'config.txt').read_text().splitlines() == printed
  assert values.flat_lines(saved.load_config_file(str(tmp_path)), with_source=True) == printed
