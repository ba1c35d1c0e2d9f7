"""DiT + REPA presets: diffuse_nnx's `dit_imagenet_repa.py` (`imagenet_raw_256-{S,B,L,XL}_2`).

Raw ImageNet 256 images (ADM center crop, random flips) are encoded on the fly by the SD-VAE
into 32x32x4 latents; with patch 2 the network sees 256 tokens, aligned with the 256 patch
features of DINOv2-B/14 at 224 of the same (flipped) image through a 2048-wide projector,
loss weight 0.5. SiT flow matching otherwise as `dit.py`; FSDP along `data`; sampling with
Euler-Maruyama, 250 steps from t = 0.999, w(t) = t / (1 - t), at REPA's published best
guidance: cfg 1.8 inside the interval t <= 0.7 (FID 1.42 for SiT-XL/2 + REPA at 4M steps;
1.80 without the interval).

Aligned block: 4 for S and B, 8 for L and XL, as the REPA paper (arXiv 2410.06940, SiT-B/2
depth 4, SiT-L/XL depth 8); diffuse_nnx aligns block 4 at every size.

The DINOv2 weights are a local file:

    python launch.py --fdl_config=experiments/dit_repa.py:xl2 --workdir=runs/repa_xl2 \\
      --fdl_set=repa.detector.weights_path=/weights/dinov2-base/model.safetensors \\
      --fdl_set=encoder.weights_path=/weights/sd-vae-ft-ema/diffusion_pytorch_model.safetensors
"""

import fiddle as fdl

from experiments import common

ALIGNED_BLOCK = {'S': 4, 'B': 4, 'L': 8, 'XL': 8}


def _imagenet(size: str, image_size: int, data_dir: str | None) -> fdl.Config:
  return common.experiment(
      data=common.imagenet_raw(image_size, batch_size=256, data_dir=data_dir),
      encoder=common.imagenet_encoder(image_size),
      network=common.dit_network(size, patch_size=2),
      repa=common.repa_alignment(image_size, depth=ALIGNED_BLOCK[size]),
      sampler=common.euler_maruyama(250, guidance_scale=1.8, guidance_interval=(0.0, 0.7)),
      sharding=common.fsdp())


def s2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """DiT-S/2 + REPA at block 4."""
  return _imagenet('S', image_size, data_dir)


def b2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """DiT-B/2 + REPA at block 4."""
  return _imagenet('B', image_size, data_dir)


def l2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """DiT-L/2 + REPA at block 8."""
  return _imagenet('L', image_size, data_dir)


def xl2(image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """DiT-XL/2 + REPA at block 8 (675M + 8.13M projector parameters)."""
  return _imagenet('XL', image_size, data_dir)
