"""Names of components, for configs that name them by string: diffuse_nnx's `*_class`
fields (`network_class='dit'`), which `experiments/legacy/converter.py` turns into experiment
graphs.

    registry.resolve('network', 'dit')              -> lib.models.dit.DiT
    registry.register('network', 'my_net', MyNet)   # a new name is one line,
    @registry.register('network', 'my_net')         # or a class decorator
    registry.names('sampler')                       -> ['euler', 'euler-maruyama', ...]

A target is an object or a 'module:attribute' string imported when the name is resolved, so
importing the registry imports no model code and never fails because a module is missing.
"""

import importlib
from typing import Any

# kind -> name -> target. diffuse_nnx's names (its `utils/initialize.py` registries), plus
# `data` (this project's data sources; diffuse_nnx chose between two by `data.latent_dataset`)
# and `schedule` (diffuse_nnx's `learning_rate_schedule` strings).
_TARGETS: dict[str, dict[str, Any]] = {
    'data': {
        'latents': 'lib.data.latents:LatentFolder',
        'images': 'lib.data.images:ImageFolder',
        'prepared': 'lib.data.prepared:PreparedImages',
        'digits': 'lib.data.digits:Digits',
    },
    'encoder': {
        'RGB': 'lib.encoders.pixels:PixelEncoder',
        'StabilityVAE': 'lib.encoders.sd_vae:StabilityVAE',
        'RAE': 'lib.encoders.rae:RAE',
    },
    'network': {
        'dit': 'lib.models.dit:DiT',
        'lightning_dit': 'lib.models.lightning_dit:LightningDiT',
        'lightning_ddt': 'lib.models.lightning_ddt:LightningDDT',
    },
    'interface': {
        'sit': 'lib.flow.sit:SiT',
        'edm': 'lib.flow.edm:EDM',
        'mean_flow': 'lib.flow.meanflow:MeanFlow',
    },
    'repa': {'repa': 'lib.flow.repa:REPA'},
    'detector': {'dino': 'lib.encoders.dinov2:DINOv2'},
    'optimizer': {'adam': 'lib.optim:adam', 'adamw': 'lib.optim:adamw', 'sgd': 'lib.optim:sgd'},
    'schedule': {
        'constant': 'lib.optim:constant',
        'linear-constant': 'lib.optim:linear_constant',
        'linear': 'lib.optim:linear',
        'cosine': 'lib.optim:cosine',
        'polynomial': 'lib.optim:polynomial',
        'edm2': 'lib.optim:inverse_sqrt',
    },
    'sampler': {
        'euler': 'lib.flow.samplers:Euler',
        'euler_jump': 'lib.flow.samplers:EulerJump',
        'heun': 'lib.flow.samplers:Heun',
        'euler-maruyama': 'lib.flow.samplers:EulerMaruyama',
    },
    'ema': {'ema': 'lib.ema:EMA', 'power_ema': 'lib.ema:PowerEMA'},
}


class RegistryError(LookupError):
  """A name that is not registered, or whose target cannot be imported."""


def kinds() -> list[str]:
  return sorted(_TARGETS)


def names(kind: str) -> list[str]:
  return sorted(_kind(kind))


def _kind(kind: str) -> dict[str, Any]:
  if kind not in _TARGETS:
    raise RegistryError(f'no registry {kind!r}; registries: {", ".join(kinds())}')
  return _TARGETS[kind]


def register(kind: str, name: str, target: Any = None):
  """Makes `name` resolve to `target` (an object or 'module:attribute'); without a target,
  returns a decorator. Registering a taken name for another target is refused."""
  if target is None:
    return lambda decorated: register(kind, name, decorated)
  entries = _kind(kind)
  if name in entries and _describe(entries[name]) != _describe(target):
    raise RegistryError(f'{kind} {name!r} is already registered as {_describe(entries[name])}; '
                        f'choose another name')
  entries[name] = target
  return target


def resolve(kind: str, name: str) -> Any:
  """The object registered as `name`, imported if given as 'module:attribute'."""
  entries = _kind(kind)
  if name not in entries:
    raise RegistryError(f'unknown {kind} {name!r}; registered {kind} names: '
                        f'{", ".join(names(kind))} (register another with '
                        f"experiments.legacy.registry.register('{kind}', NAME, TARGET))")
  target = entries[name]
  if not isinstance(target, str):
    return target
  module, attribute = target.split(':')
  try:
    return getattr(importlib.import_module(module), attribute)
  except (ImportError, AttributeError) as e:
    raise RegistryError(f'{kind} {name!r} is {target}, which cannot be imported: {e}') from None


def _describe(target: Any) -> str:
  return target if isinstance(target, str) else \
      f'{getattr(target, "__module__", "?")}:{getattr(target, "__qualname__", target)}'
