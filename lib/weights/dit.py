"""Importing released DiT-family weights into the project's NNX networks.

    params = import_dit(read_state_dict('SiT-XL-2-256x256.pt'), abstract_network)

(`launch.py --mode=import` and `Experiment.init_from` reach it through `lib.weights.registry`.)

facebookresearch/DiT layout (`models.py`; also the SiT and REPA releases), and where each key
lands in `lib.models.dit.DiT`:

    x_embedder.proj.{weight,bias}              x_embedder/proj/{kernel,bias}    OIHW -> HWIO
    t_embedder.mlp.{0,2}.{weight,bias}         t_embedder/linear{1,2}/...       (out, in) -> (in, out)
    y_embedder.embedding_table.weight          y_embedder/embedding/embedding   (K + 1, D), as is
    blocks.{i}.attn.qkv.{weight,bias}          blocks/i/attn/qkv/...            fused (3D, D), q|k|v
    blocks.{i}.attn.proj.{weight,bias}         blocks/i/attn/proj/...
    blocks.{i}.mlp.fc{1,2}.{weight,bias}       blocks/i/mlp/fc{1,2}/...
    blocks.{i}.adaLN_modulation.1.{w,b}        blocks/i/adaLN_modulation/...    (Sequential(SiLU, Linear))
    final_layer.linear.{weight,bias}           final_layer/linear/...           p*p*C_out wide
    final_layer.adaLN_modulation.1.{w,b}       final_layer/adaLN_modulation/...
    pos_embed  (1, N, D)                       checked against the fixed sin-cos table, not imported

Released heads are 2C wide when trained with a learned sigma (DiT, SiT); they import into
`network.learn_sigma=True` (the network returns the first C channels), which the release
conventions set. REPA checkpoints carry
the alignment projectors (`projectors.*`, training only): they are skipped with a log line.
Every other key must match exactly; otherwise the error names each missing, unexpected and
mis-shaped key and compares the checkpoint's inferred architecture with the network's.
`num_heads` cannot be read from the weights (the fused qkv is (3D, D) for any head count): it
must match the released model (DiT-S 6, B 12, L 16, XL 16).
"""

import math
from typing import Mapping

import numpy as np
from absl import logging
from flax import nnx

from lib.models import layers
from lib.weights import importer, torch_layout

# Keys of released checkpoints that are skipped, with why.
IGNORED_PREFIXES = {'projectors.': 'REPA alignment projectors (used only by its training loss)'}
# A fp16-saved table is off by up to ~5e-4; a different layout differs by O(1).
POS_EMBED_TOLERANCE = 2e-3

# Our module names -> the official ones (DiT's, shared by the LightningDiT releases).
MODULES = {'linear1': 'mlp.0', 'linear2': 'mlp.2', 'adaLN_modulation': 'adaLN_modulation.1',
           'embedding': 'embedding_table'}


def official_key(path: tuple) -> str:
  """NNX parameter path -> facebookresearch/DiT state-dict key."""
  return torch_layout.torch_key(path, MODULES)


def describe_dit(shapes: dict[str, tuple[int, ...]]) -> str:
  """The DiT hyperparameters readable from `{official key: torch shape}` (a checkpoint's or
  a network's), e.g. 'hidden_size=1152, depth=28, patch_size=2, in_channels=4, ...'."""
  facts = {}
  patch = shapes.get('x_embedder.proj.weight')
  if patch is not None and len(patch) == 4:
    facts.update(hidden_size=patch[0], patch_size=patch[2], in_channels=patch[1])
  facts['depth'] = sum(1 for key in shapes
                       if key.startswith('blocks.') and key.endswith('.attn.qkv.weight'))
  fc1 = shapes.get('blocks.0.mlp.fc1.weight')
  if fc1 is not None and 'hidden_size' in facts:
    facts['mlp_ratio'] = fc1[0] / facts['hidden_size']
  table = shapes.get('y_embedder.embedding_table.weight')
  if table is not None:
    facts['label_rows'] = table[0]
  head = shapes.get('final_layer.linear.weight')
  if head is not None and 'patch_size' in facts:
    out_channels = head[0] // facts['patch_size'] ** 2
    facts['out_channels'] = out_channels
    facts['learn_sigma'] = out_channels == 2 * facts['in_channels']
  freq = shapes.get('t_embedder.mlp.0.weight')
  if freq is not None:
    facts['freq_embed_size'] = freq[1]
  pos = shapes.get('pos_embed')
  if pos is not None and 'patch_size' in facts:
    facts['input_size'] = math.isqrt(pos[1]) * facts['patch_size']
  for name in ('dt_embedder', 't_embedder', 'gw_embedder'):
    if name != 't_embedder' and f'{name}.mlp.0.weight' in shapes:
      facts[f'take_{name[:2]}'] = True
  return ', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in facts.items())


