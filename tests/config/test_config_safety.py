"""A config file is data: loading a saved config refuses every reference that could run code
(lib/config/references.py), names the node and the symbol, and runs nothing; every preset still
saves and loads."""

import importlib
import json
import os
import re

import fiddle as fdl
import pytest
from fiddle.experimental import serialization

from lib import errors
from lib.config import REPO_ROOT, presets, references, saved
from tests.conftest import launch

# (module, name) of each reference a hostile config.json could make. Each would run code or touch
# files when the graph is built, or reach such a thing through a module or a re-export.
ATTACKS = [
    ('builtins', 'eval'), ('builtins', 'exec'), ('builtins', 'compile'), ('builtins', '__import__'),
    ('builtins', 'getattr'), ('builtins', 'setattr'), ('builtins', 'open'), ('builtins', 'globals'),
    ('builtins', 'type'), ('builtins', 'breakpoint'), ('os', 'system'), ('posix', 'system'),
    ('subprocess', 'run'), ('importlib', 'import_module'), ('pickle', 'loads'),
    ('shutil', 'rmtree'), ('sys', 'exit'), ('runpy', 'run_path'), ('ctypes', 'CDLL'),
    ('marshal', 'loads'), ('code', 'InteractiveInterpreter'), ('functools', 'partial'),
    ('operator', 'attrgetter'),
    ('lib', 'paths.os.system'), ('lib.paths', 'os.system'), ('lib.paths', 'os'),
    ('lib.config.presets', 'importlib.import_module'), ('lib.config.presets', 'load_preset'),
    ('lib.hooks', 'paths.write_atomic'), ('lib.paths', 'write_atomic'),
    ('lib.workdir', 'subprocess.run'), ('experiments.legacy.config_files', 'runpy.run_path'),
    ('lib.hooks', 'np.load'), ('lib.ema', 'jnp.load'), ('lib.models.dit', 'DiT.__init__'),
    ('lib', '__builtins__'), ('lib.models.dit', 'DiT.__init__.__globals__'),
    ('numpy', 'load'), ('numpy', 'memmap'), ('numpy', 'ctypeslib.load_library'),
    ('numpy.lib.format', 'read_array'), ('numpy.f2py', 'run_main'), ('jax.numpy', 'load'),
    ('jax', 'pure_callback'), ('jax.experimental', 'io_callback'), ('jax.debug', 'callback'),
    ('flax', 'io.rmtree'), ('fiddle', 'build'),
    ('fiddle._src.experimental.serialization', 'load_json'),
    ('lib.eval.fid', 'pickle.loads'), ('lib.tracking', 'os.system'),
    ('lib.hooks', 'drop_rows_after'), ('lib.hooks', 'Writers.create'),
    ('lib.eval.digits_classifier', 'save'), ('lib.checkpoint', 'save'),
]
# What writes files in lib/ and experiments/: each such module must be refused (PLUMBING) or
# have its functions refused (WRITING).
WRITES = re.compile(r'write_atomic|write_bytes|write_text|unlink|rmtree|\.rename\(|os\.replace|'
                    r'savez|shutil|\.mkdir\(|open\([^)]*[\'"][wa]b?[\'"]|AppendLog\(')


def placeholder(source):
  """The injected node's callable in the JSON, replaced there by each attack's reference."""


def code(marker) -> str:
  """Python that leaves `marker` behind if anything runs it."""
  return f"open({os.fspath(marker)!r}, 'w').write('ran')"


def hostile_json(marker, module: str, name: str, kind=fdl.Config) -> str:
  """A real saved config (the digits preset's config.json) with one node injected at
  `network.class_dropout_prob`: `kind[module.name]` called with `code(marker)`."""
  config = presets.load_preset('experiments/dit.py:digits')
  config.network.class_dropout_prob = kind(placeholder, code(marker))
  document = json.loads(saved.dump_config(config))
  injected = {'type': 'pyref', 'module': placeholder.__module__, 'name': placeholder.__name__}

  def inject(value):
    if value == injected:
      return {'type': 'pyref', 'module': module, 'name': name}
    if isinstance(value, dict):
      return {key: inject(child) for key, child in value.items()}
    return [inject(child) for child in value] if isinstance(value, list) else value

  return json.dumps(inject(document))


class Everything(serialization.PyrefPolicy):
  def allows_import(self, module, symbol):
    return True

  def allows_value(self, value):
    return True


@pytest.mark.parametrize('kind', [fdl.Config, fdl.Partial])
def test_the_injected_payload_is_live_without_the_policy(tmp_path, kind):
  """What the tests below refuse would run: built under a policy that allows everything, the
  injected node writes the marker."""
  marker = tmp_path / 'marker'
  config = serialization.load_json(hostile_json(marker, 'builtins', 'exec', kind),
                                   pyref_policy=Everything())
  built = fdl.build(config.network.class_dropout_prob)
  if kind is fdl.Partial:
    built()
  assert marker.read_text() == 'ran'


@pytest.mark.parametrize('module,name', ATTACKS, ids=[f'{m}.{n}' for m, n in ATTACKS])
def test_a_config_file_that_refers_to_code_is_refused(tmp_path, module, name):
  marker = tmp_path / 'marker'
  file = tmp_path / 'config.json'
  file.write_text(hostile_json(marker, module, name))
  with pytest.raises(errors.UsageError) as refusal:
    saved.load_config_file(str(file))
  message = str(refusal.value)
  assert f'{module}.{name}, which a config file may not use' in message, message
  assert 'network.class_dropout_prob' in message
  assert '\n' not in message
  assert not marker.exists()


