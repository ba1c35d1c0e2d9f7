"""Legacy (diffuse_nnx) config of MeanFlow on ImageNet: diffuse_nnx's `configs/mf_imagenet.py`,
which changes `dit_imagenet` in place: MeanFlow interface, a DiT taking the interval t - r with
its own label dropout off, AdamW b2 0.95, one-step Euler-Jump sampling."""

import ml_collections

from tests.legacy_configs import dit_imagenet


def get_config(options: str = 'imagenet_64-B_2') -> ml_collections.ConfigDict:
  config = dit_imagenet.get_config(options)

  config.interface_class = 'mean_flow'
  config.interface.update(train_time_dist_type='logitnormal', t_mu=-0.4, t_sigma=1.0,
                          n_mu=0.0, n_sigma=1.0, x_sigma=0.5)
  config.interface.update(norm_eps=1.0, norm_power=1.0, fm_portion=0.75, cond_drop_ratio=0.1)
  config.interface.update(guidance_scale=0.2, guidance_mixture_ratio=1 - 0.2 / 2.5,
                          guidance_t_min=0.0, guidance_t_max=0.75)

  config.network.update(take_dt=True, take_gw=False, enable_dropout=False,
                        class_dropout_prob=0.1)

  config.learning_rate = 1e-4
  config.learning_rate_schedule = 'constant'
  config.warmup_steps = 0
  config.min_abs_lr = 0.0
  config.optimizer_class = 'adamw'
  config.optimizer.update(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)

  config.sampler_class = 'euler_jump'
  config.sampler.update(num_sampling_steps=1, sampling_time_dist='uniform')

  config.ema_class = 'ema'
  config.ema.decay = 0.9999
  config.visualize.update(on=True, num_samples=64, guidance_scale=1.0)
  config.sharding.update(mesh=[('data', -1)], data_axis='data', strategy=[('.*', 'replicate')],
                         rules=[('act_batch', 'data')], allow_split_physical_axes=False)
  return config
