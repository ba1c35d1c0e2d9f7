"""What a config file may refer to: a config file is data, and loading one runs no code.

A Fiddle JSON config names the callable of each node, and each type, as a Python reference
(`{"type": "pyref", "module": "lib.models.dit", "name": "DiT"}`). Loading imports it, and
building the graph calls it with the file's values, so a reference resolves only to

  * a class or function of this project (`lib`, `experiments`), outside the modules that
    read or write files by name or run code by name (`PLUMBING`: `lib.paths`,
    `lib.config`, `experiments.legacy`, ...), and not a function of a module that writes
    files (`WRITING`: `lib.checkpoint`, `lib.hooks`, ...; their classes are nodes);
  * a Fiddle node type (`fdl.Config`, `fdl.Partial`, a tag, their traverser metadata), or
    one of the containers `dump_json` writes for a graph (`dict`, `list`, `tuple`);
  * a class or function of the numeric code a graph may configure (`LIBRARIES`: jax's
    activations, initialisers, numpy and lax; Flax NNX layers; optax; numpy's scalar
    types), except those that read or write files or call back into Python
    (`REFUSED_NAMES`).

Anything else is refused (`Refused`, with the reason): a module outside these packages before
it is imported; after resolution, a module, an object defined outside them (a re-export such
as `lib.hooks.paths`, `lib.paths.os.system`), or a name reached through a module attribute.

    check_document(json.loads(text))    # raises Refused / Missing (where, module, name, reason)
    ProjectImports()                     # the same policy, for Fiddle's load_json
"""

import importlib
import inspect
import re
import types
from collections.abc import Iterator

import fiddle as fdl
import numpy as np
from fiddle.experimental import serialization

from lib.config import values

PROJECT = ('lib', 'experiments')
# Project modules whose functions read or write files by name, or import or run code by name.
PLUMBING = ('lib.config', 'lib.paths', 'lib.workdir', 'lib.import_release',
            'lib.data.extract_latents', 'lib.cluster', 'lib.storage', 'lib.stopping',
            'experiments.legacy')
# Project modules whose functions (and methods) write, move or delete files by path: their
# classes are graph nodes, their functions are refused.
WRITING = ('lib.checkpoint', 'lib.eval.digits_classifier', 'lib.eval.fid', 'lib.evaluate',
           'lib.hooks', 'lib.sample', 'lib.tracking', 'lib.train')
CONTAINERS = {'dict': dict, 'list': list, 'tuple': tuple}  # of builtins: what dump_json writes
LIBRARIES = ('jax.nn', 'jax._src.nn', 'jax.numpy', 'jax._src.numpy', 'jax.lax', 'jax._src.lax',
             'jax.random', 'jax._src.random', 'flax.nnx', 'optax', 'numpy')
# Names in LIBRARIES that read or write files (numpy's and jax.numpy's) or call Python back.
REFUSED_NAMES = frozenset({
    'load', 'save', 'savez', 'savez_compressed', 'savetxt', 'loadtxt', 'genfromtxt',
    'fromfile', 'fromregex', 'fromstring', 'tofile', 'memmap', 'DataSource', 'frompyfunc',
    'vectorize', 'pure_callback', 'io_callback', 'callback', 'debug_callback', 'ffi_call'})
NUMPY = 'of numpy, a config file may use only its scalar types (numpy.float32, ...)'
PACKAGES = ('builtins', 'fiddle', *PROJECT, *LIBRARIES)
ALLOWED = ("the classes and functions of lib and experiments, Fiddle's node types, dict, list, "
           'tuple, and the numeric code of jax, flax.nnx, optax and numpy '
           '(lib/config/references.py)')


class Unresolved(Exception):
  """A reference that does not resolve; `where` is set once the node is known."""

  def __init__(self, module: str, name: str, reason: str, where: str = ''):
    self.module, self.name, self.reason, self.where = module, name, reason, where
    super().__init__(f'{where + ": " if where else ""}{module}.{name}: {reason}')


class Refused(Unresolved):
  """A reference a config file may not make."""


class Missing(Unresolved):
  """A reference to something this code does not have (or cannot import)."""


def _within(module, prefixes) -> bool:
  return isinstance(module, str) and any(module == p or module.startswith(p + '.')
                                         for p in prefixes)


