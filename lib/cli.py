"""Command-line handling of experiment graphs: presets by file path, checked overrides, printing.

    load_preset('experiments/dit.py:xl2(image_size=512)')   -> fdl.Config
    apply_override(config, 'optimizer.learning_rate=2e-4')  # validated path and type
    flat_lines(config)                                       -> ['data.batch_size = 256', ...]
    effective_values(config)     -> {'sampler.guidance_scale': {'value': '1.0',
                                     'default_of': 'lib.flow.samplers.Heun'}, ...}

Preset files are imported as modules of the repository (`experiments/dit.py` ->
`experiments.dit`), so a config saved by a run loads again in a fresh process.
"""

import ast
import collections.abc
import copy
import dataclasses
import difflib
import importlib
import inspect
import json
import os
import re
import sys
import types
import typing
from typing import Any

import fiddle as fdl
from fiddle import daglish, history

from lib import errors

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UsageError(errors.UserError):
  """A command-line value that cannot be applied; nothing has run."""


# ------------------------------------------------------------------------------- presets
_SPEC = re.compile(r'^(?P<module>[^:()]+):(?P<call>[A-Za-z_]\w*\s*(\(.*\))?)\s*$', re.S)


NOT_PRESETS = ('common.py', 'fiddlers.py')  # building blocks and fiddlers
FIDDLERS = 'experiments.fiddlers'  # where a bare --fiddler=NAME is looked up


def preset_files() -> list[str]:
  folder = os.path.join(REPO_ROOT, 'experiments')
  return sorted(f'experiments/{name}' for name in os.listdir(folder)
                if name.endswith('.py') and not name.startswith('_') and name not in NOT_PRESETS)


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
    raise UsageError(f'cannot parse the call in {spec!r}: {e.msg}') from None
  if isinstance(node, ast.Name):
    return node.id, {}
  if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, ast.Name):
    raise UsageError(f'{spec!r}: write the call as name or name(key=literal, ...)')
  try:
    return node.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
  except ValueError:
    raise UsageError(f'{spec!r}: the arguments must be Python literals') from None


def _named_function(spec: str, flag: str, kind: str, usage: str, default_module: str = ''):
  """(FILE or module, function, literal keyword arguments) of `FILE.py:name(k=v, ...)` or
  `package.module:name(...)`; with `default_module`, also of a bare `name(...)` there."""
  match = _SPEC.match(spec)
  if match:
    target, call = match.group('module'), match.group('call')
  elif default_module and re.match(r'^[A-Za-z_]\w*\s*(\(.*\))?\s*$', spec, re.S):
    target, call = default_module, spec
  else:
    raise UsageError(f'{flag}={spec!r}: expected {usage}')
  if target.endswith('.py'):
    candidates = [target, os.path.join(REPO_ROOT, target)]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
      raise UsageError(f'{flag}: no file {target!r}' + (
          f'; preset files: {", ".join(preset_files())}' if kind == 'preset' else ''))
    name = module_name(path)
  else:
    name = target
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
  try:
    module = importlib.import_module(name)
  except ModuleNotFoundError as e:
    raise UsageError(f'{flag}={spec!r}: cannot import {name!r} ({e})') from None
  fn_name, kwargs = _parse_call(call, spec)
  available = presets_of(module)
  if fn_name not in available:
    raise UsageError(f'{target} has no {kind} {fn_name!r}; its {kind}s: {", ".join(available)}')
  return target, getattr(module, fn_name), kwargs


def _check_call(target: str, fn, *args, **kwargs) -> None:
  try:
    inspect.signature(fn).bind(*args, **kwargs)
  except TypeError as e:
    raise UsageError(f'{target}:{fn.__name__} does not take these arguments ({e}); its '
                     f'signature: {fn.__name__}{inspect.signature(fn)}') from None


