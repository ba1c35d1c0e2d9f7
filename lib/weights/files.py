"""Reading released weight files into flat `{key: numpy array}` state dicts.

    read_state_dict('DiT-XL-2-256x256.pt')                  # torch pickle (needs torch)
    read_state_dict('diffusion_pytorch_model.safetensors')  # safetensors (needs safetensors)
    read_state_dict('weights.npz')                          # numpy archive

Only file reading, and the one report of a state dict that does not fit a network
(`key_problems`), live here; mapping keys onto a network is the job of `lib.weights.importer`
and each family's rules (`lib.weights.dit`, `lib.weights.sd_vae`, ...).

Torch pickles (`.pt`, `.pth`, `.bin`, `.ckpt`) are opened with `torch.load(weights_only=True)`,
so a file cannot run code; `argparse.Namespace` (the `args` entry of DiT/SiT/REPA training
checkpoints) is the only extra class allowed. Training checkpoints are dicts of several state
dicts; the weights are taken from the first of `ema`, `model`, `state_dict`, `module` that is a
dict (the EMA is what these projects evaluate). `module.` (DistributedDataParallel) and
`_orig_mod.` (torch.compile) prefixes are stripped. Floating-point arrays become float32 (fp16
and bf16 releases included); other dtypes are kept.
"""

import argparse
import dataclasses
import io
import os
import re

import numpy as np
from absl import logging

TORCH_SUFFIXES = ('.pt', '.pth', '.bin', '.ckpt')
SUFFIXES = ('.safetensors', '.npz', *TORCH_SUFFIXES)
# Entries of a training checkpoint that hold weights, in order of preference.
CONTAINER_KEYS = ('ema', 'model', 'state_dict', 'module')
_PREFIXES = ('module.', '_orig_mod.')


def _float32(array: np.ndarray) -> np.ndarray:
  return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def _strip_prefixes(key: str) -> str:
  changed = True
  while changed:
    changed = False
    for prefix in _PREFIXES:
      if key.startswith(prefix):
        key, changed = key[len(prefix):], True
  return key


def unwrap(checkpoint: dict, path: str = '') -> dict:
  """The state dict inside a training checkpoint (`{'ema': {...}, 'opt': ..., 'args': ...}`),
  or `checkpoint` itself when it already maps names to arrays."""
  while isinstance(checkpoint, dict):
    containers = [key for key in CONTAINER_KEYS if isinstance(checkpoint.get(key), dict)]
    if not containers:
      return checkpoint
    others = sorted(str(key) for key in checkpoint if key != containers[0])
    logging.info('%s: taking the weights under %r (other entries: %s)', path or 'checkpoint',
                 containers[0], ', '.join(others) or 'none')
    checkpoint = checkpoint[containers[0]]
  raise ValueError(f'{path}: expected a state dict (a dict of tensors), got '
                   f'{type(checkpoint).__name__}')


def _load_torch(path: str, mmap: bool = False) -> dict:
  """The dict in a torch pickle, local or in a bucket; `mmap`: tensors of a local zip-format
  file memory-mapped, not read."""
  from lib import paths

  try:
    import torch
  except ImportError as error:
    raise ImportError(f'reading {path} (a torch pickle) needs torch: pip install torch, or '
                      'convert the file to .safetensors') from error
  with torch.serialization.safe_globals([argparse.Namespace]):
    if paths.is_url(path):
      data = paths.resolve(path, 'weights file').read_bytes()
      checkpoint = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    else:
      try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
      except RuntimeError:
        if not mmap:
          raise
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)  # legacy format
  if not isinstance(checkpoint, dict):
    raise ValueError(f'{path}: expected a state dict or a training checkpoint dict, got '
                     f'{type(checkpoint).__name__}')
  return checkpoint


def _read_torch(path: str) -> dict:
  import torch

  state_dict = unwrap(_load_torch(path), path)
  out = {}
  for key, value in state_dict.items():
    if isinstance(value, torch.Tensor):
      value = value.detach()
      out[key] = (value.float() if value.is_floating_point() else value).numpy()
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """`{key: array}` (floating point as float32) from a `.safetensors`, `.npz` or torch pickle
  (`.pt`, `.pth`, `.bin`, `.ckpt`) file, local or in a bucket; see the module docstring for
  torch checkpoints."""
  from lib import paths

  path = os.fspath(path)
  file = paths.resolve(path, 'weights file')
  if not file.is_file():
    raise FileNotFoundError(f'{path!r} does not exist')
  if not path.endswith(SUFFIXES):
    raise ValueError(f'{path!r}: unknown weights file type; expected one of '
                     f'{", ".join(SUFFIXES)}')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load
    state_dict = load(file.read_bytes())
  elif path.endswith('.npz'):
    with np.load(io.BytesIO(file.read_bytes()), allow_pickle=False) as archive:
      state_dict = {key: archive[key] for key in archive.files}
  else:
    state_dict = _read_torch(path)
  if not state_dict:
    raise ValueError(f'{path}: no arrays found')
  return {_strip_prefixes(key): _float32(np.asarray(value)) for key, value in state_dict.items()}


