"""Importers of released PyTorch LightningDiT / RAE DiT-DH weights into the NNX models.

    model = LightningDiT(16, 32, 1000, patch_size=1, ...)            # hustvl LightningDiT-XL/1
    import_lightning_dit(model, read_state_dict('lightningdit-xl-imagenet256-800ep.pt'))
    model = LightningDDT(16, 768, 1000, ...)                          # RAE DiT-DH-XL
    import_lightning_ddt(model, read_state_dict('stage2_model.pt'))

(`lib.models.checkpoint_io.read_state_dict` reads `.pt/.pth/.safetensors`, takes the `ema`
weights of a training checkpoint and strips `module.` prefixes; `load_lightning_checkpoint`
does both steps.)

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
`allow_missing=('dt_embedder', 'gw_embedder')` keeps them freshly initialised.

Any missing, unexpected or mis-shaped key raises `CheckpointMismatch`, naming each key.
"""

from typing import Callable, Iterable, Mapping

import numpy as np
from flax import nnx

from lib.models.lightning_ddt import LightningDDT
from lib.models.lightning_dit import LightningDiT


class CheckpointMismatch(ValueError):
  """A state dict whose keys or shapes do not match the model."""


# Module renames from NNX attribute paths to torch key fragments.
_RENAMES = {
    ('t_embedder', 'linear1'): ('t_embedder', 'mlp', '0'),
    ('t_embedder', 'linear2'): ('t_embedder', 'mlp', '2'),
    ('dt_embedder', 'linear1'): ('dt_embedder', 'mlp', '0'),
    ('dt_embedder', 'linear2'): ('dt_embedder', 'mlp', '2'),
    ('gw_embedder', 'linear1'): ('gw_embedder', 'mlp', '0'),
    ('gw_embedder', 'linear2'): ('gw_embedder', 'mlp', '2'),
    ('y_embedder', 'embedding', 'embedding'): ('y_embedder', 'embedding_table', 'weight'),
    ('rope_cos',): ('feat_rope', 'freqs_cos'),
    ('rope_sin',): ('feat_rope', 'freqs_sin'),
    ('enc_rope_cos',): ('enc_feat_rope', 'freqs_cos'),
    ('enc_rope_sin',): ('enc_feat_rope', 'freqs_sin'),
    ('dec_rope_cos',): ('dec_feat_rope', 'freqs_cos'),
    ('dec_rope_sin',): ('dec_feat_rope', 'freqs_sin'),
}


def _torch_key(path: tuple, num_encoder_blocks: int) -> tuple[str, Callable]:
  """(torch key, torch array -> NNX array) for the NNX variable at `path`."""
  parts = tuple(str(p) for p in path)
  for old, new in _RENAMES.items():
    if parts[:len(old)] == old:
      parts = new + parts[len(old):]
      break
  if parts[0] == 'encoder_blocks':
    parts = ('blocks',) + parts[1:]
  elif parts[0] == 'decoder_blocks':
    parts = ('blocks', str(int(parts[1]) + num_encoder_blocks)) + parts[2:]
  if 'adaLN_modulation' in parts:
    index = parts.index('adaLN_modulation')
    parts = parts[:index + 1] + ('1',) + parts[index + 1:]
  convert = lambda a: a
  leaf = parts[-1]
  if leaf == 'kernel':
    parts = parts[:-1] + ('weight',)
    convert = lambda a: a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
  elif leaf == 'scale':  # RMSNorm / LayerNorm weight
    parts = parts[:-1] + ('weight',)
  return '.'.join(parts), convert


def _expected(model: nnx.Module, num_encoder_blocks: int) -> dict:
  """{torch key: (nnx path, NNX shape, convert)} for every variable of the model."""
  expected = {}
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    key, convert = _torch_key(path, num_encoder_blocks)
    expected[key] = (path, tuple(variable.shape), convert)
  return expected


def _import(model: nnx.Module, state_dict: Mapping[str, np.ndarray], num_encoder_blocks: int,
            allow_missing: Iterable[str], what: str) -> None:
  allow_missing = tuple(allow_missing)
  expected = _expected(model, num_encoder_blocks)
  missing = sorted(k for k in expected if k not in state_dict
                   and not any(k.startswith(prefix) for prefix in allow_missing))
  unexpected = sorted(k for k in state_dict if k not in expected)
  converted, misshaped = {}, []
  for key, (path, shape, convert) in expected.items():
    if key not in state_dict:
      continue
    value = convert(np.asarray(state_dict[key], dtype=np.float32))
    if value.shape != shape:
      misshaped.append(f'{key}: checkpoint {tuple(np.shape(state_dict[key]))} -> '
                       f'{value.shape}, model {"/".join(map(str, path))} {shape}')
    else:
      converted[path] = value
  if missing or unexpected or misshaped:
    lines = [f'the state dict does not match the {what}:']
    if missing:
      lines.append(f'  missing keys ({len(missing)}): ' + ', '.join(missing))
    if unexpected:
      lines.append(f'  unexpected keys ({len(unexpected)}): ' + ', '.join(unexpected))
    if misshaped:
      lines.append(f'  mis-shaped keys ({len(misshaped)}):')
      lines.extend(f'    {line}' for line in misshaped)
    raise CheckpointMismatch('\n'.join(lines))
  flat = nnx.to_flat_state(nnx.state(model))
  updates = [(path, variable.replace(converted[path])) for path, variable in flat
             if path in converted]
  nnx.update(model, nnx.from_flat_state(updates))


def import_lightning_dit(model: LightningDiT, state_dict: Mapping[str, np.ndarray], *,
                         allow_missing: Iterable[str] = ()) -> LightningDiT:
  """Loads a hustvl/LightningDiT (or RAE `lightningDiT.py`) state dict into `model` in place.

  `allow_missing`: torch-key prefixes that may be absent (those variables keep their init).
  """
  _import(model, state_dict, 0, allow_missing, 'LightningDiT')
  return model


def import_lightning_ddt(model: LightningDDT, state_dict: Mapping[str, np.ndarray], *,
                         allow_missing: Iterable[str] = ()) -> LightningDDT:
  """Loads an RAE `DiTwDDTHead` (DiT-DH) state dict into `model` in place."""
  _import(model, state_dict, len(model.encoder_blocks), allow_missing, 'LightningDDT')
  return model


def load_lightning_checkpoint(model: nnx.Module, path: str, **kwargs) -> nnx.Module:
  """Reads `path` (`.pt/.pth/.safetensors/.npz`) and imports it into `model`."""
  from lib.models.checkpoint_io import read_state_dict
  state_dict = read_state_dict(path)
  if isinstance(model, LightningDDT):
    return import_lightning_ddt(model, state_dict, **kwargs)
  return import_lightning_dit(model, state_dict, **kwargs)
