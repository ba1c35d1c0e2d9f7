"""Presets by file path, fiddlers, and building a config.

    load_preset('experiments/dit.py:xl2(image_size=512)')   -> fdl.Config
    apply_fiddler(config, 'tiny(total_steps=40)')            # experiments/fiddlers.py:tiny
    build(config)                                            -> the Experiment

Preset files are imported as modules of the repository (`experiments/dit.py` ->
`experiments.dit`), so a config saved by a run loads again in a fresh process.
"""

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

from lib import errors
from lib.config import REPO_ROOT, overrides
from lib.errors import UsageError

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
  fn_name, kwargs = overrides.parse_call(call, spec)
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
  kwargs = {k: overrides.coerce(v, hints.get(k, Any), k, flag) for k, v in kwargs.items()}
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
    raise errors.at_node(match.group('path'), match.group('name'),
                         message[:match.start()]) from e


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
