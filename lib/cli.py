"""Command-line handling of experiment graphs: presets by file path, checked overrides, printing.

    load_preset('experiments/dit.py:xl2(image_size=512)')   -> fdl.Config
    apply_override(config, 'optimizer.learning_rate=2e-4')  # validated path and type
    flat_lines(config)                                       -> ['data.batch_size = 256', ...]

Preset files are imported as modules of the repository (`experiments/dit.py` ->
`experiments.dit`), so a config saved by a run loads again in a fresh process.
"""

import ast
import collections.abc
import difflib
import importlib
import inspect
import os
import re
import sys
import types
import typing
from typing import Any

import fiddle as fdl
from fiddle import history

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UsageError(ValueError):
  """A command-line value that cannot be applied; nothing has run."""


# ------------------------------------------------------------------------------- presets
_SPEC = re.compile(r'^(?P<module>[^:()]+):(?P<call>[A-Za-z_]\w*\s*(\(.*\))?)\s*$', re.S)


def preset_files() -> list[str]:
  folder = os.path.join(REPO_ROOT, 'experiments')
  return sorted(f'experiments/{name}' for name in os.listdir(folder)
                if name.endswith('.py') and not name.startswith('_') and name != 'common.py')


def presets_of(module: types.ModuleType) -> list[str]:
  """Public functions defined in a preset module (its presets)."""
  return sorted(name for name, value in vars(module).items()
                if inspect.isfunction(value) and value.__module__ == module.__name__
                and not name.startswith('_'))


def module_name(path: str) -> str:
  """`experiments/dit.py` -> `experiments.dit`, relative to the repository or sys.path."""
  path = os.path.abspath(path)
  for root in [REPO_ROOT, os.getcwd(), *sys.path]:
    root = os.path.abspath(root or '.')
    if path.startswith(root + os.sep):
      relative = os.path.splitext(os.path.relpath(path, root))[0]
      if all(part.isidentifier() for part in relative.split(os.sep)):
        return relative.replace(os.sep, '.')
  raise UsageError(f'{path} is not inside the repository ({REPO_ROOT}) or on sys.path, so a '
                   f'config saved from it could not be loaded again; move it under experiments/')


def _parse_call(call: str, spec: str) -> tuple[str, dict[str, Any]]:
  try:
    node = ast.parse(call.strip(), mode='eval').body
  except SyntaxError as e:
    raise UsageError(f'cannot parse the preset call in {spec!r}: {e.msg}') from None
  if isinstance(node, ast.Name):
    return node.id, {}
  if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, ast.Name):
    raise UsageError(f'{spec!r}: write the preset call as name or name(key=literal, ...)')
  try:
    return node.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
  except ValueError:
    raise UsageError(f'{spec!r}: preset arguments must be Python literals') from None


def load_preset(spec: str) -> fdl.Config:
  """`FILE.py:preset` or `FILE.py:preset(key=value, ...)` -> the preset's config."""
  match = _SPEC.match(spec)
  if not match:
    raise UsageError(f'--fdl_config={spec!r}: expected PATH.py:PRESET, e.g. '
                     f'experiments/dit.py:xl2; preset files: {", ".join(preset_files())}')
  target, call = match.group('module'), match.group('call')
  if target.endswith('.py'):
    candidates = [target, os.path.join(REPO_ROOT, target)]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
      raise UsageError(f'--fdl_config: no file {target!r}; preset files: '
                       f'{", ".join(preset_files())}')
    name = module_name(path)
  else:
    name = target
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
  module = importlib.import_module(name)
  fn_name, kwargs = _parse_call(call, spec)
  available = presets_of(module)
  if fn_name not in available:
    raise UsageError(f'{target} has no preset {fn_name!r}; its presets: {", ".join(available)}')
  fn = getattr(module, fn_name)
  try:
    inspect.signature(fn).bind(**kwargs)
  except TypeError as e:
    raise UsageError(f'{target}:{fn_name} does not take these arguments ({e}); its signature: '
                     f'{fn_name}{inspect.signature(fn)}') from None
  config = fn(**kwargs)
  if not isinstance(config, fdl.Buildable):
    raise UsageError(f'{target}:{fn_name} returned {type(config).__name__}, not a fdl.Config')
  return config


# ------------------------------------------------------------------------------- paths
_TOKEN = re.compile(r"\.?([A-Za-z_]\w*)|\[(\d+)\]|\[['\"]([^'\"]+)['\"]\]")


def parse_path(path: str) -> list[str | int]:
  """'evaluate[0].every_steps' -> ['evaluate', 0, 'every_steps']."""
  parts, position = [], 0
  while position < len(path):
    match = _TOKEN.match(path, position)
    if not match or (position == 0 and path.startswith('.')):
      raise UsageError(f'cannot parse the path {path!r} at {path[position:]!r}')
    name, index, key = match.groups()
    parts.append(name if name is not None else int(index) if index is not None else key)
    position = match.end()
  return parts


