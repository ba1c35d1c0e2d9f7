"""Converts a diffuse_nnx config (willisma/diffuse_nnx: an ml_collections `ConfigDict` that
names components by `*_class` strings) into this project's experiment graph.

    config = converter.convert(dit_imagenet.get_config('imagenet_256-XL_2'))  # fdl.Config
    python launch.py --config=configs/dit_imagenet.py:imagenet_256-XL_2 --config.optimizer.b2=0.95

Each `*_class` string is resolved in `experiments.legacy.registry`. The node starts from the
block of `experiments/common.py` that native presets build that class with (BLOCKS), then the
legacy fields are translated to the class's argument names and value conventions and set where
they change it; a class without a block starts bare and gets every field given. So a diffuse_nnx
preset converts to the native preset it mirrors, and the result prints, diffs, takes `--fdl_set`
overrides and trains like any preset.

A field the target does not take is a LegacyConfigError naming its dotted path and the
accepted fields, unless it holds the value the class always behaves as (NEUTRAL, e.g.
`network.mlp_dropout=0.0` for DiT, which has no dropout) or is listed in IGNORED with the
reason. The network's derived sizes (`input_size`, `in_channels`, `num_classes`) are dropped
where they equal what `Experiment` derives and kept otherwise, so the build names the
contradiction.
"""

import difflib
import inspect
import math
import os
import re
import typing

import fiddle as fdl
from absl import logging
from fiddle import history

from experiments import common
from experiments.legacy import registry
from lib import errors, hooks, sharding
from lib.data import latents, prepared


class LegacyConfigError(errors.UsageError):
  """A legacy config that cannot be converted; the message names the field or class string
  and the alternatives."""


# diffuse_nnx fields that are accepted and dropped (dotted path -> why).
IGNORED = {
    'restore_step': 'dead in diffuse_nnx (0 is falsy; only standalone_eval reads it)',
    'data.num_train_samples': 'dead in diffuse_nnx (never read)',
    'data.num_workers': 'PyTorch loader workers; the tf.data pipeline sets its own parallelism',
    'data.seed_pt': 'seed of PyTorch loader workers; the data order here follows data.seed',
    'network.attn_norm_layer': 'dead in diffuse_nnx; with qk_norm, the norm here follows rms_norm',
    'network.rope_init_theta': 'dead in diffuse_nnx (its unused learned RotaryEmbedder)',
    'network.rope_init_scale': 'dead in diffuse_nnx (its unused learned RotaryEmbedder)',
    'eval.save_samples_path': 'dead in diffuse_nnx (a no-op)',
    'eval.batch_size': 'diffuse_nnx\'s per-device generation batch, a speed setting',
    'eval.inception_batch_size': 'diffuse_nnx\'s per-device Inception batch, a speed setting',
    'sharding.rules': 'dead in diffuse_nnx (never applied; the batch follows sharding.data_axis)',
    'sharding.allow_split_physical_axes': 'dead in diffuse_nnx (its trainer reads another key)',
}
# ... and these only where the target class has no argument of that name.
IGNORED_UNLESS_TAKEN = {
    'interface.x_sigma': 'dead in diffuse_nnx for sit and mean_flow (edm takes it)',
    'interface.t_shift_base': 'dead in diffuse_nnx for mean_flow and edm (no resolution shift)',
}

# diffuse_nnx switches this project's classes lack: accepted only at the value the class always
# behaves as (field -> value).
NEUTRAL = {
    'trainer': 'DiT_ImageNet', 'standalone_eval': False, 'pretrained_ckpt': '',
    'detector': 'inception', 'dtype': 'float32',
    'continuous_time_embed': False, 'qk_norm': False, 'take_dt': False, 'take_gw': False,
    'mlp_dropout': 0.0, 'attn_dropout': 0.0, 'attn_w_dropout': 0.0, 'attn_o_dropout': 0.0,
    'n_mu': 0.0, 'n_sigma': 1.0, 'weight_decay': 0.0, 'warmup_steps': 0, 'min_abs_lr': 0.0,
}
HINTS = {
    'standalone_eval': '; evaluate a checkpoint with launch.py --mode=eval --workdir=DIR',
    'pretrained_ckpt': '; start from released weights with --fdl_set=init_from=FILE',
}
FIXED = {'lib.flow.edm.EDM': {'train_time_dist_type': 'log_normal'}}  # per class, as NEUTRAL

