"""DiT presets: SiT flow matching with DiT backbones.

`dit(variant)`: ImageNet 256 SD-VAE latents (32x32x4), diffuse_nnx's `dit_imagenet.py`
defaults (SiT's training; diffuse_nnx's Heun-32 sampler where SiT published Euler-Maruyama 250
and dopri5, and guidance on all 4 channels where DiT/SiT guide 3: `sampler.guide_channels=3`),
with the network variant `SIZE/PATCH` of `lib.models.dit.SIZES` ('S/2', 'B/4',
'XL/2', ...); `s2`, `b2`, `l2`, `xl2` are its published variants. `digits`: the embedded CPU
demo on scikit-learn's digits (`experiments/fiddlers.py:digits` on DiT-S/2).

    python launch.py --fdl_config=experiments/dit.py:xl2 --workdir=runs/xl2
    python launch.py --fdl_config='experiments/dit.py:b2(image_size=512)' --print_config
    python launch.py --fdl_config='experiments/dit.py:dit(variant="B/4")' --print_config

`image_size=64` trains in pixel space on ImageNet 64 prepared by EDM2's dataset_tool.py (a
folder or .zip of PNGs with dataset.json; diffuse_nnx's default `imagenet_64-B_2`); 512 uses
that resolution's SD-VAE latent statistics. The data folder is `data_dir` (or
`--fdl_set=data.data_dir=...`).
"""

import fiddle as fdl

from experiments import common, fiddlers
from lib.eval import actions


def dit(variant: str = 'XL/2', image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """DiT of `variant` on ImageNet at `image_size` (parameters at 256: S/2 33M, B/2 130M, L/2
  458M, XL/2 675M)."""
  return common.experiment(
      data=common.imagenet_data(image_size, batch_size=256, data_dir=data_dir),
      encoder=common.imagenet_encoder(image_size),
      network=common.dit_network(variant))


s2, b2, l2, xl2 = common.variant_presets(dit, 'S/2', 'B/2', 'L/2', 'XL/2')

# Sampling guidance of the digits demo, the best its DigitsQuality evaluation measures. One
# 2000-step run (500 samples per scale) gave accuracies 0.78 / 0.97 / 0.98 / 0.98 / 0.98 and
# Frechet distances 43 / 41 / 63 / 84 / 102 at cfg 1 / 2 / 3 / 4 / 5: the digits are
# recognisable from 3 on (the demo's purpose), with more diversity left at 3 than above.
DIGITS_GUIDANCE = 3.0


def digits(total_steps: int = 2000) -> fdl.Config:
  """A small class-conditional DiT on the bundled 8x8 digits, in pixel space; minutes on a CPU.
  Samples at guidance `DIGITS_GUIDANCE`; the evaluation and the grids compare it with none."""
  config = dit('S/2')
  fiddlers.digits(config, total_steps)
  config.optimizer.b2 = 0.99
  config.sampler.num_steps = 16
  config.sampler.guidance_scale = DIGITS_GUIDANCE
  config.evaluate.append(fdl.Config(actions.DigitsQuality, every_steps=1000, num_samples=250,
                                    guidance_scales=(1.0, DIGITS_GUIDANCE)))
  config.visualize.guidance_scales = (1.0, DIGITS_GUIDANCE)
  return config
