"""Checked overrides of a config's leaves: `--fdl_set=PATH=VALUE` and `--fdl_tags_set=TAG=VALUE`.

    apply_override(config, 'optimizer.learning_rate=2e-4')  # validated path and type
    apply_override(config, "profile=Profile(num_steps=3)")  # a node, its arguments checked
    parse_path('evaluate[0].every_steps')                   -> ['evaluate', 0, 'every_steps']
    coerce(2, float, 'optimizer.learning_rate')             -> 2.0

A value is a Python literal checked against the annotation of the field it goes to; an
unknown path is an error listing the fields there and the closest existing paths.
"""

import ast
import collections.abc
import difflib
import inspect
import re
import types
import typing
from typing import Any

import fiddle as fdl
from fiddle import daglish, history

from lib.config import values
from lib.errors import UsageError


def parse_call(call: str, spec: str) -> tuple[str, dict[str, Any]]:
  """`name` or `name(key=literal, ...)` -> (name, {key: value}); `spec` names the flag value
  in messages."""
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
      out.append(values.format_path(path))
      if isinstance(child, (fdl.Buildable, list, tuple, dict)):
        walk(child, path)

  walk(config, [])
  return out


def _child(node, key):
  if isinstance(node, fdl.Buildable):
    if key in node.__arguments__:
      return node.__arguments__[key]
    default = values.default_value(node, key)
    return None if default is inspect.Parameter.empty else default
  return node[key]


def _path_error(config, parts, depth, parent) -> UsageError:
  path = values.format_path(parts)
  where = values.format_path(parts[:depth]) or 'the experiment'
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
      values.set_default(node, key)  # the override edits this config's copy, not the default
    parent, node = node, _child(node, key)
    if node is None and _node_classes(_annotation(parent, key)):
      raise _create_first(parts, depth, _node_classes(_annotation(parent, key)))
    if not isinstance(node, (fdl.Buildable, list, tuple, dict)):
      raise UsageError(f'--fdl_set: {values.format_path(parts[:depth + 1])} is a value '
                       f'({node!r}), not a node with fields')
  if str(parts[-1]) not in _fields(node):
    raise _path_error(config, parts, len(parts) - 1, node)
  return node


def _create_first(parts, depth: int, classes: list[type]) -> UsageError:
  """The error for a path below a None field that can hold a node: how to create it."""
  node_path, rest = values.format_path(parts[:depth + 1]), parts[depth + 1:]
  path = values.format_path(parts)
  names = ' or '.join(cls.__name__ for cls in classes)
  cls = classes[0]
  if len(rest) == 1:
    example = f"--fdl_set='{node_path}={cls.__name__}({rest[0]}=...)'"
  else:
    example = f"--fdl_set='{node_path}={cls.__name__}()', then --fdl_set={path}=..."
  return UsageError(f'--fdl_set: {node_path} is None, so {path} does not exist; '
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
  _, kwargs = parse_call(text, text)
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
      raise UsageError(f'--fdl_set: {values.format_path(parts[:-1])} is a tuple; set the '
                       'whole tuple')
    else:
      parent[name] = value


# ------------------------------------------------------------------------------- tags
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