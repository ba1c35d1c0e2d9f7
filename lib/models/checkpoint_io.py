"""Reading released weight files into flat `{key: numpy array}` state dicts.

    read_state_dict('DiT-XL-2-256x256.pt')                  # torch pickle (needs torch)
    read_state_dict('diffusion_pytorch_model.safetensors')  # safetensors (needs safetensors)
    read_state_dict('weights.npz')                          # numpy archive

Only file reading lives here; mapping keys onto a network is the job of each importer
(`lib.models.sd_vae.import_diffusers_state_dict`, `lib.models.import_weights`).

Torch pickles (`.pt`, `.pth`, `.bin`, `.ckpt`) are opened with `torch.load(weights_only=True)`,
so a file cannot run code; `argparse.Namespace` (the `args` entry of DiT/SiT/REPA training
checkpoints) is the only extra class allowed. Training checkpoints are dicts of several state
dicts; the weights are taken from the first of `ema`, `model`, `state_dict`, `module` that is a
dict (the EMA is what these projects evaluate). `module.` (DistributedDataParallel) and
`_orig_mod.` (torch.compile) prefixes are stripped. Floating-point arrays become float32 (fp16
and bf16 releases included); other dtypes are kept.
"""

import argparse
import os

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


def _read_torch(path: str) -> dict:
  try:
    import torch
  except ImportError as error:
    raise ImportError(f'reading {path} (a torch pickle) needs torch: pip install torch, or '
                      'convert the file to .safetensors') from error
  with torch.serialization.safe_globals([argparse.Namespace]):
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(checkpoint, dict):
    raise ValueError(f'{path}: expected a state dict or a training checkpoint dict, got '
                     f'{type(checkpoint).__name__}')
  state_dict = unwrap(checkpoint, path)
  out = {}
  for key, value in state_dict.items():
    if isinstance(value, torch.Tensor):
      value = value.detach()
      out[key] = (value.float() if value.is_floating_point() else value).numpy()
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """`{key: array}` (floating point as float32) from a `.safetensors`, `.npz` or torch pickle
  (`.pt`, `.pth`, `.bin`, `.ckpt`) file; see the module docstring for torch checkpoints."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path!r} does not exist')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    state_dict = load_file(path)
  elif path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as archive:
      state_dict = {key: archive[key] for key in archive.files}
  elif path.endswith(TORCH_SUFFIXES):
    state_dict = _read_torch(path)
  else:
    raise ValueError(f'{path!r}: unknown weights file type; expected one of '
                     f'{", ".join(SUFFIXES)}')
  if not state_dict:
    raise ValueError(f'{path}: no arrays found')
  return {_strip_prefixes(key): _float32(np.asarray(value)) for key, value in state_dict.items()}