@dataclasses.dataclass(frozen=True)
class Contents:
  """What a weights file holds, read without loading its arrays (torch pickles are
  memory-mapped): its state dict's keys and shapes (prefixes stripped, as `read_state_dict`),
  and the training arguments saved with it (`vars(checkpoint['args'])` of a DiT / SiT / REPA
  `train.py` checkpoint; empty for a bare state dict)."""
  shapes: dict[str, tuple[int, ...]]
  args: dict


def read_contents(path: str) -> Contents:
  """The `Contents` of a `.safetensors`, `.npz` or torch weights file, local or in a bucket
  (a bucket's file is read whole; a local one only in its header)."""
  from lib import paths

  path = os.fspath(path)
  file = paths.resolve(path, 'weights file')
  if not file.is_file():
    raise FileNotFoundError(f'{path!r} does not exist')
  args = {}
  if path.endswith('.safetensors'):
    if paths.is_url(path):
      from safetensors.numpy import load
      shapes = {key: value.shape for key, value in load(file.read_bytes()).items()}
    else:
      from safetensors import safe_open
      with safe_open(path, 'numpy') as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
  elif path.endswith('.npz'):
    with file.open('rb') as f, np.load(f, allow_pickle=False) as archive:
      shapes = {key: archive[key].shape for key in archive.files}
  elif path.endswith(TORCH_SUFFIXES):
    checkpoint = _load_torch(path, mmap=True)
    if isinstance(checkpoint.get('args'), argparse.Namespace):
      args = dict(vars(checkpoint['args']))
    shapes = {key: tuple(value.shape) for key, value in unwrap(checkpoint, path).items()
              if hasattr(value, 'shape')}
  else:
    raise ValueError(f'{path!r}: unknown weights file type; expected one of '
                     f'{", ".join(SUFFIXES)}')
  return Contents({_strip_prefixes(key): tuple(shape) for key, shape in shapes.items()}, args)


def _ranges(indices: list[int]) -> str:
  """[0, 1, 2, 5] -> '{0-2,5}'; [3] -> '3'."""
  if len(indices) == 1:
    return str(indices[0])
  runs, start = [], indices[0]
  for previous, current in zip(indices, indices[1:] + [None]):
    if current is None or current != previous + 1:
      runs.append(str(start) if start == previous else f'{start}-{previous}')
      start = current
  return '{' + ','.join(runs) + '}'


def _compact(keys: list[str], found: dict, want: dict, shapes: bool) -> list[str]:
  """Keys with their first layer index folded (`blocks.{2-27}.attn.qkv.weight`); with
  `shapes`, each entry also gives `: checkpoint (..), network (..)` (grouped only when equal)."""
  groups = {}
  for key in keys:
    match = re.fullmatch(r'(.+?)\.(\d+)\.(.+)', key)
    group = (match.group(1), match.group(3)) if match else (key, None)
    shape = (found.get(key), want.get(key)) if shapes else None
    groups.setdefault((group, shape), []).append(int(match.group(2)) if match else None)

  def order(item):
    ((stem, rest), _), indices = item
    return (stem, -1 if rest is None else min(indices), rest or '')

  out = []
  for ((stem, rest), shape), indices in sorted(groups.items(), key=order):
    name = stem if rest is None else f'{stem}.{_ranges(sorted(indices))}.{rest}'
    out.append(f'{name}: checkpoint {shape[0]}, network {shape[1]}' if shapes else name)
  return out


def key_problems(found: dict[str, tuple], want: dict[str, tuple],
                 optional: tuple[str, ...] = ()) -> list[str]:
  """How a state dict ({key: shape} `found`) fails to fit a network ({key: shape} `want`, in
  the file's names): one line per kind (`missing keys (n): ...`, `unexpected keys`,
  `mis-shaped keys` with checkpoint vs network shapes), layer indices compacted
  (`blocks.{2-27}...`). Keys in `optional` may be absent. Empty when everything fits."""
  missing = sorted(k for k in set(want) - set(found) if k not in optional)
  unexpected = sorted(set(found) - set(want))
  misshaped = sorted(k for k in want if k in found and tuple(found[k]) != tuple(want[k]))
  kinds = (('missing keys', missing, False), ('unexpected keys', unexpected, False),
           ('mis-shaped keys', misshaped, True))
  return [f'{label} ({len(keys)}): ' + ('; ' if shapes else ', ').join(
      _compact(keys, found, want, shapes)) for label, keys, shapes in kinds if keys]
