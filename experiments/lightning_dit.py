"""LightningDiT presets: diffuse_nnx's `lightning_dit_imagenet.py` (`imagenet_256-XL_2` etc.).

ImageNet SD-VAE latents (32x32x4 at 256) with LightningDiT backbones of diffuse_nnx's network
sizes: Gaussian-Fourier time embedding (512), SwiGLU, RoPE, RMSNorm, 6-way adaLN, no qk-norm;
SiT flow matching with logit-normal training times; AdamW lr 2e-4, b2 0.95; batch 1024;
Heun-32 sampling at cfg 1.5 over all 4 channels, the SD-VAE family's published best
(`common.SIT_GUIDANCE`): LightningDiT's own best scales (6.7 at 800 epochs, 10 at 64) guide 3
of the 32 channels of its VA-VAE latents and do not carry over; EMA 0.9999.

    python launch.py --fdl_config=experiments/lightning_dit.py:xl2 --workdir=runs/ldit_xl2
    python launch.py --fdl_config='experiments/lightning_dit.py:b2(image_size=512)' --print_config
"""

import fiddle as fdl

from experiments import common


def _imagenet(size: str, patch_size: int, image_size: int, data_dir: str | None) -> fdl.Config:
  return common.experiment(
      data=common.imagenet_data(image_size, batch_size=1024, data_dir=data_dir),
      encoder=common.imagenet_encoder(image_size),
      network=common.lightning_dit_network(size, patch_size),
      interface=common.sit_interface(time_dist='logit_normal'),
      optimizer=common.adamw(learning_rate=2e-4, b2=0.95),
      sharding=common.fsdp())


def s2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """LightningDiT-S/2 (32.97M parameters at 256)."""
  return _imagenet('S', 2, image_size, data_dir)


def b2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """LightningDiT-B/2 (130.53M; diffuse_nnx counts 256 more: its fixed Fourier W is a Param)."""
  return _imagenet('B', 2, image_size, data_dir)


def l2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """LightningDiT-L/2 (458.12M)."""
  return _imagenet('L', 2, image_size, data_dir)


def xl2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """LightningDiT-XL/2 (675.22M), diffuse_nnx's `commands/dit_imagenet.sh` run."""
  return _imagenet('XL', 2, image_size, data_dir)
