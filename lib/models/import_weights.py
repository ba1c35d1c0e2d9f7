"""Importing released DiT-family weights into the project's NNX networks.

    params = import_dit(read_state_dict('SiT-XL-2-256x256.pt'), abstract_params)

    python -m lib.models.import_weights --checkpoint=SiT-XL-2-256x256.pt \
        --fdl_config=experiments/dit.py:xl2 --workdir=runs/sit
    python launch.py --workdir=runs/sit --mode=sample

The command first sets the release's conventions in the config (`lib.models.releases`: for
this file SiT's time, t = 1 at the data, its 0.18215 latent scaling and its learned-sigma
head), then writes an orbax checkpoint (the imported weights as both `params` and `ema`, a
fresh optimizer state, step 0 or `--step`) and `config.json` / `config.txt` /
`effective.json` into the workdir, which `launch.py --mode=sample` (or `--mode=train`, to
fine-tune) then uses like any run.
`Experiment.init_from` instead starts a new run from a released file (see `lib/train.py`;
`launch.py` sets the same conventions).

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

Importers are looked up by network class in `IMPORTERS` (no string registry in configs);
another family registers one line there.
"""

import json
import math
import os
import re
import sys
from typing import Callable

import fiddle as fdl
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from lib import paths
from lib.models import ddt, dit, import_lightning, layers
from lib.models.checkpoint_io import key_problems, read_state_dict
from lib.models.lightning_ddt import LightningDDT
from lib.models.lightning_dit import LightningDiT

# Keys of released checkpoints that are skipped, with why.
IGNORED_PREFIXES = {'projectors.': 'REPA alignment projectors (used only by its training loss)'}
# A fp16-saved table is off by up to ~5e-4; a different layout differs by O(1).
POS_EMBED_TOLERANCE = 2e-3

# Our module names -> the official ones (non-leaf path parts), our leaf names -> torch names.
_OFFICIAL_MODULES = {'linear1': 'mlp.0', 'linear2': 'mlp.2',
                     'adaLN_modulation': 'adaLN_modulation.1', 'embedding': 'embedding_table'}
_OFFICIAL_LEAVES = {'kernel': 'weight', 'bias': 'bias', 'embedding': 'weight'}


# ------------------------------------------------------------------------------- layouts
def official_key(path: tuple) -> str:
  """NNX parameter path -> facebookresearch/DiT state-dict key."""
  *modules, leaf = (str(part) for part in path)
  return '.'.join([_OFFICIAL_MODULES.get(name, name) for name in modules]
                  + [_OFFICIAL_LEAVES.get(leaf, leaf)])


def torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of an NNX parameter in torch layout (conv HWIO -> OIHW, Linear (in, out) -> (out, in))."""
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
      raise ValueError(message + " (pass on_pos_embed_mismatch='warn' to import anyway)")
    logging.warning('%s; importing the other weights anyway', message)
    return
  if our_tokens is not None and our_tokens != tokens:
    logging.info('The checkpoint was trained on a %dx%d token grid, this network uses %dx%d: '
                 'its fixed position table is rebuilt for the new size.', grid, grid,
                 math.isqrt(our_tokens), math.isqrt(our_tokens))


# ------------------------------------------------------------------------------- importers
def import_dit(state_dict: dict[str, np.ndarray], abstract_state: nnx.State, *,
               on_pos_embed_mismatch: str = 'raise') -> nnx.State:
  """A facebookresearch/DiT-layout state dict ({key: torch-layout array}) as the parameters
  of a `lib.models.dit.DiT`.

  Args:
    state_dict: e.g. `read_state_dict('DiT-XL-2-256x256.pt')`.
    abstract_state: the network's state from `nnx.split(nnx.eval_shape(make_network))`, the
      `nnx.Param` part or all of it (other variables, the fixed `pos_embed` Buffer, are used
      only for the checks and left out of the result).
    on_pos_embed_mismatch: 'raise' or 'warn' when the checkpoint's `pos_embed` is not our
      fixed sin-cos table.

  Returns:
    An `nnx.State` of the network's `nnx.Param`s (float32 arrays in NNX layout), to merge with
    the graphdef and buffers of the network.

  Raises:
    ValueError: naming every missing, unexpected and mis-shaped key, or a foreign pos_embed.
  """
  if on_pos_embed_mismatch not in ('raise', 'warn'):
    raise ValueError(f"on_pos_embed_mismatch={on_pos_embed_mismatch!r}: use 'raise' or 'warn'")
  given = {key: np.asarray(value) for key, value in state_dict.items()}
  for prefix, why in IGNORED_PREFIXES.items():
    skipped = sorted(key for key in given if key.startswith(prefix))
    if skipped:
      logging.info('Skipping %d checkpoint keys %s* (%s)', len(skipped), prefix, why)
      for key in skipped:
        del given[key]
  pos_embed = given.pop('pos_embed', None)

  expected, our_tokens = {}, None
  for path, variable in nnx.to_flat_state(abstract_state):
    if isinstance(variable, nnx.Param):
      expected[official_key(path)] = (path, variable)
    elif tuple(path) == ('pos_embed',):
      our_tokens = variable.shape[-2]
  want = {key: torch_shape(str(path[-1]), variable.shape)
          for key, (path, variable) in expected.items()}
  found = {key: tuple(value.shape) for key, value in given.items()}
  problems = key_problems(found, want)
  if problems:
    if pos_embed is not None:
      found['pos_embed'] = tuple(pos_embed.shape)
    raise ValueError(
        'the checkpoint does not match this DiT:\n'
        f'  checkpoint: {describe_dit(found)}\n  network:    {describe_dit(want)}\n  '
        + '\n  '.join(problems)
        + '\n  (set network.hidden_size / depth / patch_size / mlp_ratio / learn_sigma and '
        "the data's classes to the released model's)")
  hidden_size = want.get('x_embedder.proj.weight', (None,))[0]
  if pos_embed is None:
    logging.info('The checkpoint has no pos_embed; the fixed sin-cos table is not checked.')
  else:
    _check_pos_embed(pos_embed, hidden_size, our_tokens, on_pos_embed_mismatch)
  flat = [(path, variable.replace(jnp.asarray(from_torch(str(path[-1]), given[key]),
                                              variable.dtype)))
          for key, (path, variable) in expected.items()]
  return nnx.from_flat_state(flat)


# Network class -> importer of its released checkpoints (subclasses use their base's). An
# importer is `fn(state_dict, abstract_model) -> nnx.State`: a {key: torch-layout array} dict
# and the network from `nnx.eval_shape(make_network)` in, the network's `nnx.Param` state out,
# plus any fixed arrays (buffers) the checkpoint carries (they replace the constructor's).
# `import_file`, the CLI and `Experiment.init_from` use it.
def import_dit_network(state_dict: dict[str, np.ndarray], model) -> nnx.State:
  return import_dit(state_dict, nnx.state(model))


def _in_place(importer: Callable) -> Callable[..., nnx.State]:
  """Adapts an importer that fills a model in place (`import_lightning`)."""
  return lambda state_dict, model: nnx.state(importer(model, state_dict))


IMPORTERS: dict[type, Callable[..., nnx.State]] = {
    dit.DiT: import_dit_network,
    LightningDiT: _in_place(import_lightning.import_lightning_dit),
    LightningDDT: _in_place(import_lightning.import_lightning_ddt),
    ddt.DDT: ddt.import_ddt,  # MCG-NJU DDT (takes the abstract model or its state)
}


def network_class(network) -> type:
  """The module class of a network node (a class, a functools partial or an unbuilt
  `fdl.Partial` of one)."""
  if isinstance(network, fdl.Buildable):
    return fdl.get_callable(network)
  while hasattr(network, 'func'):
    network = network.func
  return network


def importer_for(network) -> Callable[..., nnx.State]:
  """The importer for a network class (or partial): the entry of its nearest base class."""
  cls = network_class(network)
  for base in getattr(cls, '__mro__', ()):
    if base in IMPORTERS:
      return IMPORTERS[base]
  names = ', '.join(f'{c.__module__}.{c.__qualname__}' for c in IMPORTERS)
  raise ValueError(f'no weight importer for network class {getattr(cls, "__qualname__", cls)}; '
                   f'importers exist for: {names} (register one in '
                   f'lib.models.import_weights.IMPORTERS)')


def import_file(path: str, experiment) -> nnx.State:
  """The network parameters of `experiment` (an `Experiment`) from a released weights file,
  after checking that the experiment follows the release's conventions (`releases.check`)."""
  from lib.models import releases  # (releases looks importers' classes up here)

  releases.check(experiment, path)
  importer = importer_for(experiment.network)
  params = importer(read_state_dict(path), nnx.eval_shape(experiment.make_network))
  logging.info('Imported %s parameters from %s',
               f'{sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(params)):,}', path)
  return params


