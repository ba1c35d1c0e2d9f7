"""MCG-NJU DDT presets (Wang et al., "DDT: Decoupled Diffusion Transformer", arXiv 2504.05741;
`configs/repa_improved_ddt_xlen22de6_{256,512}.yaml`).

`xl2`: DDT-XL/2 22en6de (`lib.models.ddt.DDT`, 674.6M parameters) on ImageNet SD-VAE latents
(32x32x4 at 256, 64x64x4 at 512), the paper's recipe as far as this framework has it:

  * latents: SD-VAE (the release uses sd-vae-ft-ema) scaled by 0.18215 only
    (`common.sd_vae_scaled_encoder`), not the per-channel statistics of the other presets;
  * flow matching in SiT's time convention, which the released weights use (t = 1 data):
    `SiT(network_time='data_at_1')` feeds the network 1 - t and negates its velocity; training
    times logit-normal(0, 1) (`randn().sigmoid()`, symmetric, so the same in both conventions)
    with no resolution shift at either size (`t_shift_base` = the latent's H*W*C);
  * label dropout 0.1 (null class 1000, table of 1001 rows);
  * AdamW lr 1e-4, betas (0.9, 0.95), no weight decay, constant; EMA 0.9999; batch 256 (the
    release config sets 16 per device, REPA's 256 in total); 400 epochs (~2.0M steps) gave FID
    1.26, 256 epochs 1.31; the config's max_steps is 4M; bf16-mixed there (set
    `network.dtype='bfloat16'` for it here);
  * sampling: Euler, 250 steps (the last of length 0.04), CFG over all channels with w = 2.0
    at 256 (3.0 at 512), only inside the interval s in (0.3, 1.0) of the release's time s
    (t = 1 - s here: t in [0, 0.7], the half near the data).

Differences from the release that remain: the release trains with the REPA loss (DINOv2-B
features aligned to block 8 through a 3-layer projector, weight 0.5); REPA aligns features of
the clean images, so it needs raw images encoded on the fly (the `dit_repa.py` graph, whose
`repa` term works with this network too), while this preset reads pre-extracted latents and
trains the flow-matching part. The release's Euler grid, 249 equal steps from s = 0 to 0.96
plus a last step of 0.04 (`last_step`), is `last_interval=0.04` here; its interval is open,
0.3 < s < 1, which no grid time of either end meets.

Released weights (`MCG-NJU/DDT-XL-22en6de-R256` / `-R512`, Lightning checkpoints; the
importer takes `ema_denoiser.*`):

    python launch.py --mode=import --checkpoint=model.ckpt \
        --fdl_config=experiments/ddt.py:xl2 --fdl_set=encoder.weights_path=... --workdir=runs/ddt
    python launch.py --workdir=runs/ddt --mode=sample
"""

import fiddle as fdl

from experiments import common

GUIDANCE = {256: 2.0, 512: 3.0}  # the release configs' `guidance`


def ddt(variant: str = 'XL/2', image_size: int = 256, data_dir: str | None = None) -> fdl.Config:
  """MCG-NJU DDT of `variant` (`SIZE/PATCH`, sizes of `lib.models.ddt.SIZES`) with the
  released ImageNet model's recipe (see the module docstring); XL/2 is DDT-XL/2 22en6de (1152
  wide, 16 heads, 22 encoder + 6 decoder blocks; 674,646,352 parameters at 256)."""
  config = common.experiment(
      data=common.imagenet_latents(image_size, batch_size=256, data_dir=data_dir),
      encoder=common.sd_vae_scaled_encoder(),
      network=common.mcg_ddt_network(variant),
      interface=common.sit_interface(time_dist='logit_normal', t_mu=0.0, t_sigma=1.0,
                                     t_shift_base=common.sd_vae_latent_elements(image_size),
                                     network_time='data_at_1'),
      optimizer=common.adamw(learning_rate=1e-4, b2=0.95),
      sampler=common.euler(250, guidance_scale=GUIDANCE.get(image_size, 2.0),
                           guidance_interval=(0.0, 0.7), last_interval=0.04),
      sharding=common.fsdp(),
      total_steps=4_000_000)
  config.ema.decay = 0.9999
  return config


xl2, = common.variant_presets(ddt, 'XL/2')
