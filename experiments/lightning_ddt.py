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

from experiments import common, lightning_dit

# diffuse_nnx's lightning_ddt sampler kwargs.
SAMPLER_RANGE = dict(t_start=1.0, t_end=0.0, t_shift_base=4096, t_shift_cur=16 * 16 * 768)


def lightning_ddt(variant: str = 'XL/2', image_size: int = 256,
                  data_dir: str | None = None) -> fdl.Config:
  """LightningDDT of `variant` (`SIZE/PATCH`, sizes of `lib.models.lightning_ddt.SIZES`) on
  ImageNet at `image_size`: the LightningDiT recipe with this network, EMA 0.9995 and
  diffuse_nnx's sampler range (S/2: encoder 384 x 12 blocks, 6 heads, decoder 2048 x 2,
  16 heads, 192.99M parameters; XL/2: encoder 1152 x 28 blocks, 16 heads, 834.43M)."""
  config = lightning_dit.lightning_dit(image_size=image_size, data_dir=data_dir)
  config.network = common.ddt_network(variant)
  for name, value in SAMPLER_RANGE.items():
    setattr(config.sampler, name, value)
  config.ema.decay = 0.9995
  return config


s2, xl2 = common.variant_presets(lightning_ddt, 'S/2', 'XL/2')
