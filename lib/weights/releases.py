"""What released checkpoints expect of the run that imports them.

The weights of a release do not say everything it was trained with: which end of time is the
data, what the network's time input means, how the latents were scaled. A run that imports
them must use the same conventions, or it samples something else without any error (a
willisma/SiT checkpoint fed this project's default time, t = 0 at the data, integrates a
velocity off by about 200 %). Each importer family declares the conventions of its releases:

  network       release (recognised by)                     settings
  DiT           facebookresearch/DiT (training `args.model`  interface = lib.flow.ddpm.DDPM (noise
                DiT-..., or a file name DiT-<size>-...)      prediction, 1000 steps, linear betas)
                willisma/SiT (`args.model` SiT-..., or a     interface.network_time = 'data_at_1'
                file name SiT-<size>-...; Linear path and    (x_t = t x + (1 - t) noise)
                velocity prediction only)
                sihyun-yu/REPA (`projectors.*` keys)         interface.network_time = 'data_at_0'
                all three: SD-VAE latents times 0.18215 (encoder.raw_mean = 0, raw_std = 1,
                final_mean = 0, final_std = 0.18215), network.learn_sigma = the head's width
  LightningDiT  hustvl/LightningDiT (no `t_embedder.W`)      network_time 'data_at_1'; DiT's
                                                             sinusoidal time embedding
                bytetriper/RAE `lightningDiT.py`             network_time 'data_at_0';
                (`t_embedder.W`)                             Gaussian-Fourier time embedding
                both: network.learn_sigma, freq_embed_size from the weights
  LightningDDT  bytetriper/RAE DiT-DH                        network_time 'data_at_0';
                                                             Gaussian-Fourier time embedding
  DDT           MCG-NJU/DDT                                  network_time 'data_at_1'; SD-VAE
                                                             latents times 0.18215

(hustvl/LightningDiT releases model VA-VAE latents, an encoder this project does not have;
the settings above make the network's velocity the release's.)

`apply(config, path, source)` sets these in an unbuilt config, recording `source` (the flag
that named the file) as their provenance and logging each; a value given by a `--fdl_set` flag
that contradicts one is refused. `launch.py` applies them for `init_from`
(`apply_init_from`), `launch.py --mode=import` for its `--checkpoint`, so the
workdir's saved config carries them. A DiT-layout file that none of the rules recognises is
refused unless a `--fdl_set=interface.network_time=...` flag states its time convention.
`check(experiment, path)`, called by every import, refuses a built experiment that
contradicts the release it imports.
"""

import dataclasses
import functools
import inspect
import os
import re
from typing import Any, Callable

import fiddle as fdl
from absl import logging
from fiddle import history

from lib import paths
from lib.config import values
from lib.encoders.sd_vae import StabilityVAE
from lib.errors import ConfigError
from lib.flow import ddpm, sit
from lib.models import ddt, dit
from lib.models.lightning_ddt import LightningDDT
from lib.models.lightning_dit import LightningDiT
from lib.weights import importer
from lib.weights.files import Contents, read_contents

SD_VAE_SCALE = 0.18215  # the diffusers `scaling_factor` that DiT, SiT, REPA and DDT train with


@dataclasses.dataclass(frozen=True)
class Release:
  """The conventions of a release.

  Attributes:
    name: the project that released it ('willisma/SiT'); None for a checkpoint of a family
      with several conventions that could not be told apart.
    interface: the interface class that samples it (None: unknown).
    interface_args: arguments of that interface ({'network_time': 'data_at_1'}).
    network_args: network arguments the weights need ({'learn_sigma': True}).
    latent_scale: SD-VAE latents times this, without per-channel statistics (None: the
      release does not model SD-VAE latents).
  """
  name: str | None
  interface: type | None
  interface_args: dict[str, Any]
  network_args: dict[str, Any]
  latent_scale: float | None = None

  def settings(self) -> dict[str, Any]:
    """{config path: value} of everything but the interface class."""
    out = {f'interface.{k}': v for k, v in self.interface_args.items()}
    out.update({f'network.{k}': v for k, v in self.network_args.items()})
    if self.latent_scale is not None:
      out.update({'encoder.raw_mean': (0.0,) * 4, 'encoder.raw_std': (1.0,) * 4,
                  'encoder.final_mean': 0.0, 'encoder.final_std': self.latent_scale})
    return out


