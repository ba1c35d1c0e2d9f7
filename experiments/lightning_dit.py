"""LightningDiT presets: diffuse_nnx's `lightning_dit_imagenet.py` (`imagenet_256-XL_2` etc.).

ImageNet SD-VAE latents (32x32x4 at 256) with LightningDiT backbones of diffuse_nnx's network
sizes: Gaussian-Fourier time embedding (512), SwiGLU, RoPE, RMSNorm, 6-way adaLN, no qk-norm;
SiT flow matching with logit-normal training times; AdamW lr 2e-4, b2 0.95; batch 1024;
Heun-32 sampling at cfg 1.5 over all 4 channels, the SD-VAE family's published best
(`common.SIT_GUIDANCE`): LightningDiT's own best scales (6.7 at 800 epochs, 10 at 64) guide 3
of the 32 channels of its VA-VAE latents and do not carry over, as its sampler (Euler 250,
shift 0.3 in its time, guidance from t <= 0.875; BUILD.md "Presets against their papers'
official code" builds it) and its cosine loss (not implemented); EMA 0.9999.

    python launch.py --fdl_config=experiments/lightning_dit.py:xl2 --workdir=runs/ldit_xl2
    python launch.py --fdl_config='experiments/lightning_dit.py:b2(image_size=512)' --print_config
"""

import fiddle as fdl

from experiments import common, dit


def lightning_dit(variant: str = 'XL/2', image_size: int = 256,
                  data_dir: str | None = None) -> fdl.Config:
  """LightningDiT of `variant` (`SIZE/PATCH`, sizes of `lib.models.lightning_dit.SIZES`) on
  ImageNet at `image_size`, as deltas on `dit.dit` (parameters at 256: S/2 32.97M, B/2 130.53M,
  where diffuse_nnx counts 256 more as its fixed Fourier W is a Param; L/2 458.12M; XL/2
  675.22M, diffuse_nnx's `commands/dit_imagenet.sh` run)."""
  network = common.lightning_dit_network(variant)
  config = dit.dit(image_size=image_size, data_dir=data_dir)  # its network is replaced
  config.data.batch_size = 1024
  config.network = network
  config.interface.time_dist = 'logit_normal'
  config.optimizer.learning_rate = 2e-4
  config.optimizer.b2 = 0.95
  config.sharding = common.fsdp()
  return config


s2, b2, l2, xl2 = common.variant_presets(lightning_dit, 'S/2', 'B/2', 'L/2', 'XL/2')
