"""RAE presets: diffuse_nnx's `rae_imagenet.py` (`imagenet_raw_256-{XL,S}_1`), diffusion in the
latent space of a representation autoencoder (Zheng et al., arXiv 2510.11690).

Raw ImageNet 256 images are encoded on the fly by the RAE (DINOv2-B with registers, final
LayerNorm without affine, 16x16x768 latents normalised by the released statistics) and
decoded by its ViT-XL decoder. The backbone is LightningDDT (RAE's DiT-DH) with patch 1: a
1152-wide, 28-block condition encoder and a 2048-wide, 2-block velocity decoder. SiT flow
matching with logit-normal times; the interface derives the training-time shift
s = sqrt(16*16*768 / 4096) ~ 6.93 from the latents, the sampler uses the same shift
(`t_shift_cur=196608`). AdamW b2 0.95 with RAE's `DiTDH-XL_DINOv2-B.yaml` schedule: lr 2e-4
for 40 epochs, linear to 2e-5 at epoch 800, then constant, 1400 epochs, gradient norm clipped
at 1; batch 1024; EMA 0.9995; Euler, 50 steps without guidance, as RAE's released CFG
sampling config (`DiTDHXL-DINOv2-B.yaml`, cfg 1.0: FID 1.51; its best, 1.13, guides with
AutoGuidance from a DiT-DH-S model, which this project lacks); replicated state. The first sample grid of a run also shows reconstructions
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

from experiments import common, lightning_ddt
from lib import optim


def rae(variant: str = 'XL/1', data_dir: str | None = None) -> fdl.Config:
  """DiT-DH of `variant` (LightningDDT, sizes of `lib.models.lightning_ddt.SIZES`) on RAE
  latents of raw ImageNet 256: the LightningDDT recipe with the RAE encoder, Euler-50 and
  replicated state (XL/1: 838M parameters; S/1: 196M, the size RAE trains as its AutoGuidance
  guide)."""
  config = lightning_ddt.lightning_ddt(variant, 256, data_dir)
  config.data = common.imagenet_raw(256, batch_size=1024, data_dir=data_dir)
  config.encoder = common.rae_encoder()
  config.optimizer.schedule = fdl.Partial(
      optim.constant_then_linear, decay_start=common.imagenet_epochs(40, 1024),
      decay_end=common.imagenet_epochs(800, 1024), min_lr=2e-5)
  config.optimizer.grad_clip_norm = 1.0
  config.total_steps = common.imagenet_epochs(1400, 1024)
  config.sampler = common.euler(50, **lightning_ddt.SAMPLER_RANGE)
  config.sharding = common.replicated()
  config.visualize.reconstructions = True
  return config


xl1, s1 = common.variant_presets(rae, 'XL/1', 'S/1')