def _check_pos_embed(table: np.ndarray, hidden_size: int | None, our_tokens: int | None,
                     on_mismatch: str) -> None:
  """The checkpoint's frozen `pos_embed` must be the 2-D sin-cos table our DiT rebuilds."""
  table = np.asarray(table, np.float64).reshape(-1, table.shape[-1])
  tokens, width = table.shape
  grid = math.isqrt(tokens)
  problem = None
  if grid * grid != tokens:
    problem = f'{tokens} tokens is not a square grid'
  elif hidden_size is not None and width != hidden_size:
    problem = f'width {width}, the network has hidden_size={hidden_size}'
  else:
    difference = float(np.abs(table - layers.sincos_2d(width, grid)).max())
    if difference > POS_EMBED_TOLERANCE:
      problem = (f'max |difference| {difference:.3g} from the DiT 2-D sin-cos table of a '
                 f'{grid}x{grid} grid (column half first, [sin, cos] in each half); the '
                 'checkpoint uses another position embedding (learned, interpolated or another '
                 'layout) that this network cannot reproduce')
  if problem:
    message = f'pos_embed of the checkpoint: {problem}'
    if on_mismatch == 'raise':
      raise importer.WeightsMismatch(message + " (pass on_pos_embed_mismatch='warn' to import "
                                   'anyway)')
    logging.warning('%s; importing the other weights anyway', message)
    return
  if our_tokens is not None and our_tokens != tokens:
    logging.info('The checkpoint was trained on a %dx%d token grid, this network uses %dx%d: '
                 'its fixed position table is rebuilt for the new size.', grid, grid,
                 math.isqrt(our_tokens), math.isqrt(our_tokens))


RULES = importer.Rules(
    'DiT', lambda path: (official_key(path),), nnx.Param, describe=describe_dit,
    hint="set network.hidden_size / depth / patch_size / mlp_ratio / learn_sigma and the "
         "data's classes to the released model's")


def import_dit(state_dict: Mapping[str, np.ndarray], abstract, *,
               on_pos_embed_mismatch: str = 'raise') -> nnx.State:
  """A facebookresearch/DiT-layout state dict ({key: torch-layout array}) as the parameters
  of a `lib.models.dit.DiT`.

  Args:
    state_dict: e.g. `read_state_dict('DiT-XL-2-256x256.pt')`.
    abstract: the network (`nnx.eval_shape(make_network)`) or its state (the `nnx.Param` part
      or all of it: the fixed `pos_embed` Buffer is used only for the checks and left out of
      the result).
    on_pos_embed_mismatch: 'raise' or 'warn' when the checkpoint's `pos_embed` is not our
      fixed sin-cos table.

  Returns:
    An `nnx.State` of the network's `nnx.Param`s (float32 arrays in NNX layout), to merge with
    the graphdef and buffers of the network.

  Raises:
    WeightsMismatch: naming every missing, unexpected and mis-shaped key, or a foreign
      pos_embed.
  """
  if on_pos_embed_mismatch not in ('raise', 'warn'):
    raise ValueError(f"on_pos_embed_mismatch={on_pos_embed_mismatch!r}: use 'raise' or 'warn'")
  state = importer.state_of(abstract)
  given = {key: np.asarray(value) for key, value in state_dict.items()}
  for prefix, why in IGNORED_PREFIXES.items():
    skipped = sorted(key for key in given if key.startswith(prefix))
    if skipped:
      logging.info('Skipping %d checkpoint keys %s* (%s)', len(skipped), prefix, why)
      for key in skipped:
        del given[key]
  params = importer.fill(given, state, RULES, unused=('pos_embed',))
  pos_embed = given.get('pos_embed')
  if pos_embed is None:
    logging.info('The checkpoint has no pos_embed; the fixed sin-cos table is not checked.')
  else:
    flat = dict(nnx.to_flat_state(state))
    our_table = flat.get(('pos_embed',))
    hidden_size = flat[('x_embedder', 'proj', 'kernel')].shape[-1]  # (p, p, C, hidden)
    _check_pos_embed(pos_embed, hidden_size,
                     None if our_table is None else our_table.shape[-2], on_pos_embed_mismatch)
  return params
