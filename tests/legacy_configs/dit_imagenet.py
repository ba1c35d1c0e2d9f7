"""Legacy (diffuse_nnx) config of DiT + SiT on ImageNet: the fields and values of diffuse_nnx's
`configs/dit_imagenet.py`, the baseline the other legacy presets change.

    python launch.py --config=tests/legacy_configs/dit_imagenet.py:imagenet_256-XL_2

`options` is '<data preset>-<network size>_<patch size>', e.g. 'imagenet_256-XL_2'.
"""

import ml_collections

from tests.legacy_configs import common_specs


def parse_options(options: str) -> tuple[str, str, int]:
  """'imagenet_256-XL_2' -> ('imagenet_256', 'XL', 2), as diffuse_nnx splits it."""
  data_options, network_options = options.split('-')
  size, patch_size = network_options.split('_')
  return data_options, size, int(patch_size)


def get_config(options: str = 'imagenet_64-B_2') -> ml_collections.ConfigDict:
  data_options, size, patch_size = parse_options(options)
  data_preset = common_specs._imagenet_data_presets[data_options]
  encoder_preset = common_specs._imagenet_encoder_presets[data_options]
  network_preset = common_specs._dit_network_presets[size]

  config = ml_collections.ConfigDict()
  config.trainer = 'DiT_ImageNet'
  config.exp_name = f'DiT_{options}'
  config.project_name = 'DiT'
  config.seed = 0
  config.dtype = 'float32'
  config.standalone_eval = False
  config.total_steps = 7_000_000
  config.log_every_steps = 100
  config.save_every_steps = 50_000
  config.visualize_every_steps = 25_000

  config.data = ml_collections.ConfigDict(dict(
      data_dir=data_preset['data_dir'], stat_dir=data_preset['stat_dir'],
      batch_size=data_preset['batch_size'], image_size=data_preset['image_size'],
      latent_dataset=data_preset.get('latent_dataset', False),
      num_train_samples=data_preset['num_train_samples'], num_workers=8, seed=0, seed_pt=0))

  config.encoder_class = encoder_preset['encoder']
  config.encoder = ml_collections.ConfigDict(encoder_preset['encoder_kwargs'])

  config.network_class = 'dit'
  config.network = ml_collections.ConfigDict(dict(
      input_size=data_preset['image_size'] // config.encoder.get('downsample_factor', 1),
      patch_size=patch_size, in_channels=config.encoder.get('latent_channels', 3),
      **network_preset, mlp_ratio=4.0, continuous_time_embed=False, freq_embed_size=256,
      num_classes=1000, class_dropout_prob=0.1, enable_dropout=True, mlp_dropout=0.0,
      attn_dropout=0.0))

  config.interface_class = 'sit'
  config.interface = ml_collections.ConfigDict(dict(
      train_time_dist_type='uniform', t_mu=0.0, t_sigma=1.0, n_mu=0.0, n_sigma=1.0,
      x_sigma=0.5, t_shift_base=4096))

  config.learning_rate = 1e-4
  config.learning_rate_schedule = 'constant'
  config.warmup_steps = 0
  config.min_abs_lr = 0.0
  config.optimizer_class = 'adamw'
  config.optimizer = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8,
                                                    weight_decay=0.0))

  config.sampler_class = 'heun'
  config.sampler = ml_collections.ConfigDict(dict(num_sampling_steps=32,
                                                  sampling_time_dist='uniform'))

  config.ema_class = 'ema'
  config.ema = ml_collections.ConfigDict(dict(decay=0.9999))

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.options = ml_collections.ConfigDict(dict(
      save_interval_steps=50_000, max_to_keep=8, keep_period=100_000,
      enable_async_checkpointing=False))

  config.visualize = ml_collections.ConfigDict(dict(on=True, num_samples=64, guidance_scale=2.0))

  config.eval = ml_collections.ConfigDict(dict(
      on=True, on_load=False, seed=42, detector='inception', batch_size=1,
      inception_batch_size=1, save_samples_path='',
      # aligned: one entry per guidance scale
      all_guidance_scales=(1.0, 1.5), all_eval_samples_nums=((10_000, 50_000), (50_000,)),
      eval_every_steps=((25_000, 100_000), (100_000,))))

  config.sharding = ml_collections.ConfigDict(dict(
      mesh=[('data', -1)], data_axis='data', strategy=[('.*', 'replicate')],
      rules=[('act_batch', 'data')], allow_split_physical_axes=False))
  return config
