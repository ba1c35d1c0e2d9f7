"""Importing released DINOv2 weights (Hugging Face transformers v4 / v5 names, or the official
torch-hub names) into `lib.models.dinov2.DINOv2ViT`, whose NNX paths follow the torch-hub
names (`blocks/3/attn/qkv/kernel` is `blocks.3.attn.qkv.weight`)."""

import re
from typing import Mapping

import numpy as np
from flax import nnx

from lib.weights import importer, torch_layout


_HF_PREFIXES = ('dinov2_with_registers.', 'dinov2.')
_LAYOUTS = {'hub': 'torch-hub (facebookresearch/dinov2)',
            'hf_v5': 'Hugging Face transformers v5', 'hf_v4': 'Hugging Face transformers v4'}


def hub_key(path: tuple) -> str:
  """NNX state path -> torch-hub key (`blocks.3.attn.qkv.weight`)."""
  return torch_layout.torch_key(path)


def _hf_keys(hub_key: str, layout: str) -> list[str]:
  """torch-hub key -> the HF key(s) holding it (several when HF splits a fused matrix)."""
  if layout == 'hub':
    return [hub_key]
  v5 = layout == 'hf_v5'
  block = re.fullmatch(r'blocks\.(\d+)\.(.+)', hub_key)
  if block is None:
    for hub, hf in (('cls_token', 'embeddings.cls_token'),
                    ('mask_token', 'embeddings.mask_token'),
                    ('register_tokens', 'embeddings.register_tokens'),
                    ('pos_embed', 'embeddings.position_embeddings'),
                    ('patch_embed.proj.', 'embeddings.patch_embeddings.projection.'),
                    ('norm.', 'layernorm.')):
      if hub_key.startswith(hub):
        return [hf + hub_key[len(hub):]]
    raise KeyError(hub_key)
  index, rest = block.groups()
  prefix = f'encoder.layer.{index}.'
  module, _, leaf = rest.rpartition('.')
  if module == 'attn.qkv':
    names = ('q_proj', 'k_proj', 'v_proj') if v5 else ('query', 'key', 'value')
    stem = 'attention.' if v5 else 'attention.attention.'
    return [f'{prefix}{stem}{name}.{leaf}' for name in names]
  if module == 'mlp.w12':
    return ([f'{prefix}mlp.gate_proj.{leaf}', f'{prefix}mlp.up_proj.{leaf}'] if v5
            else [f'{prefix}mlp.weights_in.{leaf}'])
  renamed = {'attn.proj': 'attention.o_proj' if v5 else 'attention.output.dense',
             'ls1': 'layer_scale1', 'ls2': 'layer_scale2',
             'mlp.w3': 'mlp.down_proj' if v5 else 'mlp.weights_out'}.get(module, module)
  leaf = 'lambda1' if leaf == 'gamma' else leaf
  return [f'{prefix}{renamed}.{leaf}']


def detect_layout(keys) -> str:
  """'hub', 'hf_v5' or 'hf_v4' from the key names of a state dict."""
  keys = list(keys)
  if any(k.startswith(('embeddings.', 'encoder.layer.')) for k in keys):
    v4 = any('.attention.attention.' in k or '.attention.output.dense.' in k
             or '.mlp.weights_in.' in k for k in keys)
    return 'hf_v4' if v4 else 'hf_v5'
  if any(k.startswith(('blocks.', 'cls_token', 'pos_embed', 'patch_embed.')) for k in keys):
    return 'hub'
  raise ValueError('not a DINOv2 state dict: expected Hugging Face keys (embeddings.*, '
                   'encoder.layer.*) or torch-hub keys (cls_token, blocks.*); got '
                   + ', '.join(sorted(keys)[:8]))


def _strip_hf_prefix(key: str) -> str:
  for prefix in _HF_PREFIXES:
    if key.startswith(prefix):
      return key[len(prefix):]
  return key


def import_state_dict(state_dict: Mapping[str, np.ndarray], abstract,
                      final_norm_affine: bool = True) -> nnx.State:
  """A HF or torch-hub DINOv2 state dict ({key: array in torch layout}; the layout is detected
  from the names) as the state of a `DINOv2ViT` (`abstract`: the network or its state).

  `mask_token` may be absent (HF `use_mask_token=False`; zeros then). With
  `final_norm_affine=False` the file's final-LayerNorm scale and bias are ignored.

  Raises:
    WeightsMismatch: naming every missing, unexpected and mis-shaped key, in the file's names.
  """
  given = {_strip_hf_prefix(key): np.asarray(value) for key, value in state_dict.items()}
  layout = detect_layout(given)
  if not final_norm_affine:
    for leaf in ('weight', 'bias'):
      for key in _hf_keys(f'norm.{leaf}', layout):
        given.pop(key, None)
  rules = importer.Rules(
      'DINOv2', lambda path: tuple(_hf_keys(hub_key(path), layout)),
      names=f'{_LAYOUTS[layout]} names',
      hint='check size, registers, swiglu and the position grid')
  return importer.fill(given, abstract, rules, optional=tuple(_hf_keys('mask_token', layout)),
                       absent='zeros')


def export_hub_state_dict(state: nnx.State) -> dict[str, np.ndarray]:
  """The inverse of `import_state_dict` for the torch-hub layout (testing, conversion)."""
  return {hub_key(path): torch_layout.to_torch(str(path[-1]), np.asarray(variable[...]))
          for path, variable in nnx.to_flat_state(state)}
