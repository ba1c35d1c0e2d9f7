"""A run's saved config: written into its workdir, read back, compared on resume.

    write_config(config, workdir)          # config.json, config.txt, effective.json
    load_config_file('run/config.json')    # Fiddle JSON; what it may import: lib.config.references
    saved_values('run')                    # the effective values a run saved (effective.json)
    dump_config(config)                    # Fiddle JSON with each argument's provenance
"""

import json
import os

import fiddle as fdl
from fiddle import history
from fiddle.experimental import serialization

from lib import paths
from lib.config import overrides, references, values
from lib.errors import UsageError

EFFECTIVE = 'effective.json'  # beside config.json: the values the run used, defaults included


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


def _restore_locations(config: fdl.Buildable, locations) -> None:
  """Records each saved location as its argument's latest setting (dump_config's inverse);
  entries (read from a file) that name no argument set in `config` are skipped."""
  for path, location in locations.items() if isinstance(locations, dict) else ():
    node, name = _argument_owner(config, path)
    if node is not None and isinstance(location, list) and len(location) == 3:
      filename, line, function = location
      with history.custom_location(lambda: history.Location(filename, line, function)):
        setattr(node, name, node.__arguments__[name])


def _argument_owner(config: fdl.Buildable, path) -> tuple[fdl.Buildable | None, str | None]:
  """The node holding the argument at `path` ('network.depth') and the argument's name,
  walking only arguments and list indices; (None, None) if there is none."""
  try:
    *parents, name = overrides.parse_path(path)
  except (UsageError, TypeError, ValueError):
    return None, None
  node = config
  for part in parents:
    if isinstance(node, fdl.Buildable) and part in node.__arguments__:
      node = node.__arguments__[part]
    elif isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node):
      node = node[part]
    else:
      return None, None
  if isinstance(node, fdl.Buildable) and name in node.__arguments__:
    return node, name
  return None, None


def load_config_file(path, what: str = '--fdl_config_file') -> fdl.Buildable:
  """A config saved by a run (`WORKDIR/config.json`, local or in a bucket). It is data:
  loading it imports only what `lib.config.references` allows, and runs no code."""
  file = paths.resolve(path, what)
  if file.is_dir():
    file, path = file / 'config.json', f'{os.fspath(path).rstrip("/")}/config.json'
  if not file.is_file():
    raise UsageError(f'no config file {paths.shown(path)}; a run saves its config as '
                     'WORKDIR/config.json')
  name, text = os.fspath(path), file.read_text()
  try:
    document = json.loads(text)
    if not isinstance(document, dict):
      raise ValueError('not a JSON object')
    references.check_document(document)
    config = serialization.load_json(text, pyref_policy=references.ProjectImports())
  except references.Refused as e:
    raise UsageError(f'{name}: {e.where or "a node"} refers to {e.module}.{e.name}, which a '
                     f'config file may not use ({e.reason}); a config file is data and may '
                     f'refer only to {references.ALLOWED}') from None
  except references.Missing as e:
    raise UsageError(f'{name}: {e.where} refers to {e.module}.{e.name}, which this code cannot '
                     f'import ({e.reason}); was it written by another version?') from None
  except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError,
          serialization.DeserializationError) as e:
    raise UsageError(f'{name} is not a Fiddle JSON config: {type(e).__name__}: {e}') from None
  if not isinstance(config, fdl.Buildable):
    raise UsageError(f'{name} is not a Fiddle JSON config: its root is a '
                     f'{type(config).__name__}, not a fdl.Config')
  _restore_locations(config, document.get('provenance', {}))
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
  return serialization.load_json(dump_config(config),
                                 pyref_policy=references.ProjectImports())


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
