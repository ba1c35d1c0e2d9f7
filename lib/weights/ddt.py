"""Importing MCG-NJU DDT releases (`decoupled_improved_dit.py`) into `lib.models.ddt.DDT`.

    params = import_ddt(read_state_dict('model.ckpt'), nnx.eval_shape(make_network))

The released XL/2 checkpoints are Lightning checkpoints holding `denoiser.*`, `ema_denoiser.*`
and the REPA projector `diffusion_trainer.*`; `select_denoiser` takes one copy.
"""

from typing import Mapping

import numpy as np
from absl import logging
from flax import nnx

from lib.weights import importer, torch_layout

# Key prefixes of an MCG-NJU Lightning checkpoint's `state_dict`.
EMA_PREFIX = 'ema_denoiser.'
RAW_PREFIX = 'denoiser.'
SKIPPED_PREFIXES = {'diffusion_trainer.': 'REPA projector of the training loss'}
# Our module names -> the official ones (DDT's adaLN is a bare Linear: `adaLN_modulation.0`).
MODULES = {'linear1': 'mlp.0', 'linear2': 'mlp.2', 'adaLN_modulation': 'adaLN_modulation.0',
           'embedding': 'embedding_table'}


def official_key(path: tuple) -> str:
  """NNX parameter path -> MCG-NJU DDT state-dict key (`blocks/3/adaLN_modulation/kernel` ->
  `blocks.3.adaLN_modulation.0.weight`)."""
  return torch_layout.torch_key(path, MODULES)


def select_denoiser(state_dict: Mapping[str, np.ndarray], weights: str = 'ema'
                    ) -> dict[str, np.ndarray]:
  """The denoiser's weights from a flat MCG-NJU Lightning `state_dict` (`ema_denoiser.*`,
  `denoiser.*`, `diffusion_trainer.*`), prefixes removed; a plain denoiser state dict is
  returned as it is. `weights`: 'ema' (what the release evaluates) or 'raw'."""
  if weights not in ('ema', 'raw'):
    raise ValueError(f"weights={weights!r}; expected 'ema' or 'raw'")
  keys = list(state_dict)
  if not any(k.startswith((EMA_PREFIX, RAW_PREFIX)) for k in keys):
    return dict(state_dict)
  prefix = EMA_PREFIX if weights == 'ema' else RAW_PREFIX
  if not any(k.startswith(prefix) for k in keys):
    raise importer.WeightsMismatch(f'the checkpoint has no {prefix}* weights (weights={weights!r}); it has '
                     + ', '.join(sorted({k.split('.')[0] + '.*' for k in keys})))
  out, skipped = {}, {}
  for key, value in state_dict.items():
    if key.startswith(prefix):
      name = key[len(prefix):]
      if name.startswith('_orig_mod.'):  # saved from a torch.compile'd module
        name = name[len('_orig_mod.'):]
      out[name] = value
    elif key.startswith((EMA_PREFIX, RAW_PREFIX)):
      skipped.setdefault(key.split('.')[0] + '.* (the other weights)', []).append(key)
    else:
      why = next((w for p, w in SKIPPED_PREFIXES.items() if key.startswith(p)), None)
      if why is None:
        out[key] = value  # reported as unexpected by the importer
      else:
        skipped.setdefault(f'{key.split(".")[0]}.* ({why})', []).append(key)
  logging.info('DDT checkpoint: taking %s* (%d arrays)', prefix, len(out))
  for what, group in skipped.items():
    logging.info('DDT checkpoint: skipping %d arrays %s', len(group), what)
  return out


def _describe(shapes: Mapping[str, tuple]) -> str:
  """What the weights tell of the architecture (a checkpoint's or a network's)."""
  facts = {}
  embed = shapes.get('x_embedder.proj.weight')
  if embed is not None and len(embed) == 2:
    facts.update(hidden_size=embed[0], patch_dim=embed[1])
  facts['num_blocks'] = sum(1 for key in shapes
                            if key.startswith('blocks.') and key.endswith('.attn.qkv.weight'))
  norm = shapes.get('blocks.0.attn.q_norm.weight')
  if norm is not None and 'hidden_size' in facts and norm[0]:
    facts['num_heads'] = facts['hidden_size'] // norm[0]
  head = shapes.get('final_layer.linear.weight')
  if head is not None and len(head) == 2:
    facts['out_dim'] = head[0]
  table = shapes.get('y_embedder.embedding_table.weight')
  if table is not None:
    facts['label_rows'] = table[0]
  w2 = shapes.get('blocks.0.mlp.w2.weight')
  if w2 is not None and len(w2) == 2:
    facts['ffn_dim'] = w2[1]
  for name in ('dt_embedder', 'gw_embedder'):
    if f'{name}.mlp.0.weight' in shapes:
      facts[f'take_{name[:2]}'] = True
  return ', '.join(f'{k}={v}' for k, v in facts.items())


RULES = importer.Rules(
    'DDT', lambda path: (official_key(path),), nnx.Param, describe=_describe,
    hint="set network.hidden_size / num_heads / num_blocks / num_encoder_blocks / patch_size "
         "and the data's classes to the released model's: XL/2 22en6de = 1152, 16, 28, 22, "
         'patch 2')


def import_ddt(state_dict: Mapping[str, np.ndarray], abstract, *,
               weights: str = 'ema') -> nnx.State:
  """An MCG-NJU DDT state dict ({key: torch-layout array}) as the parameters of a `DDT`.

  Key layout (`decoupled_improved_dit.py`; torch Linear weights (out, in) are transposed):

      x_embedder.proj.{weight,bias}           s_embedder.proj.{weight,bias}
      t_embedder.mlp.{0,2}.{weight,bias}      y_embedder.embedding_table.weight (K + 1, D)
      blocks.{i}.norm{1,2}.weight             blocks.{i}.attn.qkv.weight          (no bias)
      blocks.{i}.attn.{q,k}_norm.weight       blocks.{i}.attn.proj.{weight,bias}
      blocks.{i}.mlp.{w1,w2,w3}.weight        blocks.{i}.adaLN_modulation.0.{weight,bias}
      final_layer.linear.{weight,bias}        final_layer.adaLN_modulation.0.{weight,bias}

  A Lightning checkpoint (`read_state_dict('…ckpt')` returns its `state_dict`) holds
  `denoiser.*`, `ema_denoiser.*` and the REPA projector `diffusion_trainer.*`: the `weights`
  copy ('ema' by default, the one the release samples with) is taken, the rest skipped with a
  log line. The MeanFlow embedders (`take_dt`/`take_gw`) have no released weights: such a
  network cannot be filled from an official file.

  The encoder/decoder split (`num_encoder_blocks`, 22 for the XL release) cannot be read from
  the weights (every block has the same shapes): it must match the released model, or the
  outputs are wrong without any error.

  Args:
    state_dict: e.g. `lib.weights.files.read_state_dict(path)`.
    abstract: the (abstract) network, or its state (the `nnx.Param` part or all of it).
    weights: 'ema' or 'raw', for Lightning checkpoints holding both.

  Returns:
    An `nnx.State` of the network's `nnx.Param`s (float32 arrays in NNX layout).

  Raises:
    WeightsMismatch: naming every missing, unexpected and mis-shaped key.
  """
  return importer.fill(select_denoiser(state_dict, weights), abstract, RULES)