# Legacy field -> argument name, per section and per class.
INTERFACE_RENAMES = {'train_time_dist_type': 'time_dist'}
SAMPLER_RENAMES = {'num_sampling_steps': 'num_steps', 'diffusion_coeff': 'diffusion',
                   'diffusion_coeff_norm': 'diffusion_norm'}
SCHEDULE_RENAMES = {'min_abs_lr': 'min_lr', 'lr_ref_batches': 'ref_steps',
                    'lr_rampup_Mimg': 'rampup_steps'}
REPA_RENAMES = {'repa_loss_weight': 'coefficient', 'repa_depth': 'depth',
                'proj_dim': 'projector_dim'}
CHECKPOINT_RENAMES = {'enable_async_checkpointing': 'async_save'}
VISUALIZE_RENAMES = {'visualize_reconstruction': 'reconstructions'}
# diffuse_nnx's wandb run name and project name the tracker run (off until writers.wandb=True).
TRACKER_RENAMES = {'exp_name': 'wandb_name', 'project_name': 'wandb_project'}
CLASS_RENAMES = {
    'lib.flow.edm.EDM': {'t_mu': 'p_mean', 't_sigma': 'p_std'},
    'lib.encoders.rae.RAE': {'pretrained_path': 'decoder_weights'},
    'lib.encoders.dinov2.DINOv2': {'pretrained_path': 'weights_path'},
}

# diffuse_nnx value conventions (upper-cased, '_' removed, as diffuse_nnx parses them) -> ours.
TIME_DISTS = {'UNIFORM': 'uniform', 'LOGITNORMAL': 'logit_normal', 'LOGNORMAL': 'log_normal'}
SAMPLING_TIME_DISTS = {'UNIFORM': 'uniform', 'EXP': 'karras'}

# Class -> the experiments/common.py block native presets build it with (SIZED: takes the
# image size).
BLOCKS = {
    'lib.data.latents.LatentFolder': 'imagenet_latents',
    'lib.data.images.ImageFolder': 'imagenet_raw',
    'lib.data.prepared.PreparedImages': 'imagenet_prepared',
    'lib.data.digits.Digits': 'digits_data',
    'lib.encoders.pixels.PixelEncoder': 'pixel_encoder',
    'lib.encoders.sd_vae.StabilityVAE': 'sd_vae_encoder',
    'lib.encoders.rae.RAE': 'rae_encoder',
    'lib.models.dit.DiT': 'dit_network',
    'lib.models.lightning_dit.LightningDiT': 'lightning_dit_network',
    'lib.models.lightning_ddt.LightningDDT': 'ddt_network',
    'lib.flow.sit.SiT': 'sit_interface',
    'lib.flow.meanflow.MeanFlow': 'meanflow_interface',
    'lib.flow.edm.EDM': 'edm_interface',
    'lib.flow.repa.REPA': 'repa_alignment',
    'lib.encoders.dinov2.DINOv2': 'dinov2_detector',
    'lib.optim.adamw': 'adamw',
    'lib.flow.samplers.Euler': 'euler',
    'lib.flow.samplers.EulerJump': 'euler_jump',
    'lib.flow.samplers.Heun': 'heun',
    'lib.flow.samplers.EulerMaruyama': 'euler_maruyama',
}
EDM2_LAYOUT = (latents.LatentFolder, prepared.PreparedImages)  # data.latent_dataset=True
SIZED_BLOCKS = ('repa_alignment', 'dinov2_detector')
PARTIAL_KINDS = ('network', 'optimizer', 'schedule')  # called later with rngs / total_steps

TOP_LEVEL = (
    'trainer', 'exp_name', 'project_name', 'seed', 'dtype', 'standalone_eval', 'restore_step',
    'pretrained_ckpt', 'total_steps', 'log_every_steps', 'save_every_steps',
    'visualize_every_steps', 'data_class', 'data', 'encoder_class', 'encoder', 'network_class',
    'network', 'interface_class', 'interface', 'repa_class', 'repa', 'learning_rate',
    'learning_rate_schedule', 'warmup_steps', 'min_abs_lr', 'lr_ref_batches', 'lr_rampup_Mimg',
    'optimizer_class', 'optimizer', 'sampler_class', 'sampler', 'ema_class', 'ema',
    'checkpoint', 'visualize', 'eval', 'sharding')


