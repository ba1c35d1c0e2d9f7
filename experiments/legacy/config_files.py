"""Loading diffuse_nnx config files (`--config=PATH.py[:OPTIONS]`) the way its `main.py` did,
from the user's own checkout, with nothing on PYTHONPATH.

    cd my_diffuse_nnx_checkout   # configs/common_specs.py, configs/dit_imagenet.py, ...
    python /path/to/fiddlediff/launch.py --config=configs/dit_imagenet.py:imagenet_256-XL_2

While the file runs and its `get_config(OPTIONS)` builds the `ConfigDict`, the file's project
root (project_root: the nearest folder holding a package the file imports, e.g. the checkout
holding `configs/`) comes first on sys.path, and a module of one of the root's names imported
from elsewhere before (another checkout's `configs`) is set aside, so
`from configs import common_specs` reads this checkout's file; sys.path and the set-aside
modules are restored afterwards. A file that fails is one LegacyFileError naming the file, the
options and the error (and, for a known diffuse_nnx defect, the native preset replacing it).
"""

import ast
import contextlib
import os
import re
import runpy
import sys
import traceback

import ml_collections
from absl import flags


class LegacyFileError(Exception):
  """A legacy config file that cannot be loaded or fails to build its ConfigDict. Not a
  ValueError, so absl's flag parsing passes it on unchanged (launch.py prints it, exit 2)."""


# diffuse_nnx files that fail inside their own get_config: file name -> (names the error
# mentions, what is wrong, native preset file, preset per network size of the option string).
KNOWN_DEFECTS = {
    'lightning_ddt_imagenet.py': (
        ('hidden_size', 'depth', 'num_heads'),
        'the file reads hidden_size, depth and num_heads from the DDT size presets '
        '(common_specs._ddt_network_presets), which hold encoder and decoder sizes instead',
        'experiments/lightning_ddt.py', {'S': 's2', 'XL': 'xl2'}),
}


