"""What a config's values are and where they were set: constructor defaults, effective values,
provenance (Fiddle's history) and flat printouts.

    flat_lines(config)       -> ['data.batch_size = 256', ...]
    effective_values(config) -> {'sampler.guidance_scale': {'value': '1.0',
                                 'default_of': 'lib.flow.samplers.Heun'}, ...}
    value_source(node, 'depth') -> 'experiments/fiddlers.py:84 (digits)'
"""

import copy
import dataclasses
import inspect
import os
import re
from typing import Any

import fiddle as fdl
from fiddle import daglish, history

from lib.config import REPO_ROOT


def format_path(parts) -> str:
  """['evaluate', 0, 'every_steps'] -> 'evaluate[0].every_steps' (inverse of parse_path)."""
  out = ''
  for part in parts:
    out += f'[{part}]' if isinstance(part, int) else (f'.{part}' if out else part)
  return out


# ------------------------------------------------------------------------------- defaults
# `function_name` of the history Location recorded for a value that is a constructor default
# (its `filename` is the owner: 'lib.flow.samplers.Heun').
_DEFAULT = 'constructor default'


def default_value(node: fdl.Buildable, name: str) -> Any:
  """What `fdl.build` passes for `node.name` when it is not set: the signature default, or a
  fresh value of a dataclass field's default_factory; `inspect.Parameter.empty` if none."""
  fn = fdl.get_callable(node)
  if dataclasses.is_dataclass(fn):
    field = next((f for f in dataclasses.fields(fn) if f.name == name), None)
    if field is not None and field.default_factory is not dataclasses.MISSING:
      return field.default_factory()
  parameter = node.__signature_info__.parameters.get(name)
  return inspect.Parameter.empty if parameter is None else parameter.default


def set_default(node: fdl.Buildable, name: str) -> None:
  """Sets `node.name` to a copy of its default (a mutable default is never shared with the
  class), recording `default of <target>` in Fiddle's history for it and for every value
  inside it (a Buildable default's own arguments are part of the same default)."""
  value = copy.deepcopy(default_value(node, name))
  owner = qualified_name(fdl.get_callable(node))
  with history.custom_location(lambda: history.Location(owner, 0, _DEFAULT)):
    for inner, _ in daglish.iterate(value):
      if isinstance(inner, fdl.Buildable):
        for key, argument in list(inner.__arguments__.items()):
          setattr(inner, key, argument)
    setattr(node, name, value)


def with_defaults(config: fdl.Buildable) -> fdl.Buildable:
  """A copy of `config` with every unset argument that has a default set to it, recorded as
  `default of <target>` (`default_owner`): every value `fdl.build(config)` will use.
  Arguments without a default (supplied when a Partial is called) stay unset."""
  config = copy.deepcopy(config)
  done = set()
  skipped = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL,
             inspect.Parameter.VAR_KEYWORD)

  def visit(node):
    if isinstance(node, fdl.Buildable) and id(node) not in done:
      done.add(id(node))
      for name, parameter in node.__signature_info__.parameters.items():
        if parameter.kind not in skipped and name not in node.__arguments__ and \
            default_value(node, name) is not inspect.Parameter.empty:
          set_default(node, name)
      children = node.__arguments__.values()
    elif isinstance(node, (list, tuple)):
      children = node
    elif isinstance(node, dict):
      children = node.values()
    else:
      return
    for child in children:
      visit(child)

  visit(config)
  return config


def default_owner(node: fdl.Buildable, name: str) -> str | None:
  """The target whose default `node.name` holds in a `with_defaults` copy, else None."""
  entries = node.__argument_history__.get(name) or []
  if entries and entries[-1].location.function_name == _DEFAULT:
    return entries[-1].location.filename
  return None


# ------------------------------------------------------------------------------- printing
def qualified_name(fn) -> str:
  return f'{fn.__module__}.{fn.__qualname__}'


def leaf_repr(value) -> str:
  """Classes and functions (jitted ones too) by their import path, everything else by repr
  without memory addresses, so that the printouts of two processes compare."""
  if inspect.isclass(value) or (inspect.isroutine(value) and hasattr(value, '__qualname__')):
    return qualified_name(value)
  return re.sub(r' at 0x[0-9a-fA-F]+', '', repr(value))


def value_source(node: fdl.Buildable, name: str) -> str:
  """Where `node.name` was last set, from Fiddle's history: `FILE:LINE (function)` with FILE
  relative to the repository, what on the command line set it (`--fdl_set=...`,
  `--fiddler=...`, the legacy `--config=FILE:OPTIONS` it was converted from, or a released
  checkpoint's conventions, `lib.weights.releases`), or `default of TARGET` (in a
  `with_defaults` copy). A config loaded from JSON without provenance: `saved config`."""
  entries = node.__argument_history__.get(name) or []
  if not entries:
    return 'saved config'
  location = entries[-1].location
  if location.function_name == _DEFAULT:
    return f'default of {location.filename}'
  if location.filename.startswith('--') or location.function_name == 'command line':
    return location.filename
  filename = location.filename
  if filename.startswith(REPO_ROOT + os.sep):
    filename = os.path.relpath(filename, REPO_ROOT)
  return f'{filename}:{location.line_number} ({location.function_name})'


def _entries(config: fdl.Buildable):
  """(path, printed value, parent node, argument name) for every node and leaf that is set,
  in signature order: nodes as `Config[target]`, lists and dicts of nodes item by item."""

  def walk(node, path, parent=None, name=None):
    if isinstance(node, fdl.Buildable):
      if path:
        target = qualified_name(fdl.get_callable(node))
        yield format_path(path), f'{type(node).__name__}[{target}]', parent, name
      for key, value in fdl.ordered_arguments(node).items():
        yield from walk(value, path + [key], node, key)
    elif isinstance(node, (list, tuple)) and any(isinstance(v, fdl.Buildable) for v in node):
      for index, value in enumerate(node):
        yield from walk(value, path + [index], parent, name)
    elif isinstance(node, dict) and any(isinstance(v, fdl.Buildable) for v in node.values()):
      for key, value in node.items():
        yield from walk(value, path + [key], parent, name)
    else:
      yield format_path(path), leaf_repr(node), parent, name

  return walk(config, [])


def flat_lines(config: fdl.Buildable, with_source: bool = False,
               defaults: bool = True) -> list[str]:
  """One `path = value` line per leaf, preceded by a `path = Config[target]` line for each
  node, so the printout names every component. With `defaults`, arguments left at their
  constructor defaults are listed too, marked `# default of lib.flow.samplers.Heun`.
  `with_source` appends where every other value was set (`# experiments/fiddlers.py:84 (digits)`,
  or the --fdl_set flag)."""
  lines = []
  for path, text, parent, name in _entries(with_defaults(config) if defaults else config):
    if parent is not None and (with_source or default_owner(parent, name)):
      text += f'  # {value_source(parent, name)}'
    lines.append(f'{path} = {text}')
  return lines


def effective_values(config: fdl.Buildable) -> dict[str, dict[str, str]]:
  """Every value `fdl.build(config)` will use, printed, by path, defaults marked with their
  owner: {'network.depth': {'value': '4'}, 'sampler': {'value':
  'Config[lib.flow.samplers.Heun]'}, 'sampler.guidance_scale': {'value': '1.0', 'default_of':
  'lib.flow.samplers.Heun'}}. Plain text, so values saved by one version of the code compare
  with another's."""
  values = {}
  for path, text, parent, name in _entries(with_defaults(config)):
    owner = default_owner(parent, name) if parent is not None else None
    values[path] = {'value': text, 'default_of': owner} if owner else {'value': text}
  return values