def convert(legacy, source: str | None = None) -> fdl.Config:
  """The experiment graph of a legacy `ConfigDict` (or nested dict). `source` (the --config
  flag, `config_files.source`) is recorded as where every value was set (Fiddle's history), so
  `--print_config --provenance` and a run's config.txt name the user's file."""
  if source is None:
    return _graph(legacy)
  with history.custom_location(lambda: history.Location(source, 0, None)):
    return _graph(legacy)


def _graph(legacy) -> fdl.Config:
  fields = _plain(legacy)
  data, built_data, stat_dir = _data(fields)
  encoder, built_encoder = _encoder(fields, built_data)
  nodes = dict(
      data=data, encoder=encoder, network=_network(fields, built_data, built_encoder),
      interface=_interface(fields), optimizer=_optimizer(fields, built_data.batch_size),
      sampler=_sampler(fields), ema=_ema(fields), sharding=_sharding(fields),
      **_services(fields, stat_dir))
  repa = _repa(fields, built_data.image_size)
  if repa is not None:
    nodes['repa'] = repa
  config = common.experiment(**nodes)
  _apply(config, {k: fields.pop(k) for k in ('seed', 'total_steps') if k in fields}, '')
  _rest(fields, '', 'the experiment', TOP_LEVEL)
  return config


# ------------------------------------------------------------------------------- sections
def _data(fields):
  values = fields.pop('data', {})
  latent = values.pop('latent_dataset', None)
  stat_dir = values.pop('stat_dir', None)
  # diffuse_nnx's latent_dataset reads an EDM2 dataset folder: latents, or with the RGB
  # encoder uint8 images (its imagenet_64).
  pixels = fields.get('encoder_class') == 'RGB'
  name = fields.pop('data_class', None) or (
      ('prepared' if pixels else 'latents') if latent else 'images')
  node, minimal = _node('data', name, 'data_class')
  _apply(node, values, 'data', minimal=minimal)
  built = fdl.build(node)
  if latent is not None and latent != isinstance(built, EDM2_LAYOUT):
    raise LegacyConfigError(f'data.latent_dataset={latent} contradicts data_class={name!r}, '
                            f'which {"does not read" if latent else "reads"} an EDM2 dataset '
                            f'folder')
  return node, built, stat_dir


def _encoder(fields, data):
  node, minimal = _node('encoder', _class_name(fields, 'encoder_class'), 'encoder_class',
                        data.image_size)
  values = fields.pop('encoder', {})
  sizes = {name: values.pop(name) for name in ('downsample_factor', 'latent_channels')
           if name in values}
  _pretrained_path(values, 'encoder')
  _apply(node, values, 'encoder', minimal=minimal)
  built = fdl.build(node)
  actual = {'downsample_factor': built.downsample_factor,
            'latent_channels': built.latent_channels or data.channels}
  for name, value in sizes.items():
    if value != actual[name]:
      raise LegacyConfigError(f'encoder.{name}={value}, but {type(built).__name__} has '
                              f'{name}={actual[name]}')
  return node, built


def _network(fields, data, encoder):
  node, minimal = _node('network', _class_name(fields, 'network_class'), 'network_class',
                        data.image_size)
  values = fields.pop('network', {})
  latent_shape = encoder.latent_shape(data.image_size, data.channels)
  derived = {'input_size': latent_shape[0], 'in_channels': latent_shape[2],
             'num_classes': data.num_classes}
  for name, value in derived.items():
    if name in values and values[name] == value:
      del values[name]
  if not values.pop('enable_dropout', True):  # diffuse_nnx's switch for label dropout
    values['class_dropout_prob'] = 0.0
  _apply(node, values, 'network', minimal=minimal)
  _apply(node, {'dtype': fields.pop('dtype')} if 'dtype' in fields else {}, '', minimal=minimal)
  return node


def _interface(fields):
  node, minimal = _node('interface', _class_name(fields, 'interface_class'), 'interface_class')
  values = fields.pop('interface', {})
  if 'train_time_dist_type' in values:
    values['train_time_dist_type'] = _convention(
        values['train_time_dist_type'], TIME_DISTS, 'interface.train_time_dist_type')
  _apply(node, values, 'interface', INTERFACE_RENAMES, minimal=minimal)
  return node