class ProjectImports(serialization.PyrefPolicy):
  """Fiddle's import policy for config files (the rules of the module doc); a refusal raises
  `Refused` naming its reason (Fiddle's own error would not say why)."""

  def allows_import(self, module: str, symbol: str) -> bool:
    def refuse(reason):
      raise Refused(module, symbol, reason)

    parts = module.split('.') + symbol.split('.')
    if not all(part.isidentifier() and not part.startswith('__') for part in parts):
      refuse('not a plain Python name (dunder attributes are never resolved)')
    if not _within(module, PACKAGES):
      refuse(f'{module} is not a package a config file may use')
    if _within(module, PLUMBING):
      refuse(f'{module} reads or writes files or runs code by name')
    if module == 'builtins' and symbol not in CONTAINERS:
      refuse('of builtins, a config file may use only ' + ', '.join(CONTAINERS))
    if _within(module, ('numpy',)) and module != 'numpy':
      refuse(NUMPY)
    value = importlib.import_module(module)
    for part in symbol.split('.')[:-1]:  # `Outer.Inner`: through classes, never modules
      value = getattr(value, part)
      if not isinstance(value, type):
        refuse(f'{part} is not a class (a name is never looked up through a module)')
    return True

  def allows_value(self, value) -> bool:
    name = getattr(value, '__qualname__', getattr(value, '__name__', repr(value)))
    owner = getattr(value, '__module__', None)

    def refuse(reason):
      raise Refused(owner if isinstance(owner, str) else '?', str(name), reason)

    if isinstance(value, types.ModuleType):
      refuse('a module, not a class or function')
    if not _within(owner, PACKAGES) or _within(owner, PLUMBING):
      refuse(f'defined in {owner}, not a package a config file may use')
    if _within(owner, WRITING) and inspect.isroutine(value):
      refuse(f'a function of {owner}, which writes files by path (only its classes are nodes)')
    if owner == 'builtins' and not any(value is kind for kind in CONTAINERS.values()):
      refuse('of builtins, a config file may use only ' + ', '.join(CONTAINERS))
    if _within(owner, ('fiddle',)) and not (
        isinstance(value, type) and (issubclass(value, (fdl.Buildable, fdl.Tag))
                                     or value is fdl.BuildableTraverserMetadata)):
      refuse("of Fiddle, a config file may use only its node types")
    if _within(owner, ('numpy',)) and not (isinstance(value, type)
                                           and issubclass(value, np.generic)):
      refuse(NUMPY)
    if _within(owner, LIBRARIES) and getattr(value, '__name__', None) in REFUSED_NAMES:
      refuse('it reads or writes files or calls back into Python')
    return True


_PATH_ELEMENT = re.compile(r"^(?:Attr\(name='(\w+)'\)|Index\(index=(\d+)\)|Key\(key='?(.*?)'?\))$")


def _path_part(element) -> str | int | None:
  match = _PATH_ELEMENT.match(element) if isinstance(element, str) else None
  if not match:
    return None
  name, index, key = match.groups()
  return int(index) if index is not None else name if name is not None else key


def references(document: dict) -> Iterator[tuple[str, dict]]:
  """Each Python reference of a Fiddle JSON document (everything `load_json` would import)
  with where it is: the config path of its node or argument (`network`, `evaluate[0]`, '<root>'),
  and the `objects` entry holding it."""
  objects = document.get('objects') if isinstance(document, dict) else None
  objects = objects if isinstance(objects, dict) else {}
  seen = set()

  def where(path, entry):
    node = '<root>' if path == [] else values.format_path(path) if path is not None else None
    return ' in '.join(part for part in (node, entry and f'objects.{entry}') if part)

  def walk(value, path, entry, in_metadata):
    if isinstance(value, list):
      if not in_metadata and path is not None and len(value) == 2 and isinstance(value[0], str):
        part = _path_part(value[0])  # an item [path element, child] of a node
        if part is not None:
          yield from walk(value[1], path + [part], entry, in_metadata)
          return
      for child in value:
        yield from walk(child, path, entry, in_metadata)
    elif isinstance(value, dict):
      kind = value.get('type')
      if kind == 'pyref':
        yield where(path, entry), value
      elif kind == 'ref':
        key = value.get('key')
        if isinstance(key, str) and key in objects and key not in seen:
          seen.add(key)
          yield from walk(objects[key], path, entry if in_metadata else key, in_metadata)
      elif kind != 'leaf':
        yield from walk(kind, path, entry, in_metadata)
        yield from walk(value.get('items'), path, entry, in_metadata)
        yield from walk(value.get('metadata'), path, entry, True)

  yield from walk(document.get('root') if isinstance(document, dict) else None, [], None, False)
  for key, value in objects.items():  # unreachable from the root: never loaded, still checked
    if key not in seen:
      seen.add(key)
      yield from walk(value, None, key, False)


def check_document(document: dict) -> None:
  """Raises `Refused` (with `where` set) for the first reference of `document` that the
  policy refuses, before anything outside the allowed packages is imported, or `Missing` for
  one that cannot be imported or does not exist."""
  policy = ProjectImports()
  for where, pyref in references(document):
    module, name = str(pyref.get('module')), str(pyref.get('name'))
    try:
      serialization.import_symbol(policy, module, name)
    except Refused as e:
      raise Refused(module, name, e.reason, where) from None
    except Exception as e:  # importing an allowed module named by the file failed
      raise Missing(module, name, f'{type(e).__name__}: {e}'.splitlines()[0], where) from None