def load_preset(spec: str) -> fdl.Config:
  """`FILE.py:preset` or `FILE.py:preset(key=value, ...)` -> the preset's config."""
  target, fn, kwargs = _named_function(
      spec, '--fdl_config', 'preset', f'PATH.py:PRESET, e.g. experiments/dit.py:xl2; preset '
      f'files: {", ".join(preset_files())}')
  _check_call(target, fn, **kwargs)
  flag = f'--fdl_config={spec}'
  try:
    hints = typing.get_type_hints(fn)
  except Exception:  # unresolvable annotations: no type information
    hints = {}
  kwargs = {k: coerce(v, hints.get(k, Any), k, flag) for k, v in kwargs.items()}
  try:
    config = fn(**kwargs)
  except errors.UserError:
    raise  # its message names the values already
  except (ValueError, KeyError, TypeError) as e:
    raise UsageError(f'{flag}: the preset cannot be made with these arguments: '
                     f'{type(e).__name__}: {e}') from e
  if not isinstance(config, fdl.Buildable):
    raise UsageError(f'{target}:{fn.__name__} returned {type(config).__name__}, not a fdl.Config')
  return config


_CONTEXT = re.compile(r'\n*Fiddle context: failed to construct or call (?P<name>\S+) at '
                      r'<root>\.?(?P<path>\S*) with', re.S)


def build(config: fdl.Buildable):
  """`fdl.build(config)`, with a value a constructor rejects reported as a ConfigError
  naming its path in the graph (`checkpoint.save_interval_steps=0; expected ...`)."""
  try:
    return fdl.build(config)
  except errors.UserError:
    raise  # its message names the values already
  except (ValueError, TypeError) as e:
    message = str(e)
    match = _CONTEXT.search(message)
    if match is None:
      raise
    text = message[:match.start()].strip()
    path = match.group('path')
    if path and re.match(r'[A-Za-z_]\w*=', text):
      text = f'{path}.{text}'
    elif path:
      text = f'{path} ({match.group("name")}): {text}'
    raise errors.ConfigError(text) from e


def apply_fiddler(config: fdl.Buildable, spec: str) -> fdl.Buildable:
  """--fiddler=SPEC: `name(key=literal, ...)` of experiments/fiddlers.py, `FILE.py:name` or
  `package.module:name`, called as `name(config, **kwargs)`; it changes `config` in place or
  returns the new config (Fiddle's convention). Returns the config."""
  target, fn, kwargs = _named_function(
      spec, '--fiddler', 'fiddler', 'NAME or NAME(key=literal, ...) of experiments/fiddlers.py, '
      'PATH.py:NAME or package.module:NAME', FIDDLERS)
  _check_call(target, fn, config, **kwargs)
  location = lambda: history.Location(f'--fiddler={spec}', 0, fn.__name__)
  with history.custom_location(location):  # the provenance of what it changes
    result = fn(config, **kwargs)
  return config if result is None else result


def apply_tag_override(config: fdl.Buildable, assignment: str) -> None:
  """--fdl_tags_set=TAG=VALUE: every field tagged TAG (a Fiddle tag's name, `ImageSize` or
  `experiments.dit.ImageSize`) gets VALUE, checked against each field's annotation."""
  if '=' not in assignment:
    raise UsageError(f'--fdl_tags_set={assignment!r}: expected TAG=VALUE')
  name, text = (part.strip() for part in assignment.split('=', 1))
  fields = [(node, field, tag) for node in nodes(config)
            for field, tags in node.__argument_tags__.items() for tag in tags
            if name in (tag.name, tag.__name__)]
  if not fields:
    tags = sorted({tag.name for node in nodes(config)
                   for tags in node.__argument_tags__.values() for tag in tags})
    raise UsageError(f'--fdl_tags_set: no field is tagged {name!r}; '
                     + (f'tags of this config: {", ".join(tags)}' if tags else
                        'this config has no tags; set fields with --fdl_set=PATH=VALUE'))
  location = lambda: history.Location(f'--fdl_tags_set={assignment}', 0, 'command line')
  with history.custom_location(location):
    for node, field, tag in fields:
      annotation = _annotation(node, field)
      setattr(node, field, coerce(parse_value(text, annotation), annotation, tag.name,
                                   '--fdl_tags_set'))


