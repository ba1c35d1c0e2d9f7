"""Legacy (diffuse_nnx) config of LightningDDT (RAE's DiT-DH) on ImageNet SD-VAE latents: the
diffuse_nnx's `configs/lightning_ddt_imagenet.py` (`imagenet_256-S_2`, `imagenet_256-XL_2`).

diffuse_nnx's file reads `hidden_size`, `depth` and `num_heads` from the DDT size presets, which
have none (a KeyError); this config sets the DDT size fields instead, as diffuse_nnx's
`rae_imagenet.py` does. Otherwise: the LightningDiT preset with EMA 0.9995 and the sampling grid
shift of RAE's 16x16x768 latents.
"""

import ml_collections

from tests.legacy_configs import common_specs, dit_imagenet, lightning_dit_imagenet


def get_config(options: str = 'imagenet_256-XL_2') -> ml_collections.ConfigDict:
  config = lightning_dit_imagenet.get_config(options)
  config.network_class = 'lightning_ddt'
  ddt_network(config.network, dit_imagenet.parse_options(options)[1])
  config.sampler.sampling_time_kwargs = ml_collections.ConfigDict(dict(
      t_start=1.0, t_end=0.0, t_shift_base=config.interface.t_shift_base,
      t_shift_cur=16 * 16 * 768))
  config.ema.decay = 0.9995
  return config


def ddt_network(network: ml_collections.ConfigDict, size: str) -> None:
  for name in ('hidden_size', 'depth', 'num_heads'):
    del network[name]
  network.update(common_specs._ddt_network_presets[size])
