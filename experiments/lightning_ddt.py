"""LightningDDT (RAE DiT-DH) presets: diffuse_nnx's `lightning_ddt_imagenet.py`
(`imagenet_256-XL_2`, `imagenet_256-S_2`) on SD-VAE latents (32x32x4 at 256, patch 2).

Condition encoder + 2-block, 2048-wide velocity decoder of diffuse_nnx's `_ddt_network_presets`;
Gaussian-Fourier time embedding (512), SwiGLU, RoPE, RMSNorm, 6-way adaLN, no qk-norm;
SiT flow matching with logit-normal training times; AdamW lr 2e-4, b2 0.95; batch 1024;
EMA 0.9995; Heun-32 sampling over t = 1 -> 0 with diffuse_nnx's grid shift
s = sqrt(t_shift_cur / t_shift_base) = sqrt(16*16*768 / 4096) ~ 6.93.

That shift is the one RAE derives for its 16x16x768 latents, which diffuse_nnx applies to this
preset's sampler unchanged; training on 32x32x4 latents uses s = 1 (the interface derives it
from the data). Set `sampler.t_shift_cur=4096` for a grid matched to the training shift. The
RAE variant on 768-channel latents (patch 1) is a separate preset. Sampling guidance: cfg 1.5,
the SD-VAE family's published best (`common.SIT_GUIDANCE`); RAE's DiT-DH has no published
CFG number on these latents (its 1.13 uses AutoGuidance on RAE latents).

    python launch.py --fdl_config=experiments/lightning_ddt.py:xl2 --workdir=runs/ddt_xl2
"""

import fiddle as fdl

from experiments import common

# diffuse_nnx's lightning_ddt sampler kwargs.
SAMPLER_RANGE = dict(t_start=1.0, t_end=0.0, t_shift_base=4096, t_shift_cur=16 * 16 * 768)


def _imagenet(size: str, patch_size: int, image_size: int, data_dir: str | None) -> fdl.Config:
  config = common.experiment(
      data=common.imagenet_data(image_size, batch_size=1024, data_dir=data_dir),
      encoder=common.imagenet_encoder(image_size),
      network=common.ddt_network(size, patch_size),
      interface=common.sit_interface(time_dist='logit_normal'),
      optimizer=common.adamw(learning_rate=2e-4, b2=0.95),
      sharding=common.fsdp(),
      sampler=common.heun(32, guidance_scale=common.SIT_GUIDANCE, **SAMPLER_RANGE))
  config.ema.decay = 0.9995
  return config


def s2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """LightningDDT-S/2: encoder 384 x 12 blocks (6 heads), decoder 2048 x 2 (16 heads); 192.99M."""
  return _imagenet('S', 2, image_size, data_dir)


def xl2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """LightningDDT-XL/2: encoder 1152 x 28 blocks (16 heads), decoder 2048 x 2; 834.43M."""
  return _imagenet('XL', 2, image_size, data_dir)
