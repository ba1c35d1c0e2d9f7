"""MeanFlow presets: one-step generation with DiT backbones (diffuse_nnx's `mf_imagenet.py`).

`s2`, `b2`, `l2`, `xl2`: ImageNet 256 SD-VAE latents (32x32x4), diffuse_nnx's `dit_imagenet.py`
defaults changed as `mf_imagenet`: the DiT takes the interval t - r (`take_dt=True`) and has
no label dropout of its own (the MeanFlow interface drops conditions, 10%); MeanFlow
interface (logit-normal(-0.4, 1.0), 75% r = t, training-time guidance 0.2 / mixture 0.92 on
t <= 0.75, adaptive weight eps 1.0); AdamW lr 1e-4, b2 0.95; one-step Euler-Jump sampling
with guidance 1 (it is baked in by training), FID at guidance 1 only. `digits`: the same on
the bundled 8x8 digits, for the CPU.

    python launch.py --fdl_config=experiments/meanflow.py:xl2 --workdir=runs/mf_xl2
    python launch.py --fdl_config='experiments/meanflow.py:b2(image_size=512)' --print_config
"""

import fiddle as fdl

from experiments import common
from lib import hooks, optim


def _network(size: str, patch_size: int) -> fdl.Partial:
  network = common.dit_network(size, patch_size, take_dt=True, take_gw=False)
  network.class_dropout_prob = 0.0  # diffuse_nnx's enable_dropout=False: dropped in the interface
  return network


def _imagenet(size: str, patch_size: int, image_size: int, data_dir: str | None) -> fdl.Config:
  config = common.experiment(
      data=common.imagenet_data(image_size, batch_size=256, data_dir=data_dir),
      encoder=common.imagenet_encoder(image_size),
      network=_network(size, patch_size),
      interface=common.meanflow_interface(),
      optimizer=common.adamw(learning_rate=1e-4, b2=0.95),
      sampler=common.euler_jump(1))
  config.visualize.guidance_scales = (1.0,)
  # Guidance is baked in by training: FID at cfg 1 only (diffuse_nnx repeats it at cfg 1.5).
  fid = config.evaluate[0]
  fid.all_guidance_scales = (1.0,)
  fid.all_eval_samples_nums = ((10_000, 50_000),)
  fid.eval_every_steps = ((25_000, 100_000),)
  return config


def s2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """MeanFlow DiT-S/2."""
  return _imagenet('S', 2, image_size, data_dir)


def b2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """MeanFlow DiT-B/2 (the paper's MF-B/2)."""
  return _imagenet('B', 2, image_size, data_dir)


def l2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """MeanFlow DiT-L/2."""
  return _imagenet('L', 2, image_size, data_dir)


def xl2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """MeanFlow DiT-XL/2 (diffuse_nnx's `commands/mf_imagenet.sh`: `imagenet_256-XL_2`, batch 256)."""
  return _imagenet('XL', 2, image_size, data_dir)


def digits(total_steps: int = 2000) -> fdl.Config:
  """A small one-step MeanFlow DiT on the bundled 8x8 digits, in pixel space (CPU minutes)."""
  config = common.experiment(
      data=common.digits_data(batch_size=128, image_size=8),
      encoder=common.pixel_encoder(),
      network=_network('S', 2),
      interface=common.meanflow_interface(),
      optimizer=common.adamw(learning_rate=1e-3, b2=0.95, grad_clip_norm=1.0,
                             schedule=fdl.Partial(optim.cosine, warmup_steps=200, min_lr=1e-5)),
      sampler=common.euler_jump(1),
      evaluate=[fdl.Config(hooks.ValidationLoss, every_steps=500, batch_size=256)],
      total_steps=total_steps,
      **common.run_services(save_every_steps=500, max_to_keep=2, keep_period=None,
                            log_every_steps=100))
  config.network.hidden_size = 128
  config.network.depth = 4
  config.network.num_heads = 4
  config.ema.decay = 0.995
  config.visualize.every_steps = 1000
  config.visualize.num_samples = 100
  config.visualize.guidance_scales = (1.0,)
  return config
