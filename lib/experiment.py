"""The root object of every experiment graph, and its derived values.

`fdl.build(config)` returns an `Experiment`. Building is cheap: networks and optimizers
are partials (no parameters are allocated), data sources open nothing until iterated,
and encoders load weights only in `encoder.load()`.

Derived values are computed here, once, in `__post_init__`, from the nodes they depend
on, never stored as preset leaves that an override could leave stale:

    latent_shape        = encoder.latent_shape(data.image_size, data.channels)
    network.input_size  = latent_shape[0]
    network.in_channels = latent_shape[2]
    network.num_classes = data.num_classes
    objective           = Objective(interface, terms=(repa,) if repa else ())   (lib.flow.objective)

A config may still set one of these explicitly (a legacy config does); then it must
agree with the derivation, or building fails with an error that names both values,
before any compute.
"""

import contextlib
import dataclasses
import functools
import inspect
from typing import Any, Callable

from flax import nnx

from lib import errors
from lib.errors import ConfigError
from lib import hooks
from lib.flow.objective import Objective
from lib.sharding import Sharding


def _default(fn: Callable, name: str):
  parameter = inspect.signature(fn).parameters.get(name)
  return None if parameter is None or parameter.default is inspect.Parameter.empty else \
      parameter.default


def _name(factory: Callable) -> str:
  """The name of what a partial (`network`, `optimizer`) makes: `DiT`, `adamw`."""
  function = getattr(factory, 'func', factory)
  return getattr(function, '__name__', type(function).__name__)


@contextlib.contextmanager
def _rejected(config_error: Callable[[str], ConfigError]):
  """Turns a ValueError or TypeError of a constructor (its message names its own argument)
  into the ConfigError `config_error(message)`, which names the graph node (as `presets.build`
  does for the nodes built with the graph)."""
  try:
    yield
  except (ValueError, TypeError) as e:
    if isinstance(e, errors.UserError):
      raise
    raise config_error(str(e)) from e