# ------------------------------------------------------------------------------- families
def _learn_sigma(shapes: dict[str, tuple]) -> dict[str, bool]:
  """{'learn_sigma': head width == 2 x input channels} from the patch embed and final layer."""
  patch, head = shapes.get('x_embedder.proj.weight'), shapes.get('final_layer.linear.weight')
  if patch is None or head is None or len(patch) != 4:
    return {}
  return {'learn_sigma': head[0] == 2 * patch[1] * patch[2] * patch[3]}


def _time_embedding(shapes: dict[str, tuple]) -> dict[str, Any]:
  """The time embedding the weights were trained with: Gaussian-Fourier (a fixed `W`) or
  DiT's sinusoid, and its feature width."""
  first = shapes.get('t_embedder.mlp.0.weight')
  out = {'continuous_time_embed': 't_embedder.W' in shapes}
  if first is not None:
    out['freq_embed_size'] = first[1]
  return out


_RELEASE_FILE = re.compile(r'(DiT|SiT)-(S|B|L|XL)-\d')


def _dit_layout(contents: Contents, path: str) -> Release:
  network = _learn_sigma(contents.shapes)
  if any(key.startswith('projectors.') for key in contents.shapes):
    return Release('sihyun-yu/REPA', sit.SiT, {'network_time': 'data_at_0'}, network,
                   SD_VAE_SCALE)
  model = str(contents.args.get('model', ''))
  match = re.match(r'(DiT|SiT)-', model) or _RELEASE_FILE.match(os.path.basename(path))
  kind = match.group(1) if match else None
  if kind == 'SiT':
    path_type = contents.args.get('path_type', 'Linear')
    prediction = contents.args.get('prediction', 'velocity')
    if (path_type, prediction) != ('Linear', 'velocity'):
      raise ConfigError(f'{path}: a willisma/SiT checkpoint trained with path_type={path_type!r}, '
                        f'prediction={prediction!r}; only the Linear path with velocity '
                        'prediction (the released SiT) has an interface here (lib.flow.sit.SiT)')
    return Release('willisma/SiT', sit.SiT, {'network_time': 'data_at_1'}, network,
                   SD_VAE_SCALE)
  if kind == 'DiT':
    return Release('facebookresearch/DiT', ddpm.DDPM, {}, network, SD_VAE_SCALE)
  return Release(None, None, {}, network)


def _lightning_dit(contents: Contents, path: str) -> Release:
  network = {**_learn_sigma(contents.shapes), **_time_embedding(contents.shapes)}
  if network['continuous_time_embed']:
    return Release('bytetriper/RAE (lightningDiT.py)', sit.SiT, {'network_time': 'data_at_0'},
                   network)
  return Release('hustvl/LightningDiT', sit.SiT, {'network_time': 'data_at_1'}, network)


def _lightning_ddt(contents: Contents, path: str) -> Release:
  return Release('bytetriper/RAE (DiT-DH)', sit.SiT, {'network_time': 'data_at_0'},
                 _time_embedding(contents.shapes))


def _mcg_ddt(contents: Contents, path: str) -> Release:
  return Release('MCG-NJU/DDT', sit.SiT, {'network_time': 'data_at_1'}, {}, SD_VAE_SCALE)


# Network class -> fn(contents, path) -> Release (subclasses use their base's), for every
# class of `lib.weights.registry.IMPORTERS`.
FAMILIES: dict[type, Callable[[Contents, str], Release]] = {
    dit.DiT: _dit_layout,
    LightningDiT: _lightning_dit,
    LightningDDT: _lightning_ddt,
    ddt.DDT: _mcg_ddt,
}


def identify(network, path: str) -> Release:
  """The release conventions of the weights file `path` for a network node (an unbuilt
  `fdl.Partial`, a partial or a class)."""
  family = importer.lookup(FAMILIES, network)
  if family is None:
    cls = importer.network_class(network)
    raise ConfigError(f'no release conventions are declared for network class '
                      f'{getattr(cls, "__qualname__", cls)} (add them to '
                      f'lib.weights.releases.FAMILIES)')
  try:
    contents = read_contents(path)
  except Exception as e:  # a file that is not a readable weights file
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f'cannot read the weights file {path}: {first_line}') from None
  return family(contents, path)


# ------------------------------------------------------------------------------- configs
def _current(node: fdl.Buildable, name: str):
  if name in node.__arguments__:
    return node.__arguments__[name]
  return inspect.signature(fdl.get_callable(node)).parameters[name].default


def _same(current, value) -> bool:
  if isinstance(value, tuple) and isinstance(current, (list, tuple)):
    return tuple(current) == value
  return current == value