def project_root(path: str) -> str:
  """The folder the file's imports of its own project resolve from: the nearest folder, from
  the file's own upwards, then the working directory, that holds a package or module the file
  imports at top level (`configs/` for `from configs import common_specs`); else the file's
  folder."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = {alias.name.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
           for alias in node.names}
  names |= {node.module.split('.')[0] for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and not node.level}
  folder = os.path.dirname(os.path.abspath(path))
  candidates = [folder]
  while os.path.dirname(candidates[-1]) != candidates[-1]:
    candidates.append(os.path.dirname(candidates[-1]))
  for candidate in [*candidates, os.getcwd()]:
    if any(os.path.isdir(os.path.join(candidate, name)) or
           os.path.isfile(os.path.join(candidate, name + '.py')) for name in names):
      return candidate
  return folder


def _located_under(module, root: str) -> bool:
  """Whether `module` (a file, a package or a namespace package) was imported from `root`."""
  places = list(getattr(module, '__path__', None) or []) or [getattr(module, '__file__', None)]
  return any(place and os.path.abspath(place).startswith(root + os.sep) for place in places)


@contextlib.contextmanager
def importable(root: str):
  """`root` first on sys.path for the block. Modules named like a package or module in `root`
  but imported from elsewhere (another checkout's `configs`) are set aside meanwhile, so the
  root's own are imported; afterwards the modules imported under those names are dropped and
  the set-aside ones restored. So a load never changes what an imported name refers to; what
  it newly imports stays imported (a class the file registers in experiments.legacy.registry
  stays there)."""
  root = os.path.abspath(root)
  names = {os.path.splitext(entry)[0] for entry in os.listdir(root)
           if os.path.isdir(os.path.join(root, entry)) or entry.endswith('.py')}
  contested = {name.split('.')[0] for name, module in sys.modules.items()
               if name.split('.')[0] in names and not _located_under(module, root)
               and (getattr(module, '__file__', None) or hasattr(module, '__path__'))}
  aside = {name: module for name, module in sys.modules.items()
           if name.split('.')[0] in contested}  # whole packages: parents match children
  for name in aside:
    del sys.modules[name]
  before = set(sys.modules)
  sys.path.insert(0, root)
  try:
    yield
  finally:
    sys.path.remove(root)  # the first occurrence: the one inserted above
    for name in set(sys.modules) - before:
      if name.split('.')[0] in contested:
        del sys.modules[name]
    sys.modules.update(aside)


def load(spec: str):
  """`PATH.py[:OPTIONS]` -> the file's `get_config(OPTIONS)` (`get_config()` without
  options), run with its project root importable."""
  path, has_options, options = spec.partition(':')
  if not os.path.isfile(path):
    raise LegacyFileError(f'--config={spec}: no file {path!r} (a relative path starts at the '
                          f'working directory, {os.getcwd()})')
  arguments = (options,) if has_options else ()
  root, step = os.path.dirname(os.path.abspath(path)), f'running {path}'
  try:
    root = project_root(path)
    with importable(root):
      get_config = runpy.run_path(path).get('get_config')
      if not callable(get_config):
        raise LegacyFileError(f'--config={spec}: {path} defines no get_config function, which '
                              f'a diffuse_nnx config file provides')
      step = f'{path}: get_config({", ".join(map(repr, arguments))})'
      config = get_config(*arguments)
  except LegacyFileError:
    raise
  except Exception as e:  # the user's code: any failure becomes one message
    raise LegacyFileError(f'--config={spec}: {step} raised {type(e).__name__}: {e}'
                          f'{_where(e, root)}{_known_defect(path, options, e)}') from None
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    raise LegacyFileError(f'--config={spec}: {step} returned {type(config).__name__}, not an '
                          f'ml_collections ConfigDict')
  return config


def _where(error: Exception, root: str) -> str:
  """` (at FILE:LINE in FUNCTION)` of the innermost frame in the files under `root` (absolute),
  FILE relative to the working directory where it lies under it."""
  frames = [frame for frame in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(frame.filename).startswith(root + os.sep)]
  if not frames:
    return ''
  frame = frames[-1]
  filename = os.path.relpath(frame.filename) \
      if os.path.abspath(frame.filename).startswith(os.getcwd() + os.sep) else frame.filename
  return f' (at {filename}:{frame.lineno} in {frame.name})'


def _known_defect(path: str, options: str, error: Exception) -> str:
  """The explanation and the native replacement where `error` is a known diffuse_nnx defect."""
  defect = KNOWN_DEFECTS.get(os.path.basename(path))
  if defect is None or not isinstance(error, (AttributeError, KeyError)) or \
      not any(name in str(error) for name in defect[0]):
    return ''
  _, reason, preset_file, presets = defect
  match = re.fullmatch(r'\w*?(\d+)-(\w+?)_(\d+)', options)
  image_size, size = (int(match.group(1)), match.group(2)) if match else (256, None)
  arguments = f'(image_size={image_size})' if image_size != 256 else ''
  replacement = (f'--fdl_config={preset_file}:{presets[size]}{arguments}' if size in presets
                 else ' or '.join(f'--fdl_config={preset_file}:{name}'
                                  for name in presets.values()))
  return (f'. This is a known diffuse_nnx defect: {reason}; the native preset replacing it is '
          f'{replacement}')


def source(spec: str, overrides: dict) -> str:
  """How a converted config's values are attributed (their provenance): the --config flag with
  the file's absolute path, and the --config.FIELD=VALUE overrides."""
  path, has_options, options = spec.partition(':')
  text = f'--config={os.path.abspath(path)}{has_options}{options}'
  return ' '.join([text, *(f'--config.{name}={value!r}' for name, value in overrides.items())])


class FileParser(flags.ArgumentParser):
  """The parser of ml_collections' config-file flag (`config_flags.DEFINE_config_file`),
  loading the file with `load` and locking the config as ml_collections does (overrides
  change fields, they cannot add any); `--config.FIELD=VALUE` overrides work as before."""

  def parse(self, argument):
    config = load(argument)
    if callable(getattr(config, 'lock', None)):
      config.lock()
    return config

  def flag_type(self):
    return 'config object'