def _optimizer(fields, batch_size: int):
  node, minimal = _node('optimizer', _class_name(fields, 'optimizer_class'), 'optimizer_class')
  schedule, schedule_minimal = _node(
      'schedule', fields.pop('learning_rate_schedule', 'constant'), 'learning_rate_schedule')
  values = {name: fields.pop(name) for name in ('warmup_steps', 'min_abs_lr', 'lr_ref_batches')
            if name in fields}
  if 'lr_rampup_Mimg' in fields:  # diffuse_nnx's edm2 ramp-up in images -> optimizer steps
    values['lr_rampup_Mimg'] = round(fields.pop('lr_rampup_Mimg') * 1e6 / batch_size)
  _apply(schedule, values, '', SCHEDULE_RENAMES, minimal=schedule_minimal)
  top = {'learning_rate': fields.pop('learning_rate')} if 'learning_rate' in fields else {}
  _apply(node, {**top, 'schedule': schedule}, '', minimal=minimal)
  _apply(node, fields.pop('optimizer', {}), 'optimizer', minimal=minimal)
  return node


def _sampler(fields):
  node, minimal = _node('sampler', _class_name(fields, 'sampler_class'), 'sampler_class')
  values = fields.pop('sampler', {})
  time_kwargs = values.pop('sampling_time_kwargs', {})
  if 'sampling_time_dist' in values:
    values['sampling_time_dist'] = _convention(
        values['sampling_time_dist'], SAMPLING_TIME_DISTS, 'sampler.sampling_time_dist')
  if isinstance(values.get('diffusion_coeff'), str):
    values['diffusion_coeff'] = values['diffusion_coeff'].lower()
  _apply(node, values, 'sampler', SAMPLER_RENAMES, minimal=minimal)
  _apply(node, time_kwargs, 'sampler.sampling_time_kwargs', minimal=minimal)
  return node


def _ema(fields):
  node, minimal = _node('ema', _class_name(fields, 'ema_class'), 'ema_class')
  _apply(node, fields.pop('ema', {}), 'ema', minimal=minimal)
  return node


def _repa(fields, image_size: int):
  name, values = fields.pop('repa_class', None), fields.pop('repa', None)
  if name is None:
    if values:
      raise LegacyConfigError(f'repa is set but repa_class is not; registered repa names: '
                              f'{", ".join(registry.names("repa"))}')
    return None
  node, minimal = _node('repa', name, 'repa_class', image_size)
  values = dict(values or {})
  detector, detector_minimal = _node(
      'detector', _class_name(values, 'detector_class', 'repa.'), 'repa.detector_class',
      image_size)
  detector_values = values.pop('detector', {})
  _pretrained_path(detector_values, 'repa.detector')
  _apply(detector, detector_values, 'repa.detector', minimal=detector_minimal)
  node.detector = detector
  _apply(node, values.pop('loss', {}), 'repa.loss', REPA_RENAMES, minimal=minimal)
  _apply(node, values, 'repa', minimal=minimal)
  return node


def _sharding(fields):
  values = fields.pop('sharding', {})
  mesh = tuple(tuple(axis) for axis in values.pop('mesh', (('data', -1),)))
  data_axis = values.pop('data_axis', mesh[0][0])
  rules = tuple((regex, _tactic(tactic, f'sharding.strategy[{i}]'))
                for i, (regex, tactic) in enumerate(values.pop('strategy', (('.*', 'replicate'),))))
  fsdp_axes = [t.axis for _, t in rules if fdl.get_callable(t) is sharding.FSDP]
  node = common.fsdp(fsdp_axes[0]) if fsdp_axes else common.replicated()
  _apply(node, {'mesh': mesh, 'rules': rules, 'activation_rules': (('batch', data_axis),)}, '')
  _rest(values, 'sharding', 'sharding', ('mesh', 'data_axis', 'strategy'))
  return node