def _by_flag(node: fdl.Buildable, name: str) -> bool:
  return values.value_source(node, name).startswith('--fdl_set')


def _unknown_message(path: str) -> str:
  return (f'{path}: cannot tell which release this DiT-layout checkpoint is, so not which '
          'time convention it was trained with. State it: '
          '--fdl_set=interface.network_time=data_at_1 for a willisma/SiT checkpoint '
          '(x_t = t x + (1 - t) noise, t = 1 at the data), '
          '--fdl_set=interface.network_time=data_at_0 for REPA and other t = 0 at the data '
          'checkpoints; a facebookresearch/DiT (DDPM) checkpoint is recognised by its release '
          'name (DiT-XL-2-256x256.pt) or the `args` of a DiT train.py checkpoint')


def apply(config: fdl.Buildable, path: str, source: str) -> tuple[Release, list[str]]:
  """Sets the conventions of the release at `path` in `config` (an unbuilt experiment), with
  `source` (e.g. 'init_from=FILE') as their recorded provenance. Returns the release and one
  line per value changed (also logged).

  Raises:
    ConfigError: the file's release cannot be told and no `--fdl_set` flag states its time
      convention, or a `--fdl_set` flag contradicts a convention of the release.
  """
  release = identify(config.network, path)
  if release.name is None and not _by_flag(config.interface, 'network_time'):
    raise ConfigError(_unknown_message(path))
  label = f'{source} ({release.name} release conventions)' if release.name else \
      f'{source} (what its weights show)'
  changed = []
  with history.custom_location(lambda: history.Location(label, 0, 'command line')):
    if release.interface is not None and \
        fdl.get_callable(config.interface) is not release.interface:
      old = fdl.get_callable(config.interface).__qualname__
      config.interface = fdl.Config(release.interface)
      changed.append(f'interface = {values.qualified_name(release.interface)}() (was {old})')
    for where, value in release.settings().items():
      node_name, name = where.split('.')
      node = getattr(config, node_name)
      if node_name == 'encoder' and not issubclass(fdl.get_callable(node), StabilityVAE):
        continue  # the release modelled SD-VAE latents; this run models other data
      current = _current(node, name)
      if _same(current, value):
        continue
      if _by_flag(node, name):
        what = f'a {release.name} release' if release.name else 'a checkpoint'
        raise ConfigError(f'{source} is {what}, which needs {where}={value!r}; '
                          f'{values.value_source(node, name)} contradicts it: drop that flag')
      setattr(node, name, value)
      changed.append(f'{where} = {value!r} (was {current!r})')
  for line in changed:
    logging.info('%s: %s', label, line)
  return release, changed


def apply_init_from(config: fdl.Buildable) -> None:
  """`apply` for the config's `init_from` file, when it exists (a run that resumes or samples
  its own checkpoints does not read it; its saved config already carries the conventions)."""
  path = config.init_from
  if not paths.is_file(path, 'init_from'):
    logging.warning('init_from=%s does not exist: its release conventions are not applied', path)
    return
  apply(config, path, f'init_from={path}')


# ------------------------------------------------------------------------------- experiments
def _partial_arg(partial, name: str):
  while isinstance(partial, functools.partial):
    if name in partial.keywords:
      return partial.keywords[name]
    partial = partial.func
  return inspect.signature(partial).parameters[name].default


def check(experiment, path: str) -> None:
  """Refuses a built experiment that contradicts the conventions of the release at `path`
  (`apply` them to its config before building)."""
  release = identify(experiment.network, path)
  if release.interface is None:
    return
  problems = []
  interface = experiment.interface
  if type(interface) is not release.interface:
    problems.append(f'interface is {type(interface).__qualname__}, the release needs '
                    f'{values.qualified_name(release.interface)}')
  for where, value in release.settings().items():
    node_name, name = where.split('.')
    if node_name == 'interface':
      if type(interface) is not release.interface:
        continue
      actual = getattr(interface, name)
    elif node_name == 'network':
      actual = _partial_arg(experiment.network, name)
    elif isinstance(experiment.encoder, StabilityVAE):
      actual = getattr(experiment.encoder, name)
    else:
      continue
    if not _same(actual, value):
      problems.append(f'{where} is {actual!r}, the release needs {value!r}')
  if problems:
    raise ConfigError(f'{path} is a {release.name} release; this experiment contradicts its '
                      'conventions: ' + '; '.join(problems) + ' (launch.py sets them, also with '
                      '--mode=import; in Python call lib.weights.releases.apply(config, path, '
                      'source) before fdl.build)')