def nodes(config: fdl.Buildable) -> list[fdl.Buildable]:
  """Every Buildable of the graph, once (a shared node is reached by several paths)."""
  found = {}
  for value, _ in daglish.iterate(config):
    if isinstance(value, fdl.Buildable):
      found.setdefault(id(value), value)
  return list(found.values())


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
    default = default_value(node, key)
    return None if default is inspect.Parameter.empty else default
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
    if isinstance(node, fdl.Buildable) and key not in node.__arguments__ and \
        isinstance(_child(node, key), (fdl.Buildable, list, dict)):
      _set_default(node, key)  # the override edits this config's copy, never the class's default
    parent, node = node, _child(node, key)
    if node is None and _node_classes(_annotation(parent, key)):
      raise _create_first(parts, depth, _node_classes(_annotation(parent, key)))
    if not isinstance(node, (fdl.Buildable, list, tuple, dict)):
      raise UsageError(f'--fdl_set: {format_path(parts[:depth + 1])} is a value '
                       f'({node!r}), not a node with fields')
  if str(parts[-1]) not in _fields(node):
    raise _path_error(config, parts, len(parts) - 1, node)
  return node


def _create_first(parts, depth: int, classes: list[type]) -> UsageError:
  """The error for a path below a None field that can hold a node: how to create it."""
  node_path, rest = format_path(parts[:depth + 1]), parts[depth + 1:]
  names = ' or '.join(cls.__name__ for cls in classes)
  cls = classes[0]
  if len(rest) == 1:
    example = f"--fdl_set='{node_path}={cls.__name__}({rest[0]}=...)'"
  else:
    example = f"--fdl_set='{node_path}={cls.__name__}()', then --fdl_set={format_path(parts)}=..."
  return UsageError(f'--fdl_set: {node_path} is None, so {format_path(parts)} does not exist; '
                    f'create the {names} node first: {example} ({cls.__name__} fields: '
                    f'{", ".join(_fields(fdl.Config(cls)))})')


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


