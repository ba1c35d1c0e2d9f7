"""Importing RAE decoders (`decoders/decoder.py::GeneralDecoder`, a transformers ViT-MAE decoder)
into `lib.models.rae.ViTMAEDecoder`."""

import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from lib.models import rae
from lib.weights import importer, torch_layout

# A float16-saved table is off by up to ~5e-4; another layout differs by O(1).
POS_EMBED_TOLERANCE = 1e-3


# Our module inside `decoder_layers.{i}` -> the file's module name(s), per naming scheme.
_LAYER_NAMES = {
    'rae': {'attention.qkv': ('attention.attention.query', 'attention.attention.key',
                              'attention.attention.value'),
            'attention.proj': ('attention.output.dense',),
            'mlp.fc1': ('intermediate.dense',), 'mlp.fc2': ('output.dense',)},
    'hf_v5': {'attention.qkv': ('attention.q_proj', 'attention.k_proj', 'attention.v_proj'),
              'attention.proj': ('attention.o_proj',)},
}
_LAYOUTS = {'rae': 'RAE / transformers v4', 'hf_v5': 'transformers v5'}
# Keys a ViT-MAE decoder file may carry that RAE's decoder does not use.
_IGNORED = {'mask_token': "ViT-MAE's masked-patch token (RAE masks nothing)"}


def file_keys(path: tuple[str, ...], layout: str) -> tuple[str, ...]:
  """NNX path -> the file key(s) holding it (three for the fused qkv)."""
  if path[0] != 'decoder_layers':
    return (torch_layout.torch_key(path),)
  prefix, module = f'decoder_layers.{path[1]}.', '.'.join(path[2:-1])
  leaf = torch_layout.LEAVES.get(path[-1], path[-1])
  return tuple(f'{prefix}{name}.{leaf}' for name in _LAYER_NAMES[layout].get(module, (module,)))


def _decoder_subset(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The decoder's entries: all of them, or those under `decoder.` when there are any (HF
  `ViTMAEForPreTraining`, an RAE stage-1 model), prefix stripped."""
  given = {key: np.asarray(value) for key, value in state_dict.items()}
  if not any(key.startswith('decoder.') for key in given):
    return given
  others = sorted(key for key in given if not key.startswith('decoder.'))
  if others:
    logging.info('RAE decoder: skipping %d keys outside decoder.* (%s, ...)', len(others),
                 others[0])
  return {key[len('decoder.'):]: value for key, value in given.items()
          if key.startswith('decoder.')}


def _check_pos_embed(table: np.ndarray, want: np.ndarray) -> None:
  if table.size != want.size:
    raise importer.WeightsMismatch(f'decoder_pos_embed of the file has shape {table.shape}, the decoder '
                     f'{want.shape} (check the latent grid and decoder hidden_size)')
  difference = float(np.abs(table.reshape(want.shape) - want).max())
  if difference > POS_EMBED_TOLERANCE:
    raise importer.WeightsMismatch(f'decoder_pos_embed of the file differs from the fixed MAE sin-cos table by '
                     f'up to {difference:.3g} (column half first, [sin, cos] in each half, zero '
                     'CLS row): the file uses another position embedding')


def import_decoder_state_dict(state_dict: Mapping[str, np.ndarray], abstract) -> nnx.State:
  """An RAE decoder state dict ({key: array in torch layout}) as the state of a
  `ViTMAEDecoder` (`abstract`: the network or its state).

  Accepted names: RAE's `GeneralDecoder` (= transformers v4 ViT-MAE) `decoder_embed`,
  `trainable_cls_token`, `decoder_layers.{i}.layernorm_{before,after}`,
  `decoder_layers.{i}.attention.attention.{query,key,value}`, `...attention.output.dense`,
  `...intermediate.dense`, `...output.dense`, `decoder_norm`, `decoder_pred`; or the
  transformers v5 names `attention.{q,k,v,o}_proj`, `mlp.fc{1,2}`. An optional `decoder.` prefix
  (HF `ViTMAEForPreTraining`, RAE stage-1 checkpoints) selects the decoder's keys and the rest
  is skipped; `mask_token` is skipped. `decoder_pos_embed` is not imported: when present it must
  equal the fixed sin-cos table (within 1e-3), which the result holds.

  Returns:
    The complete decoder state (parameters from the file, the fixed position table).

  Raises:
    WeightsMismatch: naming every missing, unexpected and mis-shaped key (in the file's names),
      or a foreign `decoder_pos_embed`.
  """
  given = _decoder_subset(state_dict)
  for key, why in _IGNORED.items():
    if given.pop(key, None) is not None:
      logging.info('RAE decoder: skipping %s (%s)', key, why)
  file_table = given.pop('decoder_pos_embed', None)
  v5 = any('.attention.q_proj.' in key or '.mlp.fc1.' in key for key in given)
  layout = 'hf_v5' if v5 else 'rae'
  rules = importer.Rules(
      'RAE ViTMAEDecoder', lambda path: file_keys(path, layout), nnx.Param,
      names=f'{_LAYOUTS[layout]} names',
      hint='check encoder_size / encoder_resolution and the decoder hidden_size, num_layers, '
           'mlp_dim, patch_size')
  params = importer.fill(given, abstract, rules)
  flat = list(nnx.to_flat_state(params))
  for path, variable in nnx.to_flat_state(importer.state_of(abstract)):
    if not isinstance(variable, nnx.Param):  # the fixed position table
      table = rae.decoder_pos_table(variable.shape[2], math.isqrt(variable.shape[1] - 1))
      if file_table is not None:
        _check_pos_embed(file_table, table)
      flat.append((path, variable.replace(jnp.asarray(table, variable.dtype))))
  return nnx.from_flat_state(flat)
