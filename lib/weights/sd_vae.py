"""Importing diffusers `AutoencoderKL` weights (e.g. stabilityai/sd-vae-ft-mse
`diffusion_pytorch_model.safetensors`) into `lib.models.sd_vae.AutoencoderKL`.

NNX paths mirror the diffusers keys one to one (`encoder/down_blocks/0/resnets/0/norm1/scale`
is `encoder.down_blocks.0.resnets.0.norm1.weight`), except `to_out` (`to_out.0`); files saved
before diffusers' `Attention` refactor name the attention's Linears `query`, `key`, `value`,
`proj_attn`, renamed on load as diffusers does.
"""

from typing import Mapping

import numpy as np
from flax import nnx

from lib.weights import importer, torch_layout

# Attention names of diffusers checkpoints saved before the `Attention` refactor (diffusers
# renames them on load, see its `_convert_deprecated_attention_blocks`).
_LEGACY_ATTENTION_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v',
                           'proj_attn': 'to_out.0'}


def diffusers_key(path: tuple) -> str:
  """NNX state path -> diffusers state-dict key."""
  return torch_layout.torch_key(path, {'to_out': 'to_out.0'})


def _rename_legacy(key: str) -> str:
  parts = key.split('.')
  if 'attentions' in parts and parts[-2] in _LEGACY_ATTENTION_NAMES:
    parts[-2] = _LEGACY_ATTENTION_NAMES[parts[-2]]
  return '.'.join(parts)


RULES = importer.Rules(
    'AutoencoderKL', lambda path: (diffusers_key(path),),
    hint='check that the file is a diffusers AutoencoderKL and that encoder.block_out_channels '
         '/ layers_per_block / norm_num_groups match it')


def import_diffusers_state_dict(state_dict: Mapping[str, np.ndarray], abstract) -> nnx.State:
  """A diffusers `AutoencoderKL` state dict ({key: array in torch layout}) as the state of an
  `AutoencoderKL` (`abstract`: the network or its state).

  Raises:
    WeightsMismatch: naming every missing, unexpected and mis-shaped key.
  """
  return importer.fill({_rename_legacy(key): value for key, value in state_dict.items()},
                       abstract, RULES)