def _tactic(tactic, path: str) -> fdl.Config:
  """diffuse_nnx's sharding tactics: 'replicate' and 'fsdp(axis="a")' / 'fsdp(axis="a,b")'."""
  if isinstance(tactic, str) and tactic.strip() == 'replicate':
    return fdl.Config(sharding.Replicate)
  match = re.fullmatch(r'\s*fsdp\s*(\(\s*(axis\s*=\s*["\']([^"\']*)["\'])?\s*\))?\s*', tactic) \
      if isinstance(tactic, str) else None
  if match is None:
    raise LegacyConfigError(f"{path}={tactic!r}: expected 'replicate' or "
                            f"'fsdp(axis=\"AXIS\")' (several axes: 'fsdp(axis=\"a,b\")')")
  axes = [a.strip() for a in (match.group(3) or 'data').split(',')]
  return fdl.Config(sharding.FSDP, axis=axes[0] if len(axes) == 1 else tuple(axes),
                    min_size_mb=4.0)


def _services(fields, stat_dir: str | None) -> dict:
  """Checkpointing, logging, visualisation and evaluation nodes."""
  checkpoint = fields.pop('checkpoint', {})
  options = checkpoint.pop('options', {})
  _rest(checkpoint, 'checkpoint', 'checkpoint', ('options',))
  save_every = fields.pop('save_every_steps', None)
  interval = options.pop('save_interval_steps', save_every or 50_000)
  if save_every:  # diffuse_nnx saves where its trainer and orbax's interval agree
    interval = math.lcm(interval, save_every)
  services = common.run_services(save_every_steps=interval,
                                 log_every_steps=fields.pop('log_every_steps', 100))
  _apply(services['checkpoint'], options, 'checkpoint.options', CHECKPOINT_RENAMES)
  tracker = {name: fields.pop(name) for name in TRACKER_RENAMES if name in fields}
  _apply(services['writers'], tracker, '', TRACKER_RENAMES)  # switched on by writers.wandb
  evaluation = fields.pop('eval', {})
  services['visualize'] = _visualize(fields, evaluation.get('seed'))
  services['evaluate'] = []
  if evaluation.pop('on', False):
    fid = common.fid_evaluation()
    _apply(fid, {'stat_dir': stat_dir} if stat_dir else {}, 'data',
           {'stat_dir': 'reference_stats'})
    _apply(fid, evaluation, 'eval')
    services['evaluate'] = [fid]
  return services


def _visualize(fields, seed: int | None):
  values = fields.pop('visualize', {})
  every_steps = fields.pop('visualize_every_steps', 25_000)
  if not values.pop('on', False):
    return None
  scale = values.pop('guidance_scale', 1.0)  # diffuse_nnx draws cfg 1 and, above 1, this scale
  node = fdl.Config(hooks.SampleGrid, every_steps=every_steps,
                    num_samples=values.pop('num_samples', 64),
                    guidance_scales=(1.0, scale) if scale > 1.0 else (1.0,))
  _apply(node, {'seed': seed} if seed is not None else {}, 'eval')
  _apply(node, values, 'visualize', VISUALIZE_RENAMES)
  return node


