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

from experiments import common, dit

ALIGNED_BLOCK = {'S': 4, 'B': 4, 'L': 8, 'XL': 8}


def dit_repa(variant: str = 'XL/2', image_size: int = 256,
             data_dir: str | None = None) -> fdl.Config:
  """DiT of `variant` + REPA at block `ALIGNED_BLOCK[size]` on raw ImageNet at `image_size`,
  as deltas on `dit.dit` (XL/2: 675M + 8.13M projector parameters)."""
  config = dit.dit(variant, image_size, data_dir)
  config.data = common.imagenet_raw(image_size, batch_size=256, data_dir=data_dir)
  config.repa = common.repa_alignment(image_size, depth=ALIGNED_BLOCK[variant.split('/')[0]])
  config.sampler = common.euler_maruyama(250, guidance_scale=1.8, guidance_interval=(0.0, 0.7))
  config.sharding = common.fsdp()
  return config


s2, b2, l2, xl2 = common.variant_presets(dit_repa, 'S/2', 'B/2', 'L/2', 'XL/2')
