"""Legacy (diffuse_nnx) config of RAE on ImageNet: diffuse_nnx's `configs/rae_imagenet.py`
(`imagenet_raw_256-XL_1`): LightningDDT on the 16x16x768 latents of the RAE encoder (its ViT
decoder weights at diffuse_nnx's `pretrained_path`), Euler-50 sampling with the grid shift of
those latents, EMA 0.9995, reconstructions drawn, replicated state."""

import ml_collections

from tests.legacy_configs import common_specs, lightning_ddt_imagenet


def get_config(options: str = 'imagenet_raw_256-XL_1') -> ml_collections.ConfigDict:
  config = lightning_ddt_imagenet.get_config(options)
  config.exp_name = f'RAE_{options}'
  config.project_name = 'RAE'

  encoder_preset = common_specs._imagenet_rae_encoder_presets[options.split('-')[0]]
  config.encoder_class = encoder_preset['encoder']
  config.encoder = ml_collections.ConfigDict(encoder_preset['encoder_kwargs'])
  config.network.input_size = config.data.image_size // config.encoder.downsample_factor
  config.network.in_channels = config.encoder.latent_channels

  config.sampler_class = 'euler'
  config.sampler.num_sampling_steps = 50
  config.pretrained_ckpt = ''
  config.visualize.visualize_reconstruction = True
  config.sharding.strategy = [('.*', 'replicate')]
  return config
