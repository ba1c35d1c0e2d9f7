"""RAE presets: diffuse_nnx's `rae_imagenet.py` (`imagenet_raw_256-{XL,S}_1`), diffusion in the
latent space of a representation autoencoder (Zheng et al., arXiv 2510.11690).

Raw ImageNet 256 images are encoded on the fly by the RAE (DINOv2-B with registers, final
LayerNorm without affine, 16x16x768 latents normalised by the released statistics) and
decoded by its ViT-XL decoder. The backbone is LightningDDT (RAE's DiT-DH) with patch 1: a
1152-wide, 28-block condition encoder and a 2048-wide, 2-block velocity decoder. SiT flow
matching with logit-normal times; the interface derives the training-time shift
s = sqrt(16*16*768 / 4096) ~ 6.93 from the latents, the sampler uses the same shift
(`t_shift_cur=196608`). AdamW lr 2e-4, b2 0.95; batch 1024; EMA 0.9995; Euler, 50 steps
without guidance, as RAE's released CFG sampling config (`DiTDHXL-DINOv2-B.yaml`, cfg 1.0: FID
1.51; its best, 1.13, guides with AutoGuidance from a DiT-DH-S model, which this project lacks);
replicated state. The first sample grid of a run also shows reconstructions
decode(encode(x)) of held-out images.

diffuse_nnx's `pretrained_ckpt` (a released DiT-DH checkpoint, left to the caller) is
`init_from` here:

    python launch.py --fdl_config=experiments/rae.py:xl1 --workdir=runs/rae_xl1 \\
      --fdl_set=encoder.encoder_weights=/weights/dinov2-with-registers-base/model.safetensors \\
      --fdl_set=encoder.decoder_weights=/weights/rae/ViTXL_n08/model.pt \\
      --fdl_set=encoder.stats_path=/weights/rae/stat.pt \\
      --fdl_set=init_from=/weights/rae/DiTDH-XL/ep-0000800.pt
"""

import fiddle as fdl

from experiments import common
from experiments.lightning_ddt import SAMPLER_RANGE


def _imagenet(size: str, data_dir: str | None) -> fdl.Config:
  config = common.experiment(
      data=common.imagenet_raw(256, batch_size=1024, data_dir=data_dir),
      encoder=common.rae_encoder(),
      network=common.ddt_network(size, patch_size=1),
      interface=common.sit_interface(time_dist='logit_normal'),
      optimizer=common.adamw(learning_rate=2e-4, b2=0.95),
      sampler=common.euler(50, **SAMPLER_RANGE))
  config.ema.decay = 0.9995
  config.visualize.reconstructions = True
  return config


def xl1(data_dir: str | None = None) -> fdl.Config:
  """DiT-DH-XL/1 (LightningDDT-XL, patch 1) on RAE latents: 838M parameters."""
  return _imagenet('XL', data_dir)


def s1(data_dir: str | None = None) -> fdl.Config:
  """DiT-DH-S/1 on RAE latents (196M; the size RAE trains as its AutoGuidance guide)."""
  return _imagenet('S', data_dir)
