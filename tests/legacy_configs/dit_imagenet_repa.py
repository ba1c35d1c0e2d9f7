"""Legacy (diffuse_nnx) config of DiT + REPA on raw ImageNet: diffuse_nnx's
`configs/dit_imagenet_repa.py` (`imagenet_raw_256-{S,B,L,XL}_2`): `dit_imagenet` with the REPA
block (block 4 aligned with DINOv2-B through a 2048-wide projector, weight 0.5),
Euler-Maruyama-250 sampling from t = 0.999, and FSDP."""

import ml_collections

from tests.legacy_configs import dit_imagenet


def get_config(options: str = 'imagenet_64-B_2') -> ml_collections.ConfigDict:
  config = dit_imagenet.get_config(options)
  config.restore_step = 0

  config.repa_class = 'repa'
  config.repa = ml_collections.ConfigDict()
  config.repa.loss = ml_collections.ConfigDict(dict(repa_loss_weight=0.5, repa_depth=4,
                                                    proj_dim=2048))
  config.repa.detector_class = 'dino'
  config.repa.detector = ml_collections.ConfigDict(dict(pretrained_path='facebook/dinov2-base'))

  config.sampler_class = 'euler-maruyama'
  config.sampler.num_sampling_steps = 250
  config.sampler.sampling_time_kwargs = ml_collections.ConfigDict(dict(t_start=0.999, t_end=0.0))
  config.sharding.strategy = [('.*', 'fsdp(axis="data")')]
  return config