def format_path(parts) -> str:
  out = ''
  for part in parts:
    out += f'[{part}]' if isinstance(part, int) else (f'.{part}' if out else part)
  return out


def _fields(node) -> list[str]:
  if isinstance(node, fdl.Buildable):
    names = [name for name, p in inspect.signature(fdl.get_callable(node)).parameters.items()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names + [name for name in node.__arguments__ if name not in names]
  if isinstance(node, dict):
    return list(node)
  if isinstance(node, (list, tuple)):
    return [str(i) for i in range(len(node))]
  return []


def all_paths(config) -> list[str]:
  """Every node and leaf path of a config (set or default)."""
  out = []

  def walk(node, prefix):
    for name in _fields(node):
      key = int(name) if isinstance(node, (list, tuple)) else name
      child = _child(node, key)
      path = prefix + [key]
      out.append(format_path(path))
      if isinstance(child, (fdl.Buildable, list, tuple, dict)):
        walk(child, path)

  walk(config, [])
  return out


def _child(node, key):
  if isinstance(node, fdl.Buildable):
    if key in node.__arguments__:
      return node.__arguments__[key]
    parameter = inspect.signature(fdl.get_callable(node)).parameters.get(key)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else \
        parameter.default
  return node[key]


def _path_error(config, parts, depth, parent) -> UsageError:
  path = format_path(parts)
  where = format_path(parts[:depth]) or 'the experiment'
  fields = _fields(parent)
  suggestions = difflib.get_close_matches(path, all_paths(config), n=3, cutoff=0.6)
  message = f'--fdl_set: {path!r} does not exist: {where} has no field {parts[depth]!r}'
  if fields:
    message += f'; its fields: {", ".join(fields)}'
  if suggestions:
    message += f'. Closest existing paths: {", ".join(suggestions)}'
  return UsageError(message)


def _resolve_parent(config, parts):
  node = config
  for depth, key in enumerate(parts[:-1]):
    names = _fields(node)
    if str(key) not in names:
      raise _path_error(config, parts, depth, node)
    node = _child(node, key)
    if not isinstance(node, (fdl.Buildable, list, tuple, dict)):
      raise UsageError(f'--fdl_set: {format_path(parts[:depth + 1])} is a value '
                       f'({node!r}), not a node with fields')
  if str(parts[-1]) not in _fields(node):
    raise _path_error(config, parts, len(parts) - 1, node)
  return node


# ------------------------------------------------------------------------------- values
def parse_value(text: str, annotation=Any) -> Any:
  """A Python literal (`true`/`false` accepted); an unquoted string only for str fields."""
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if _accepts_str(annotation):
      return text
    raise UsageError(f'cannot parse {text!r} as a Python literal; quote strings, e.g. '
                     f"--fdl_set=path='{text}'") from None


def _accepts_str(annotation) -> bool:
  if annotation is str:
    return True
  origin = typing.get_origin(annotation)
  if origin is typing.Literal:
    return any(isinstance(a, str) for a in typing.get_args(annotation))
  if origin in (typing.Union, types.UnionType):
    return any(_accepts_str(a) for a in typing.get_args(annotation))
  return False


def _annotation(parent, name) -> Any:
  if not isinstance(parent, fdl.Buildable):
    return Any
  fn = fdl.get_callable(parent)
  try:
    hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
  except Exception:  # unresolvable annotations: no type information
    return Any
  return hints.get(name, Any)


def coerce(value, annotation, where: str):
  """`value` checked against `annotation` (ints become floats for float fields; lists
  become tuples for tuple fields). Raises UsageError naming the field and the type."""
  if annotation is Any or isinstance(value, fdl.Buildable):
    return value
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  error = UsageError(f'--fdl_set: {where} expects {_type_name(annotation)}, got '
                     f'{value!r} ({type(value).__name__})')
  if origin in (typing.Union, types.UnionType):
    for option in args:
      try:
        return coerce(value, option, where)
      except UsageError:
        pass
    raise error
  if origin is typing.Literal:
    if value in args:
      return value
    raise UsageError(f'--fdl_set: {where} must be one of {", ".join(map(repr, args))}; '
                     f'got {value!r}')
  if annotation is type(None):
    if value is None:
      return value
    raise error
  if annotation is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise error
  if annotation is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise error
  if origin is tuple or annotation is tuple:
    if not isinstance(value, (list, tuple)):
      raise error
    if args and args[-1] is Ellipsis:
      return tuple(coerce(v, args[0], where) for v in value)
    if args and len(args) != len(value):
      raise error
    return tuple(coerce(v, a, where) for v, a in zip(value, args)) if args else tuple(value)
  if origin is list or annotation is list:
    if not isinstance(value, (list, tuple)):
      raise error
    return [coerce(v, args[0], where) for v in value] if args else list(value)
  if inspect.isclass(annotation) and annotation in (bool, str, dict):
    if isinstance(value, annotation):
      return value
    raise error
  if origin is collections.abc.Callable and not callable(value):
    raise error
  return value


def _type_name(annotation) -> str:
  return getattr(annotation, '__name__', None) or str(annotation).replace('typing.', '')


def apply_override(config: fdl.Buildable, assignment: str) -> None:
  """Applies one `PATH=VALUE` with path and type checks, recording the flag as the
  value's provenance in Fiddle's history."""
  if '=' not in assignment:
    raise UsageError(f'--fdl_set={assignment!r}: expected PATH=VALUE')
  path, text = (s.strip() for s in assignment.split('=', 1))
  parts = parse_path(path)
  parent = _resolve_parent(config, parts)
  name = parts[-1]
  annotation = _annotation(parent, name)
  value = coerce(parse_value(text, annotation), annotation, path)
  current = _child(parent, name)
  if isinstance(current, fdl.Buildable) and value is not None and \
      not isinstance(value, fdl.Buildable):
    raise UsageError(f'--fdl_set: {path} is a {fdl.get_callable(current).__name__} node; set '
                     f'one of its fields instead ({", ".join(_fields(current))})')
  location = lambda: history.Location(f'--fdl_set={assignment}', 0, 'command line')
  with history.custom_location(location):
    if isinstance(parent, fdl.Buildable):
      setattr(parent, name, value)
    elif isinstance(parent, tuple):
      raise UsageError(f'--fdl_set: {format_path(parts[:-1])} is a tuple; set the whole tuple')
    else:
      parent[name] = value


# ------------------------------------------------------------------------------- printing
def qualified_name(fn) -> str:
  return f'{fn.__module__}.{fn.__qualname__}'


def leaf_repr(value) -> str:
  """Classes and functions by their import path, everything else by repr."""
  return qualified_name(value) if inspect.isclass(value) or inspect.isfunction(value) else \
      repr(value)


def value_source(node: fdl.Buildable, name: str) -> str:
  """Where `node.name` was last set, from Fiddle's history: `FILE:LINE (function)` with FILE
  relative to the repository, or what on the command line set it (the `--fdl_set=...` flag,
  or a released checkpoint's conventions, `lib.models.releases`)."""
  entries = node.__argument_history__.get(name) or []
  if not entries:
    return 'default'
  location = entries[-1].location
  if location.function_name == 'command line':
    return location.filename
  filename = location.filename
  if filename.startswith(REPO_ROOT + os.sep):
    filename = os.path.relpath(filename, REPO_ROOT)
  return f'{filename}:{location.line_number} ({location.function_name})'


def flat_lines(config: fdl.Buildable, with_source: bool = False) -> list[str]:
  """One `path = value` line per leaf that is set, preceded by a `path = Config[target]`
  line for each node, so the printout names every component. `with_source` appends where
  each value was set (`# experiments/dit.py:57 (digits)`, or the --fdl_set flag)."""
  lines = []

  def emit(text, parent, name):
    lines.append(f'{text}  # {value_source(parent, name)}' if with_source and parent else text)

  def walk(node, path, parent=None, name=None):
    if isinstance(node, fdl.Buildable):
      if path:
        target = qualified_name(fdl.get_callable(node))
        emit(f'{format_path(path)} = {type(node).__name__}[{target}]', parent, name)
      for key, value in node.__arguments__.items():
        walk(value, path + [key], node, key)
    elif isinstance(node, (list, tuple)) and any(isinstance(v, fdl.Buildable) for v in node):
      for index, value in enumerate(node):
        walk(value, path + [index], parent, name)
    elif isinstance(node, dict) and any(isinstance(v, fdl.Buildable) for v in node.values()):
      for key, value in node.items():
        walk(value, path + [key], parent, name)
    else:
      emit(f'{format_path(path)} = {leaf_repr(node)}', parent, name)

  walk(config, [])
  return lines


# ------------------------------------------------------------------------------- run folders
def write_config(config: fdl.Buildable, workdir: str) -> None:
  """The resolved config as Fiddle JSON (reloadable) and as text with provenance, into
  `workdir/config.json` and `workdir/config.txt` (launch.py, lib.models.import_weights)."""
  from lib import review  # review imports this module

  os.makedirs(workdir, exist_ok=True)
  for name, text in (('config.json', review.dump_config(config)),
                     ('config.txt', '\n'.join(flat_lines(config, with_source=True)) + '\n')):
    path = os.path.join(workdir, name)
    with open(path + '.tmp', 'w') as f:  # renamed when complete: never read half-written
      f.write(text)
    os.replace(path + '.tmp', path)
