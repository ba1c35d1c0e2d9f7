"""The torch <-> NNX layout of parameters, the one place these rules live.

    torch                          NNX
    nn.Linear.weight (out, in)     Linear kernel (in, out)
    nn.Conv2d.weight (O, I, H, W)  Conv kernel (H, W, I, O)
    <norm>.weight                  <norm> scale
    nn.Embedding.weight            Embed embedding
    <module>.bias                  bias (as is)

Arrays are converted by their NNX leaf name: only `kernel`s change layout. A torch key is the
NNX path joined with dots, with module names renamed by a family's table (DiT's `linear1` is
`mlp.0`) and leaf names by `LEAVES`.
"""

from typing import Mapping

import numpy as np

# NNX leaf name -> torch parameter name (leaves not listed keep their name).
LEAVES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}


def torch_key(path: tuple, modules: Mapping[str, str] = {}, leaves: Mapping[str, str] = LEAVES
              ) -> str:
  """NNX path -> torch state-dict key: module names through `modules`, the leaf through
  `leaves` (`('blocks', 0, 'attn', 'qkv', 'kernel')` -> 'blocks.0.attn.qkv.weight')."""
  *parents, leaf = (str(part) for part in path)
  return '.'.join([modules.get(name, name) for name in parents] + [leaves.get(leaf, leaf)])


def torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of an NNX variable in torch layout (conv HWIO -> OIHW, Linear (in, out) ->
  (out, in))."""
  if leaf == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == 'kernel' and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def from_torch(leaf: str, array: np.ndarray) -> np.ndarray:
  """A torch-layout array in NNX layout (the inverse of `torch_shape`)."""
  if leaf == 'kernel' and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if leaf == 'kernel' and array.ndim == 2:
    return array.T
  return array


def to_torch(leaf: str, array: np.ndarray) -> np.ndarray:
  """An NNX-layout array in torch layout (exports, tests)."""
  if leaf == 'kernel' and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  if leaf == 'kernel' and array.ndim == 2:
    return array.T
  return array