def coerce(value, annotation, where: str, flag: str = '--fdl_set'):
  """`value` checked against `annotation` (ints become floats for float fields; lists
  become tuples for tuple fields). Raises UsageError naming the flag, the field and the
  type."""
  if annotation is Any or isinstance(value, fdl.Buildable):
    return value
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  error = UsageError(f'{flag}: {where} expects {_type_name(annotation)}, got '
                     f'{value!r} ({type(value).__name__})')
  if origin in (typing.Union, types.UnionType):
    for option in args:
      try:
        return coerce(value, option, where, flag)
      except UsageError:
        pass
    raise error
  if origin is typing.Literal:
    if value in args:
      return value
    raise UsageError(f'{flag}: {where} must be one of {", ".join(map(repr, args))}; '
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
      return tuple(coerce(v, args[0], where, flag) for v in value)
    if args and len(args) != len(value):
      raise error
    return tuple(coerce(v, a, where, flag) for v, a in zip(value, args)) if args else \
        tuple(value)
  if origin is list or annotation is list:
    if not isinstance(value, (list, tuple)):
      raise error
    return [coerce(v, args[0], where, flag) for v in value] if args else list(value)
  if inspect.isclass(annotation) and annotation in (bool, str, dict):
    if isinstance(value, annotation):
      return value
    raise error
  if origin is collections.abc.Callable and not callable(value):
    raise error
  return value


_SCALAR_TYPES = (bool, int, float, complex, str, bytes, tuple, list, dict, set, type(None))


def _node_classes(annotation) -> list[type]:
  """The classes of a field that holds a node or None (`Profile | None` -> [Profile]); none
  for a field that may hold a value (`int`, `str | None`, `Any`, `Callable`, ...)."""
  options = typing.get_args(annotation) if typing.get_origin(annotation) in (
      typing.Union, types.UnionType) else (annotation,)
  classes = [option for option in options  # (typing.Any is a class since Python 3.11)
             if inspect.isclass(option) and option not in _SCALAR_TYPES and option is not Any]
  return classes if all(o is type(None) or o in classes for o in options) else []


def new_node(text: str, annotation, where: str) -> fdl.Config | None:
  """`Class(key=literal, ...)` -> fdl.Config(Class, ...) where `annotation` names Class (a
  field that holds a node), its arguments checked; None when `text` is no such call."""
  classes = {cls.__name__: cls for cls in _node_classes(annotation)}
  match = re.match(r'^\s*([A-Za-z_]\w*)\s*\(.*\)\s*$', text, re.S)
  if not classes or not match:
    return None
  cls = classes.get(match.group(1))
  if cls is None:
    raise UsageError(f'--fdl_set: {where} holds a {" or ".join(classes)} node, not '
                     f'{match.group(1)}')
  _, kwargs = _parse_call(text, text)
  node = fdl.Config(cls)
  for name, value in kwargs.items():
    if name not in _fields(node):
      raise UsageError(f'--fdl_set: {cls.__name__} has no field {name!r}; its fields: '
                       f'{", ".join(_fields(node))}')
    annotation = _annotation(node, name)
    setattr(node, name, coerce(value, annotation, f'{where}.{name}'))
  return node


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
  location = lambda: history.Location(f'--fdl_set={assignment}', 0, 'command line')
  with history.custom_location(location):  # a created node's fields get the flag's location
    value = new_node(text, annotation, path)
  if value is None:
    value = coerce(parse_value(text, annotation), annotation, path)
  current = _child(parent, name)
  if isinstance(current, fdl.Buildable) and value is not None and \
      not isinstance(value, fdl.Buildable):
    raise UsageError(f'--fdl_set: {path} is a {fdl.get_callable(current).__name__} node; set '
                     f'one of its fields instead ({", ".join(_fields(current))})')
  classes = _node_classes(annotation)
  if classes and value is not None and not isinstance(value, fdl.Buildable):
    raise UsageError(f'--fdl_set: {path} holds a {" or ".join(c.__name__ for c in classes)} '
                     f"node or None, not {value!r}; e.g. --fdl_set='{path}="
                     f"{classes[0].__name__}()'")
  with history.custom_location(location):
    if isinstance(parent, fdl.Buildable):
      setattr(parent, name, value)
    elif isinstance(parent, tuple):
      raise UsageError(f'--fdl_set: {format_path(parts[:-1])} is a tuple; set the whole tuple')
    else:
      parent[name] = value


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


def _set_default(node: fdl.Buildable, name: str) -> None:
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
          _set_default(node, name)
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
  `with_source` appends where every other value was set (`# experiments/dit.py:57 (digits)`,
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


# ------------------------------------------------------------------------------- run folders
EFFECTIVE = 'effective.json'  # beside config.json: the values the run used, defaults included


def write_config(config: fdl.Buildable, workdir) -> None:
  """The resolved config as Fiddle JSON (reloadable; only what presets and flags set), as text
  with provenance and defaults, and its effective values (`effective_values`, compared when
  the run resumes), into `workdir/config.json`, `config.txt` and `effective.json`
  (launch.py, lib.import_release); each written atomically (`paths.write_atomic`)."""
  from lib import paths, review  # review imports this module

  folder = paths.resolve(workdir, '--workdir')
  folder.mkdir(parents=True, exist_ok=True)
  for name, text in (('config.json', review.dump_config(config)),
                     ('config.txt', '\n'.join(flat_lines(config, with_source=True)) + '\n'),
                     (EFFECTIVE, json.dumps(effective_values(config), indent=1) + '\n')):
    paths.write_atomic(folder / name, text)
