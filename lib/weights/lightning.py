"""Importers of released PyTorch LightningDiT / RAE DiT-DH weights into the NNX models.

    model = nnx.eval_shape(lambda: LightningDiT(16, 32, 1000, patch_size=1, ...))  # XL/1
    nnx.update(model, import_lightning_dit(read_state_dict('lightningdit-xl-imagenet256-800ep.pt'),
                                           model))
    import_lightning_ddt(read_state_dict('stage2_model.pt'), ddt_model)   # RAE DiT-DH-XL

(`lib.weights.files.read_state_dict` reads `.pt/.pth/.safetensors`, takes the `ema` weights of
a training checkpoint and strips `module.` prefixes.)

Key layouts (torch `nn.Linear.weight` is (out, in): transposed; conv OIHW -> HWIO):

  hustvl/LightningDiT `models/lightningdit.py` (and RAE `lightningDiT.py`):
    x_embedder.proj.{weight,bias}           t_embedder.mlp.{0,2}.{weight,bias} [t_embedder.W]
    y_embedder.embedding_table.weight       pos_embed (1, N, D)   feat_rope.freqs_{cos,sin}
    blocks.{i}.norm{1,2}.weight             blocks.{i}.attn.{qkv,proj}.{weight,bias}
    blocks.{i}.attn.{q,k}_norm.weight[,bias]
    blocks.{i}.mlp.{w12,w3}.{weight,bias}  (SwiGLU)  or  blocks.{i}.mlp.{fc1,fc2}.* (GELU)
    blocks.{i}.adaLN_modulation.1.{weight,bias}
    final_layer.{norm_final.weight, linear.*, adaLN_modulation.1.*}
  RAE `DDT.py::DiTwDDTHead`: the same block keys, with `blocks.{i}` numbering the encoder
    blocks first and the decoder blocks after them, `s_embedder.proj.*` (encoder patch
    embed), `x_embedder.proj.*` (decoder), `s_projector.*` (when the widths differ),
    `enc_feat_rope.*`, `dec_feat_rope.*`, `pos_embed` (encoder stream).

The fixed tables present in the torch state dicts (pos_embed, RoPE cos/sin, the
Gaussian-Fourier `W`) are copied into the model's buffers too, so an imported model computes
exactly what the torch model computes. MeanFlow embedders (`dt_embedder.*`, `gw_embedder.*`)
have no official layout; they use the t_embedder's key pattern under their own names, and
`allow_missing=('dt_embedder', 'gw_embedder')` leaves them out of the result (a model updated
with it keeps them freshly initialised).

Any missing, unexpected or mis-shaped key raises `importer.WeightsMismatch`, naming each key.
"""

from typing import Iterable, Mapping

import numpy as np
from flax import nnx

from lib.weights import dit, importer, torch_layout

# Fixed tables of the NNX networks -> the torch buffers holding them.
_TABLES = {'rope_cos': 'feat_rope.freqs_cos', 'rope_sin': 'feat_rope.freqs_sin',
           'enc_rope_cos': 'enc_feat_rope.freqs_cos', 'enc_rope_sin': 'enc_feat_rope.freqs_sin',
           'dec_rope_cos': 'dec_feat_rope.freqs_cos', 'dec_rope_sin': 'dec_feat_rope.freqs_sin'}


def torch_key(path: tuple[str, ...], num_encoder_blocks: int = 0) -> str:
  """NNX path -> torch key: DiT's module names, `encoder_blocks.i` / `decoder_blocks.i` as
  `blocks.i` / `blocks.{num_encoder_blocks + i}`, the RoPE tables as `*feat_rope.freqs_*`."""
  if len(path) == 1 and path[0] in _TABLES:
    return _TABLES[path[0]]
  if path[0] == 'encoder_blocks':
    path = ('blocks',) + path[1:]
  elif path[0] == 'decoder_blocks':
    path = ('blocks', str(int(path[1]) + num_encoder_blocks)) + path[2:]
  return torch_layout.torch_key(path, dit.MODULES)


def _rules(name: str, num_encoder_blocks: int) -> importer.Rules:
  return importer.Rules(name, lambda path: (torch_key(path, num_encoder_blocks),))


def import_lightning_dit(state_dict: Mapping[str, np.ndarray], abstract, *,
                         allow_missing: Iterable[str] = ()) -> nnx.State:
  """A hustvl/LightningDiT (or RAE `lightningDiT.py`) state dict as the state of a
  `LightningDiT` (parameters and fixed tables).

  `allow_missing`: torch-key prefixes that may be absent (left out of the result).
  """
  return importer.fill(state_dict, abstract, _rules('LightningDiT', 0),
                       optional=tuple(allow_missing))


def import_lightning_ddt(state_dict: Mapping[str, np.ndarray], abstract, *,
                         allow_missing: Iterable[str] = ()) -> nnx.State:
  """An RAE `DiTwDDTHead` (DiT-DH) state dict as the state of a `LightningDDT`."""
  state = importer.state_of(abstract)
  num_encoder_blocks = len({path[1] for path, _ in nnx.to_flat_state(state)
                            if path[0] == 'encoder_blocks'})
  return importer.fill(state_dict, state, _rules('LightningDDT', num_encoder_blocks),
                       optional=tuple(allow_missing))
