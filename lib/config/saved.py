"""A run's saved config: written into its workdir, read back, compared on resume.

    write_config(config, workdir)          # config.json, config.txt, effective.json
    load_config_file('run/config.json')    # Fiddle JSON, imports restricted to the project
    saved_values('run')                    # the effective values a run saved (effective.json)
    dump_config(config)                    # Fiddle JSON with each argument's provenance
"""

import json
import os

import fiddle as fdl
from fiddle import history
from fiddle.experimental import serialization

from lib import paths
from lib.config import overrides, values
from lib.errors import UsageError

EFFECTIVE = 'effective.json'  # beside config.json: the values the run used, defaults included


class ProjectImports(serialization.PyrefPolicy):
  """Lets a config file import only from this project and the libraries its graphs use."""
  ALLOWED = ('lib', 'experiments', 'fiddle', 'jax', 'flax', 'optax', 'numpy', 'builtins',
             'orbax', 'clu')

  def allows_import(self, module: str, symbol: str) -> bool:
    return module.split('.')[0] in self.ALLOWED

  def allows_value(self, value) -> bool:
    return True


def dump_config(config: fdl.Buildable) -> str:
  """Fiddle JSON of `config`, plus, under 'provenance', where each argument was set (Fiddle's
  history, which its JSON leaves out): `{"network.depth": [FILE, LINE, FUNCTION], ...}`."""
  result = json.loads(serialization.dump_json(config))
  result['provenance'] = _set_locations(config)
  return json.dumps(result, indent=2)


def _set_locations(config: fdl.Buildable) -> dict[str, list]:
  """Path of each argument set in `config` -> [filename, line, function] of its last setting."""
  locations = {}

  def walk(node, path):
    if isinstance(node, fdl.Buildable):
      for name, value in node.__arguments__.items():
        entries = node.__argument_history__.get(name)
        if entries:
          location = entries[-1].location
          locations[values.format_path(path + [name])] = [
              location.filename, location.line_number, location.function_name]
        walk(value, path + [name])
    elif isinstance(node, (list, tuple)):
      for index, value in enumerate(node):
        walk(value, path + [index])

  walk(config, [])
  return locations


def _restore_locations(config: fdl.Buildable, locations: dict[str, list]) -> None:
  """Records each saved location as its argument's latest setting (dump_config's inverse)."""
  for path, (filename, line, function) in locations.items():
    *parents, name = overrides.parse_path(path)
    node = config
    for part in parents:
      node = node[part] if isinstance(part, int) else getattr(node, part)
    with history.custom_location(lambda: history.Location(filename, line, function)):
      setattr(node, name, getattr(node, name))


def load_config_file(path, what: str = '--fdl_config_file') -> fdl.Buildable:
  """A config saved by a run (`WORKDIR/config.json`, local or in a bucket)."""
  file = paths.resolve(path, what)
  if file.is_dir():
    file, path = file / 'config.json', f'{os.fspath(path).rstrip("/")}/config.json'
  if not file.is_file():
    raise UsageError(f'no config file {os.fspath(path)!r}; a run saves its config as '
                     'WORKDIR/config.json')
  text = file.read_text()
  try:
    config = serialization.load_json(text, pyref_policy=ProjectImports())
  except serialization.PyrefPolicyError as e:
    raise UsageError(f'{path} refers to code outside the project and its libraries ({e}); '
                     f'only modules under {", ".join(ProjectImports.ALLOWED)} may be '
                     f'imported from a config file') from None
  except (ValueError, KeyError, TypeError) as e:
    raise UsageError(f'{path} is not a Fiddle JSON config: {e}') from None
  _restore_locations(config, json.loads(text).get('provenance', {}))
  return config


def saved_values(path, what: str = '--diff_against') -> dict:
  """The effective values of a saved run (RUN_DIR or RUN_DIR/config.json): the
  `EFFECTIVE` file it wrote beside its config, or for a run without one, those of its
  config.json under the defaults of the code as it is now."""
  given = paths.resolve(path, what)
  folder = given if given.is_dir() else given.parent
  effective = folder / EFFECTIVE
  if (given.is_dir() or given.name == 'config.json') and effective.is_file():
    try:
      return json.loads(effective.read_text())
    except json.JSONDecodeError as e:
      raise UsageError(f'{effective} is not the JSON a run writes ({e}); delete it to '
                       f'compare with {folder}/config.json instead') from None
  return values.effective_values(load_config_file(path, what))


def normalized(config: fdl.Buildable) -> fdl.Buildable:
  """The config as it would load from its saved JSON (round-trip checks)."""
  return serialization.load_json(dump_config(config), pyref_policy=ProjectImports())


def write_config(config: fdl.Buildable, workdir) -> None:
  """The resolved config as Fiddle JSON (reloadable; only what presets and flags set), as text
  with provenance and defaults, and its effective values (`effective_values`, compared when
  the run resumes), into `workdir/config.json`, `config.txt` and `effective.json`
  (launch.py); each written atomically (`paths.write_atomic`)."""
  folder = paths.resolve(workdir, '--workdir')
  folder.mkdir(parents=True, exist_ok=True)
  printout = '\n'.join(values.flat_lines(config, with_source=True)) + '\n'
  for name, text in (('config.json', dump_config(config)), ('config.txt', printout),
                     (EFFECTIVE, json.dumps(values.effective_values(config), indent=1) + '\n')):
    paths.write_atomic(folder / name, text)