# ------------------------------------------------------------------------------- helpers
def _plain(value):
  """A ConfigDict as nested dicts, lists as tuples (the form graph leaves take)."""
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  if isinstance(value, dict):
    return {key: _plain(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(item) for item in value)
  return value


def _class_name(fields: dict, key: str, prefix: str = '') -> str:
  if key not in fields:
    kind = key.removesuffix('_class')
    raise LegacyConfigError(f'{prefix}{key} is missing; registered {kind} names: '
                            f'{", ".join(registry.names(kind))}')
  return fields.pop(key)


def _node(kind: str, name: str, field: str, image_size: int = 256):
  """(node, minimal): the block of the registered class (minimal: set only what differs
  from it) or a bare node of it."""
  try:
    target = registry.resolve(kind, name)
  except registry.RegistryError as e:
    raise LegacyConfigError(f'{field}={name!r}: {e}') from None
  block = BLOCKS.get(_qualname(target))
  if block:
    make = getattr(common, block)
    return (make(image_size) if block in SIZED_BLOCKS else make()), True
  return (fdl.Partial(target) if kind in PARTIAL_KINDS else fdl.Config(target)), False


def _qualname(target) -> str:
  return f'{getattr(target, "__module__", "")}.{getattr(target, "__qualname__", "")}'


def _parameters(target) -> dict[str, inspect.Parameter]:
  """Arguments a config may set (not `rngs` or a required `total_steps`: the trainer passes
  them)."""
  if inspect.isclass(target):
    parameters = list(inspect.signature(target.__init__).parameters.values())[1:]
  else:
    parameters = list(inspect.signature(target).parameters.values())
  return {p.name: p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
          and p.name != 'rngs' and not (p.name == 'total_steps' and p.default is p.empty)}


def _apply(node: fdl.Buildable, values: dict, path: str, renames: dict | None = None, *,
           minimal: bool = True) -> None:
  """Sets legacy `values` (under dotted `path`) on `node`: renamed, checked against the
  class, and, when `minimal`, only where they change the node's value."""
  target = fdl.get_callable(node)
  renames = {**(renames or {}), **CLASS_RENAMES.get(_qualname(target), {})}
  parameters = _parameters(target)
  neutral = {**NEUTRAL, **FIXED.get(_qualname(target), {})}
  owner = getattr(target, '__name__', str(target))
  choices = sorted(parameters) + sorted(k for k, v in renames.items() if v in parameters)
  for name, value in values.items():
    argument = renames.get(name, name)
    dotted = f'{path}.{name}' if path else name
    if dotted in IGNORED:
      continue
    if argument not in parameters:
      _drop(dotted, name, value, owner, choices, neutral)
      continue
    _check_choice(target, argument, value, dotted)
    default = parameters[argument].default
    current = node.__arguments__.get(argument, default)
    if not minimal or current is inspect.Parameter.empty or current != value:
      setattr(node, argument, value)


def _rest(values: dict, path: str, owner: str, choices) -> None:
  """Fields left in a section that maps to no class: ignored, neutral, or an error."""
  for name, value in values.items():
    _drop(f'{path}.{name}' if path else name, name, value, owner, sorted(choices), NEUTRAL)


def _drop(dotted: str, name: str, value, owner: str, choices: list, neutral: dict) -> None:
  if dotted in IGNORED or dotted in IGNORED_UNLESS_TAKEN:
    return
  if name in neutral:
    if value == neutral[name]:
      return
    raise LegacyConfigError(f'{dotted}={value!r} has no counterpart: {owner} always behaves as '
                            f'{name}={neutral[name]!r}{HINTS.get(name, "")}')
  closest = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
  raise LegacyConfigError(
      f'{dotted}: unexpected field {name!r} for {owner}; accepted fields: {", ".join(choices)}'
      + (f' (closest: {", ".join(closest)})' if closest else ''))


def _check_choice(target, argument: str, value, dotted: str) -> None:
  """A value outside a `Literal[...]` argument's options names them."""
  try:
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
  except Exception:  # unresolvable annotations: nothing to check
    return
  options = typing.get_args(hints.get(argument)) \
      if typing.get_origin(hints.get(argument)) is typing.Literal else None
  if options and value not in options:
    raise LegacyConfigError(f'{dotted}={value!r}: {getattr(target, "__name__", target)}.'
                            f'{argument} must be one of {", ".join(map(repr, options))}')


def _convention(value, table: dict, dotted: str) -> str:
  """A diffuse_nnx enum string (case and '_' free, as diffuse_nnx parses it) in this project's
  terms."""
  key = str(value).replace('_', '').upper()
  if key not in table:
    raise LegacyConfigError(f'{dotted}={value!r}: expected one of '
                            f'{", ".join(k.lower() for k in table)}')
  return table[key]


def _pretrained_path(values: dict, path: str) -> None:
  """diffuse_nnx's `pretrained_path` is a file or a Hugging Face hub id; only files carry over
  (this project reads weights from files, local or gs://), a hub id is dropped with a
  warning."""
  from lib import paths

  value = values.get('pretrained_path')
  if value is None:
    return
  local = paths.is_url(value) or os.path.exists(value) or os.path.isabs(value) or \
      value.startswith(('.', '~')) or bool(os.path.splitext(value)[1])
  if not local:
    del values['pretrained_path']
    logging.warning('%s.pretrained_path=%r is a Hugging Face hub id, not a local file; it is '
                    'not used: download the weights and point the node at the file (for the '
                    'REPA detector: --fdl_set=repa.detector.weights_path=FILE)', path, value)
