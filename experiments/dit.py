"""DiT presets: SiT flow matching with DiT backbones.

`s2`, `b2`, `l2`, `xl2`: ImageNet 256 SD-VAE latents (32x32x4), diffuse_nnx's
`dit_imagenet.py` defaults. `digits`: the embedded CPU demo on scikit-learn's digits.

    python launch.py --fdl_config=experiments/dit.py:xl2 --workdir=runs/xl2
    python launch.py --fdl_config='experiments/dit.py:b2(image_size=512)' --print_config

`image_size=64` trains in pixel space on ImageNet 64 prepared by EDM2's dataset_tool.py (a
folder or .zip of PNGs with dataset.json; diffuse_nnx's default `imagenet_64-B_2`); 512 uses
that resolution's SD-VAE latent statistics.
"""

import fiddle as fdl

from experiments import common
from lib import hooks, optim
from lib.eval import actions


def _imagenet(size: str, patch_size: int, image_size: int, data_dir: str | None) -> fdl.Config:
  return common.experiment(
      data=common.imagenet_data(image_size, batch_size=256, data_dir=data_dir),
      encoder=common.imagenet_encoder(image_size),
      network=common.dit_network(size, patch_size))


def s2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """DiT-S/2 (33M parameters at 256)."""
  return _imagenet('S', 2, image_size, data_dir)


def b2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """DiT-B/2 (130M)."""
  return _imagenet('B', 2, image_size, data_dir)


def l2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """DiT-L/2 (458M)."""
  return _imagenet('L', 2, image_size, data_dir)


def xl2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """DiT-XL/2 (675M)."""
  return _imagenet('XL', 2, image_size, data_dir)


# Sampling guidance of the digits demo, the best its DigitsQuality evaluation measures. One
# 2000-step run (500 samples per scale) gave accuracies 0.78 / 0.97 / 0.98 / 0.98 / 0.98 and
# Frechet distances 43 / 41 / 63 / 84 / 102 at cfg 1 / 2 / 3 / 4 / 5: the digits are
# recognisable from 3 on (the demo's purpose), with more diversity left at 3 than above.
DIGITS_GUIDANCE = 3.0


def digits(total_steps: int = 2000) -> fdl.Config:
  """A small class-conditional DiT on the bundled 8x8 digits, in pixel space; minutes on a CPU.
  Samples at guidance `DIGITS_GUIDANCE`; the evaluation and the grids compare it with none."""
  config = common.experiment(
      data=common.digits_data(batch_size=128, image_size=8),
      encoder=common.pixel_encoder(),
      network=common.dit_network('S', patch_size=2),
      optimizer=common.adamw(learning_rate=1e-3, b2=0.99, grad_clip_norm=1.0,
                             schedule=fdl.Partial(optim.cosine, warmup_steps=200, min_lr=1e-5)),
      sampler=common.heun(16, guidance_scale=DIGITS_GUIDANCE),
      evaluate=[fdl.Config(hooks.ValidationLoss, every_steps=500, batch_size=256),
                fdl.Config(actions.DigitsQuality, every_steps=1000, num_samples=250,
                           guidance_scales=(1.0, DIGITS_GUIDANCE))],
      total_steps=total_steps,
      **common.run_services(save_every_steps=500, max_to_keep=2, keep_period=None,
                            log_every_steps=100))
  config.network.hidden_size = 128
  config.network.depth = 4
  config.network.num_heads = 4
  config.ema.decay = 0.995
  config.visualize.every_steps = 1000
  config.visualize.num_samples = 100
  config.visualize.guidance_scales = (1.0, DIGITS_GUIDANCE)
  return config
