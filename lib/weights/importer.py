"""The one procedure that imports a released state dict into an NNX network.

    expected keys -> key_problems -> convert layout -> nnx.State

Every family (`lib.weights.dit`, `lightning`, `ddt`, `sd_vae`, `rae`, `dinov2`, and the FID
Inception of `lib.eval.inception`) is a `Rules` table on top of `fill`: how an NNX variable path
is named in the file, which variables the file holds, and what to say when it does not fit.
Family importers share one calling convention,

    import_<family>(state_dict, abstract) -> nnx.State

`state_dict` {key: array in torch layout} (`lib.weights.files.read_state_dict`), `abstract` the
network (`nnx.eval_shape(make_network)`) or its state; the result holds the variables the
file gave, in NNX layout, to merge with the network's graphdef or `nnx.update` into it. A file
that does not fit raises `WeightsMismatch`, naming every missing, unexpected and mis-shaped key.
"""

import dataclasses
from typing import Callable, Mapping

import fiddle as fdl
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import errors
from lib.weights import torch_layout
from lib.weights.files import key_problems


class WeightsMismatch(errors.UserError):
  """A state dict whose keys or shapes do not fit the network (or another family's file)."""


@dataclasses.dataclass(frozen=True)
class Rules:
  """How a family's files name a network's variables.

  Attributes:
    name: the network, in messages ('DiT', 'RAE ViTMAEDecoder').
    keys: NNX path (strings) -> the file key(s) holding it; several keys are concatenated
      along torch axis 0 (a fused qkv stored as query, key, value).
    variables: the variable type the file holds (`nnx.Param`; `nnx.Variable`: all of them).
    names: the file's naming scheme, in messages ('torch-hub (facebookresearch/dinov2) names').
    hint: what to check when the file does not fit.
    describe: the architecture readable from {key: torch shape}, printed for the file and the
      network when they do not fit.
  """
  name: str
  keys: Callable[[tuple[str, ...]], tuple[str, ...]]
  variables: type = nnx.Variable
  names: str = ''
  hint: str = ''
  describe: Callable[[Mapping[str, tuple]], str] | None = None


def state_of(abstract) -> nnx.State:
  """The state of a network (or a state, as it is)."""
  return nnx.state(abstract) if isinstance(abstract, nnx.Module) else abstract


def _plan(state: nnx.State, rules: Rules):
  """(path, variable, file keys, torch shape of each key) of each variable the file holds."""
  for path, variable in nnx.to_flat_state(state):
    if isinstance(variable, rules.variables):
      parts = tuple(str(part) for part in path)
      keys = tuple(rules.keys(parts))
      shape = torch_layout.torch_shape(parts[-1], variable.shape)
      yield path, variable, keys, (shape[0] // len(keys), *shape[1:])


def fill(given: Mapping[str, np.ndarray], abstract, rules: Rules, *,
         optional: tuple[str, ...] = (), absent: str = 'omit', unused: tuple[str, ...] = ()
         ) -> nnx.State:
  """The variables of `abstract` (a network or its state) that `rules` import, from `given`
  ({file key: torch-layout array}, already stripped of what the family skips).

  Keys starting with a prefix in `optional` may be absent: their variables are left out of the
  result (`absent='omit'`: a model updated with it keeps its own) or zero (`absent='zeros'`).
  Keys in `unused` are not imported (a fixed table the family checks itself) but describe the
  file when it does not fit.

  Raises:
    WeightsMismatch: naming each missing, unexpected and mis-shaped key (`key_problems`).
  """
  plan = list(_plan(state_of(abstract), rules))
  want = {key: shape for _, _, keys, shape in plan for key in keys}
  found = {key: tuple(np.shape(value)) for key, value in given.items() if key not in unused}
  problems = key_problems(found, want, tuple(k for k in want if k.startswith(optional)))
  if problems:
    found.update({key: tuple(np.shape(given[key])) for key in unused if key in given})
    raise WeightsMismatch(_mismatch_message(rules, problems, found, want))
  flat = []
  for path, variable, keys, _ in plan:
    if all(key in given for key in keys):
      parts = [np.asarray(given[key]) for key in keys]
      array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
      array = torch_layout.from_torch(str(path[-1]), array)
    elif absent == 'zeros':
      array = np.zeros(variable.shape, np.float32)
    else:
      continue
    flat.append((path, variable.replace(jnp.asarray(array, variable.dtype))))
  return nnx.from_flat_state(flat)


def _mismatch_message(rules: Rules, problems: list[str], found: Mapping[str, tuple],
                     want: Mapping[str, tuple]) -> str:
  """'the state dict (NAMES) does not match this NAME: PROBLEMS', then the architecture of
  both (`rules.describe`) and the hint, one per line."""
  names = f' ({rules.names})' if rules.names else ''
  lines = [f'the state dict{names} does not match this {rules.name}: ' + '; '.join(problems)]
  if rules.describe is not None:
    lines += [f'  checkpoint: {rules.describe(found)}', f'  network:    {rules.describe(want)}']
  if rules.hint:
    lines.append(f'  ({rules.hint})')
  return '\n'.join(lines)


def network_class(network) -> type:
  """The module class of a network node (a class, a functools partial or an unbuilt
  `fdl.Partial` of one)."""
  if isinstance(network, fdl.Buildable):
    return fdl.get_callable(network)
  while hasattr(network, 'func'):
    network = network.func
  return network


def lookup(table: dict[type, object], network):
  """The entry of `table` ({network class: value}) for a network node's class, or of its
  nearest base class; None if there is none."""
  for base in getattr(network_class(network), '__mro__', ()):
    if base in table:
      return table[base]
  return None