@pytest.mark.parametrize('module,name', [('builtins', 'exec'), ('subprocess', 'run'),
                                         ('lib', 'paths.os.system')])
def test_a_partial_or_a_bare_reference_to_code_is_refused(tmp_path, module, name):
  marker = tmp_path / 'marker'
  for text in (hostile_json(marker, module, name, kind=fdl.Partial),
               saved.dump_config(fdl.Config(dict, run=placeholder)).replace(
                   f'"module": "{placeholder.__module__}"', f'"module": "{module}"').replace(
                       '"name": "placeholder"', f'"name": "{name}"')):
    assert f'"{name}"' in text
    (tmp_path / 'config.json').write_text(text)
    with pytest.raises(errors.UsageError, match=f'refers to {module}.{name}'):
      saved.load_config_file(str(tmp_path))
  assert not marker.exists()


def test_every_module_that_writes_files_is_listed():
  for folder in ('lib', 'experiments'):
    for root, _, names in os.walk(os.path.join(REPO_ROOT, folder)):
      for name in names:
        path = os.path.join(root, name)
        if not name.endswith('.py') or not WRITES.search(open(path).read()):
          continue
        module = os.path.relpath(path[:-3], REPO_ROOT).replace(os.sep, '.').removesuffix(
            '.__init__')
        assert references._within(module, references.PLUMBING + references.WRITING), module


@pytest.mark.parametrize('text', [
    '{"root": 5}', '[]', '{"root": {"type": "weird"}, "objects": {}}',
    '{"root": {"type": "ref", "key": "missing"}, "objects": {}}',
    '{"root": {"type": {"type": "pyref", "module": "builtins", "name": "dict"}}}',
    '{"root": {"type": "pyref", "module": 5, "name": null}}', '[' * 100_000 + ']' * 100_000,
    '{"root": {"type": "leaf", "value": 1}, "provenance": {"x": [1]}}'])
def test_a_malformed_config_file_is_one_message(tmp_path, text):
  (tmp_path / 'config.json').write_text(text)
  with pytest.raises(errors.UsageError, match='not a Fiddle JSON config|may not use') as refusal:
    saved.load_config_file(str(tmp_path))
  assert '\n' not in str(refusal.value) and str(tmp_path) in str(refusal.value)


def test_an_unreachable_object_is_checked_too(tmp_path):
  document = json.loads(saved.dump_config(presets.load_preset('experiments/dit.py:digits')))
  document['objects']['spare'] = {'type': 'pyref', 'module': 'os', 'name': 'system'}
  (tmp_path / 'config.json').write_text(json.dumps(document))
  with pytest.raises(errors.UsageError, match=r'objects\.spare refers to os\.system'):
    saved.load_config_file(str(tmp_path))


def test_provenance_entries_naming_no_argument_are_skipped(tmp_path):
  config = presets.load_preset('experiments/dit.py:digits')
  document = json.loads(saved.dump_config(config))
  document['provenance'].update({'network.__class__': ['x.py', 1, 'f'],
                                 'network.__fn_or_cls__.__init__': ['x.py', 1, 'f'],
                                 'no.such.path': ['x.py', 1, 'f'], '[': 7})
  (tmp_path / 'config.json').write_text(json.dumps(document))
  assert saved.load_config_file(str(tmp_path)) == config


def test_a_missing_class_is_one_message_naming_the_node(tmp_path):
  text = saved.dump_config(presets.load_preset('experiments/dit.py:digits'))
  (tmp_path / 'config.json').write_text(text.replace('"name": "DiT"', '"name": "Gone"'))
  with pytest.raises(errors.UsageError, match=r'network in objects\.\w+ refers to '
                                              r'lib\.models\.dit\.Gone, which this code cannot'):
    saved.load_config_file(str(tmp_path))


PRESETS = [(path, name) for path in presets.preset_files()
           for name in presets.presets_of(importlib.import_module(presets.module_name(path)))]


@pytest.mark.parametrize('path,name', PRESETS)
def test_every_preset_saves_and_loads_under_the_policy(tmp_path, path, name):
  for fiddler in (None, 'tiny', 'bf16'):
    config = presets.load_preset(f'{path}:{name}')
    if fiddler:
      config = presets.apply_fiddler(config, fiddler)
    saved.write_config(config, str(tmp_path))
    assert saved.load_config_file(str(tmp_path)) == config
    assert {(p['module'], p['name']) for _, p in references.references(
        json.loads((tmp_path / 'config.json').read_text()))} >= {
            ('fiddle._src.config', 'Config'), ('builtins', 'tuple')}


def _refused_in_one_line(result, marker):
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  errors_printed = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors_printed) == 1 and 'builtins.eval' in errors_printed[0], result.stderr
  assert 'network.class_dropout_prob' in errors_printed[0]
  assert not marker.exists()


@pytest.mark.slow
def test_print_config_of_a_hostile_config_file_runs_nothing(tmp_path):
  marker = tmp_path / 'marker'
  (tmp_path / 'x.json').write_text(hostile_json(marker, 'builtins', 'eval'))
  _refused_in_one_line(launch(f'--fdl_config_file={tmp_path}/x.json', '--print_config'), marker)


@pytest.mark.slow
def test_sampling_a_workdir_with_a_hostile_config_runs_nothing(tmp_path):
  marker, workdir = tmp_path / 'marker', tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(hostile_json(marker, 'builtins', 'eval'))
  _refused_in_one_line(launch('--mode=sample', f'--workdir={workdir}'), marker)
  assert os.listdir(workdir) == ['config.json']  # no lock, nothing set aside