# ------------------------------------------------------------------------------- command line
def write_checkpoint(experiment, weights: nnx.State, workdir, step: int = 0):
  """An orbax checkpoint of step `step` in `workdir` that `lib.train` restores: params and EMA
  from the imported `weights` (and their fixed arrays), a freshly initialised optimizer state.
  Returns the checkpoint folder."""
  import jax
  from lib import checkpoint as ckpt
  from lib.train import Run

  run = Run(experiment, workdir)
  state = run.imported_state(weights)
  state['step'] = jax.device_put(np.int32(step), run.replicated)
  manager = experiment.checkpoint.manager(workdir)
  try:
    if manager.latest_step() is not None:
      raise FileExistsError(f'{manager.directory} already holds checkpoints (step '
                            f'{manager.latest_step()}); import into an empty --workdir')
    ckpt.save(manager, step, state, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  return manager.directory / str(step)


def import_release(checkpoint: str, config: fdl.Buildable, workdir: str,
                   step: int = 0) -> tuple[str, list[str]]:
  """Makes `workdir` a run of the released weights `checkpoint`: sets the release's conventions
  in `config` (`lib.models.releases.apply`, provenance `--checkpoint=FILE`), builds it, and
  writes the imported weights as the checkpoint of `step`, `config.json` / `config.txt` and
  `imported_from.json` (file, step, release, settings changed). Returns the checkpoint folder
  and one line per setting changed ('willisma/SiT: interface.network_time = ...').

  Raises:
    ConfigError, ValueError, FileNotFoundError, FileExistsError: nothing was written.
  """
  from lib import errors
  from lib.config import saved
  from lib.models import releases

  release, changed = releases.apply(config, checkpoint, f'--checkpoint={checkpoint}')
  experiment = fdl.build(config)
  if experiment.init_from:
    raise errors.UsageError(f'init_from={experiment.init_from!r} is set; the imported --checkpoint '
                            'already gives the weights: drop the init_from override')
  params = import_file(checkpoint, experiment)
  folder = write_checkpoint(experiment, params, workdir, step)
  saved.write_config(config, workdir)
  paths.write_atomic(paths.resolve(workdir, '--workdir') / 'imported_from.json', json.dumps({
      'checkpoint': os.fspath(paths.resolve(checkpoint, '--checkpoint')), 'step': step,
      'release': release.name, 'settings': changed}, indent=1))
  return folder, [f'{release.name or checkpoint}: {line}' for line in changed]


def _main(argv) -> int:
  from absl import flags

  from lib import errors
  from lib.config import overrides, presets, saved
  from lib.experiment import ConfigError

  if len(argv) > 1:
    print(f'error: unexpected arguments: {argv[1:]}', file=sys.stderr)
    return 2
  values = flags.FLAGS
  if not values.checkpoint or not values.workdir:
    print('error: --checkpoint=FILE and --workdir=DIR are required', file=sys.stderr)
    return 2
  try:
    if values.fdl_config and values.fdl_config_file:
      raise errors.UsageError('give either --fdl_config or --fdl_config_file, not both')
    if values.fdl_config_file:
      config = saved.load_config_file(os.fspath(values.fdl_config_file))
    elif values.fdl_config:
      config = presets.load_preset(values.fdl_config)
    else:
      raise errors.UsageError('--fdl_config=PATH.py:PRESET is required (the network the weights '
                              'go into); preset files: ' + ', '.join(presets.preset_files()))
    for assignment in values.fdl_set:
      overrides.apply_override(config, assignment)
    folder, changed = import_release(values.checkpoint, config, values.workdir, values.step)
  except (errors.UsageError, ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
    print(f'error: {str(e).split(chr(10) * 2 + "Fiddle context:")[0]}', file=sys.stderr)
    return 2
  for line in changed:
    print(f'release conventions of {line}')
  print(f'wrote {folder} and {paths.resolve(values.workdir, "--workdir") / "config.json"}; '
        'sample with: '
        f'python launch.py --workdir={values.workdir} --mode=sample')
  return 0


if __name__ == '__main__':
  from absl import app, flags
  from fiddle import absl_flags  # registers --fdl_config, --fdl_config_file and --fdl_set

  flags.DEFINE_string('checkpoint', None, 'Released weights file (.pt/.pth/.bin/.safetensors/.npz).')
  flags.DEFINE_string('workdir', None, 'Run directory to create: checkpoints/, config.json.')
  flags.DEFINE_integer('step', 0, 'Step number of the written checkpoint.')
  app.run(lambda argv: sys.exit(_main(argv)), flags_parser=absl_flags.flags_parser)
