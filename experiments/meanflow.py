"""MeanFlow presets: one-step generation with DiT backbones (diffuse_nnx's `mf_imagenet.py`).

`s2`, `b2`, `l2`, `xl2`: ImageNet 256 SD-VAE latents (32x32x4), diffuse_nnx's `dit_imagenet.py`
defaults changed as `mf_imagenet`: the DiT takes the interval t - r (`take_dt=True`) and has
no label dropout of its own (the MeanFlow interface drops conditions, 10%); MeanFlow
interface (logit-normal(-0.4, 1.0), training-time guidance 0.2 / mixture 0.92 on t <= 0.75)
with Gsunshine/meanflow's draws, the first 75% of each batch with r = t and the dropped rows a
prefix too, so only r = t rows are dropped (`interface.draws='independent'` draws the two
masks independently), and its adaptive weight eps 0.01 (diffuse_nnx: 1.0; the loss sums 4096
elements, so the two differ little); AdamW lr 1e-4, b2 0.95; 240 epochs (the paper's XL/2
3.43 run); one-step Euler-Jump sampling
with guidance 1 (it is baked in by training), FID at guidance 1 only. `digits`: the same on
the bundled 8x8 digits, for the CPU.

    python launch.py --fdl_config=experiments/meanflow.py:xl2 --workdir=runs/mf_xl2
    python launch.py --fdl_config='experiments/meanflow.py:b2(image_size=512)' --print_config
"""

import fiddle as fdl

from experiments import common, dit, fiddlers


def meanflow(variant: str = 'XL/2', image_size: int = 256,
             data_dir: str | None = None) -> fdl.Config:
  """MeanFlow DiT of `variant` on ImageNet at `image_size`, as deltas on `dit.dit` (B/2: the
  paper's MF-B/2; XL/2: diffuse_nnx's `commands/mf_imagenet.sh`, batch 256)."""
  config = dit.dit(variant, image_size, data_dir)
  config.network.take_dt = True
  config.network.take_gw = False
  # diffuse_nnx's enable_dropout=False: the interface drops the conditions
  config.network.class_dropout_prob = 0.0
  config.interface = common.meanflow_interface()
  config.optimizer.b2 = 0.95
  config.total_steps = common.imagenet_epochs(240, 256)  # the paper's 240 epochs
  config.sampler = common.euler_jump(1)
  config.visualize.guidance_scales = (1.0,)
  # Guidance is baked in by training: FID at cfg 1 only (diffuse_nnx repeats it at cfg 1.5).
  fid = config.evaluate[0]
  fid.all_guidance_scales = (1.0,)
  fid.all_eval_samples_nums = ((10_000, 50_000),)
  fid.eval_every_steps = ((25_000, 100_000),)
  return config


s2, b2, l2, xl2 = common.variant_presets(meanflow, 'S/2', 'B/2', 'L/2', 'XL/2')


def digits(total_steps: int = 2000) -> fdl.Config:
  """A small one-step MeanFlow DiT on the bundled 8x8 digits, in pixel space (CPU minutes)."""
  config = meanflow('S/2')
  fiddlers.digits(config, total_steps)
  return config