@dataclasses.dataclass
class Experiment:
  """A complete training run.

  Attributes:
    data: data source (`lib.data.*`): batches, image size, channels, classes.
    encoder: maps data to the modelled space and back (`lib.encoders`).
    network: partial of an NNX network, called with the derived sizes and `rngs`.
    interface: the flow formulation: training loss and sampling velocity.
    optimizer: partial of a `lib.optim` factory, called with `total_steps`.
    ema: moving average of the weights (`lib.ema`).
    sampler: ODE/SDE sampler used for visualisation, sampling and evaluation.
    checkpoint: orbax checkpoint policy.
    writers: CLU metric writers.
    report: progress reporting (a CLU periodic action).
    profile: optional CLU profiler action (None: no trace; `--fdl_set=profile=Profile()`
      creates one from the command line).
    visualize: optional sample-grid action.
    evaluate: evaluation actions.
    seed: seed of parameter initialisation and of every training random draw.
    total_steps: optimizer steps of the run.
    log_every_steps: interval of the averaged training metrics.
    sharding: device mesh and partition rules (`lib.sharding.Sharding`; None: replicate
      the state and split the batch over all devices).
    init_from: optional released weights file (e.g. `DiT-XL-2-256x256.pt`) that a run with no
      checkpoint in its workdir starts from (params and EMA), imported by the importer of the
      network's class (`lib.weights.registry.IMPORTERS`); ignored when resuming.
    repa: optional representation alignment (`lib.flow.repa.REPA`), a term of the derived
      `objective`: its projector is trained with the network and its loss added to the
      interface's; needs pixel data and an interface that evaluates the network once.
    skip_nonfinite_updates: 0 (default): a step whose loss or gradient norm is not finite
      stops the run before anything of it is saved. N > 0: such an update is skipped
      (weights, optimizer state and EMA unchanged; the step and the data move on), counted
      in `train/skipped_updates`, and the run stops after more than N in a row.
  """
  data: Any
  encoder: Any
  network: Callable[..., nnx.Module]
  interface: Any
  optimizer: Callable[..., Any]
  ema: Any
  sampler: Any
  checkpoint: Any
  writers: Any
  report: Any
  profile: hooks.Profile | None = None
  visualize: hooks.SampleGrid | None = None
  evaluate: list = dataclasses.field(default_factory=list)
  seed: int = 0
  total_steps: int = 7_000_000
  log_every_steps: int = 100
  init_from: str | None = None
  sharding: Sharding | None = None
  repa: Any = None
  skip_nonfinite_updates: int = 0

  def __post_init__(self):
    for name in ('total_steps', 'log_every_steps'):
      try:
        errors.check_positive(**{name: getattr(self, name)})
      except ValueError as e:
        raise ConfigError(str(e)) from None
    if not self.skip_nonfinite_updates >= 0:
      raise ConfigError(f'skip_nonfinite_updates={self.skip_nonfinite_updates!r}; expected 0 '
                        '(stop at the first non-finite step) or a positive count')
    try:
      self.latent_shape = tuple(self.encoder.latent_shape(self.data.image_size,
                                                          self.data.channels))
    except ValueError as e:  # the encoder cannot take this data
      raise ConfigError(str(e)) from None
    derived = {
        'input_size': (self.latent_shape[0],
                       f'data.image_size={self.data.image_size} / '
                       f'encoder.downsample_factor={self.encoder.downsample_factor}'),
        'in_channels': (self.latent_shape[2], 'encoder.latent_channels' if
                        self.encoder.latent_channels else f'data.channels={self.data.channels}'),
        'num_classes': (self.data.num_classes, f'data.num_classes={self.data.num_classes}'),
    }
    given = getattr(self.network, 'keywords', {})
    for name, (value, source) in derived.items():
      if name in given and given[name] != value:
        raise ConfigError(
            f'network.{name}={given[name]} contradicts {source} = {value}; remove the '
            f'network.{name} override (it is derived) or change {source.split("=")[0]}')
    self.network = functools.partial(self.network, **{k: v for k, (v, _) in derived.items()})
    patch = given.get('patch_size', _default(self.network.func, 'patch_size'))
    if patch and self.latent_shape[0] % patch:
      raise ConfigError(
          f'network.patch_size={patch} does not divide the latent size {self.latent_shape[0]} '
          f'(data.image_size={self.data.image_size} / encoder.downsample_factor='
          f'{self.encoder.downsample_factor}); choose a patch size that divides it')
    self.objective = Objective(self.interface, terms=() if self.repa is None else (self.repa,))
    self.objective.check(self, patch)
    if self.init_from:
      from lib.weights import registry  # the importer exists (the file is read at run time)
      try:
        registry.importer_for(self.network)
      except ValueError as e:
        raise ConfigError(f'init_from={self.init_from!r}: {e}') from None
    if not self.data.batch_size >= 1:
      raise ConfigError(f'data.batch_size={self.data.batch_size!r}; expected a positive number')

  def check(self, training: bool = True) -> None:
    """Checks, before a run touches its workdir, what can be checked without compute: the
    sizes (`check_shapes`), the data (readable, shaped as configured; `DataError` naming the
    file) and, when `training`, that the writers (a tracker's credentials), the visualisation
    and the evaluation hooks can take this experiment."""
    self.check_shapes()
    try:
      self.data.check()
    except (OSError, ValueError) as e:
      if isinstance(e, errors.UserError):
        raise
      raise errors.DataError(str(e)) from e
    if training:
      for hook in (self.writers, self.profile, self.visualize, *self.evaluate):
        if hasattr(hook, 'check'):
          hook.check(self)

  def check_shapes(self) -> nnx.Module:
    """Builds the network, the optimizer and the objective's trainables (REPA's projector)
    abstractly (`nnx.eval_shape`: shapes only, nothing allocated) and lays the batch out on
    this process's devices (`exp.sharding`), so that a size a constructor rejects or a batch
    the devices cannot split is a ConfigError naming the field (`network.num_heads=3 must
    divide hidden_size=32`) before the workdir is touched. Returns the abstract network."""
    network = self.abstract_network()
    with _rejected(lambda text: errors.at_node('optimizer', _name(self.optimizer), text)):
      self.make_optimizer()
    with _rejected(lambda text: errors.at_node('repa', type(self.repa).__name__, text)):
      nnx.eval_shape(self.objective.trainables(self.make_network, self.latent_shape, self.seed))
    layout = self.sharding or Sharding()
    layout.check_batch(self.data.batch_size, layout.make_mesh())
    return network

  def abstract_network(self) -> nnx.Module:
    """The network as shapes (`nnx.eval_shape`); a size its constructor rejects is a
    ConfigError naming the field (`network.depth=0; expected a positive number ...`)."""
    with _rejected(lambda text: errors.at_node('network', _name(self.network), text)):
      return nnx.eval_shape(self.make_network)

  def make_network(self, seed: int | None = None) -> nnx.Module:
    """The network with the derived sizes, initialised from `seed` (default: self.seed)."""
    return self.network(rngs=nnx.Rngs(self.seed if seed is None else seed))

  def make_optimizer(self):
    return self.optimizer(total_steps=self.total_steps)
