"""DiT + REPA presets: diffuse_nnx's `dit_imagenet_repa.py` (`imagenet_raw_256-{S,B,L,XL}_2`)
with REPA's own recipe (Yu et al., arXiv 2410.06940; sihyun-yu/REPA `train.py`, `generate.py`).

Raw ImageNet images (ADM center crop, no flips, as REPA's preprocessing) are encoded on the fly
by the SD-VAE (REPA's latents: sd-vae-ft-mse) into latents scaled by 0.18215 only
(`common.sd_vae_scaled_encoder`; 32x32x4 at 256); with patch 2 the network sees 256 tokens,
aligned with the 256 patch features of DINOv2-B/14 at 224 of the same image through a
2048-wide projector, loss weight 0.5. SiT flow matching with uniform training times and no
resolution shift at any size (REPA's `SILoss`); AdamW lr 1e-4, b2 0.999, gradient norm clipped
at 1 (`--max-grad-norm`); EMA 0.9999; batch 256; 4M steps (the 1.42 checkpoint); FSDP along
`data`.

Sampling (`mode`): 'sde' (default) is REPA's `euler_maruyama_sampler` (`common.repa_sde`):
w(t) = 2t from t = 1 over linspace(1, 0.04, 250) then a noise-free step to 0, cfg 1.8 where
0 <= t <= 0.7 (REPA's published FID 1.42 for SiT-XL/2 + REPA at 4M steps; 1.80 without the
interval); 'ode' is its `euler_sampler(heun=True)` (`common.repa_ode`), 50 steps, the same
guidance. The periodic FID measures cfg 1.0 and 1.8.

Aligned block: 4 for S and B, 8 for L and XL, as the REPA paper (SiT-B/2 depth 4, SiT-L/XL
depth 8); diffuse_nnx aligns block 4 at every size.

The DINOv2 weights are a local file:

    python launch.py --fdl_config=experiments/dit_repa.py:xl2 --workdir=runs/repa_xl2 \\
      --fdl_set=repa.detector.weights_path=/weights/dinov2-base/model.safetensors \\
      --fdl_set=encoder.weights_path=/weights/sd-vae-ft-mse/diffusion_pytorch_model.safetensors
    python launch.py --fdl_config='experiments/dit_repa.py:xl2(mode="ode")' --print_config
"""

from typing import Literal

import fiddle as fdl

from experiments import common, dit
from lib.experiment import ConfigError

ALIGNED_BLOCK = {'S': 4, 'B': 4, 'L': 8, 'XL': 8}
GUIDANCE, GUIDANCE_INTERVAL = 1.8, (0.0, 0.7)  # REPA's README: --cfg-scale=1.8 --guidance-high=0.7
SAMPLERS = {'sde': lambda: common.repa_sde(250), 'ode': lambda: common.repa_ode(50)}


def dit_repa(variant: str = 'XL/2', image_size: int = 256, data_dir: str | None = None,
             mode: Literal['sde', 'ode'] = 'sde') -> fdl.Config:
  """DiT of `variant` + REPA at block `ALIGNED_BLOCK[size]` on raw ImageNet at `image_size`,
  REPA's recipe as deltas on `dit.dit` (XL/2: 675M + 8.13M projector parameters); `mode`
  picks REPA's sampler ('sde' or 'ode', as its `generate.py --mode`)."""
  if mode not in SAMPLERS:
    raise ConfigError(f"mode={mode!r}: expected 'sde' or 'ode' (REPA's samplers)")
  config = dit.dit(variant, image_size, data_dir)
  config.data = common.imagenet_raw(image_size, batch_size=256, data_dir=data_dir)
  config.data.random_flip = False
  config.encoder = common.sd_vae_scaled_encoder()
  config.interface.t_shift_base = common.sd_vae_latent_elements(image_size)  # no shift
  config.optimizer.grad_clip_norm = 1.0
  config.repa = common.repa_alignment(image_size, depth=ALIGNED_BLOCK[variant.split('/')[0]])
  config.sampler = SAMPLERS[mode]()
  config.sampler.guidance_scale = GUIDANCE
  config.sampler.guidance_interval = GUIDANCE_INTERVAL
  config.evaluate[0].all_guidance_scales = (1.0, GUIDANCE)
  config.sharding = common.fsdp()
  config.total_steps = 4_000_000
  return config


s2, b2, l2, xl2 = common.variant_presets(dit_repa, 'S/2', 'B/2', 'L/2', 'XL/2')
