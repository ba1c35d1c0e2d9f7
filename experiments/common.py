"""Shared building blocks of the presets (the Fiddle counterpart of diffuse_nnx's
`common_specs.py`).

Each function returns a fresh, unbuilt Fiddle node; preset files combine them and
override leaves. Nothing here allocates parameters, opens files or imports TensorFlow.
Values that other values depend on (network input size and channels, number of
classes) are not set here: `lib.experiment.Experiment` derives them when it is built.

Networks are named by a variant `SIZE/PATCH` of their model's size table (`dit_network('XL/2')`,
`decode_variant`); `variant_presets` makes a file's named presets (`xl2`) from its family
function (`dit(variant, ...)`).
"""

import inspect
from collections.abc import Callable, Mapping

import fiddle as fdl

from lib import checkpoint, ema, hooks, optim, sharding
from lib.data import digits, images, latents, prepared
from lib.eval import actions as eval_actions
from lib.experiment import ConfigError, Experiment
from lib.flow import edm, meanflow, repa, samplers, sit
from lib.encoders import dinov2, pixels, rae, sd_vae
from lib.models import ddt, dit, lightning_ddt, lightning_dit

# ------------------------------------------------------------------------------- data
# Folders and weight files are the user's: no preset names a machine's path. A run whose
# `data.data_dir` (or a weights field) is not set stops with an error naming the field.
PIXEL_SIZES = (64,)  # resolutions trained in pixel space (diffuse_nnx's `RGB` encoder presets)


def _for_size(table: dict, image_size: int, what: str, remedy: str):
  """`table[image_size]`, or a ConfigError naming the resolutions that have an entry."""
  if image_size not in table:
    raise ConfigError(f'image_size={image_size}: no {what} for this resolution (known: '
                      f'{", ".join(map(str, sorted(table)))}); {remedy}')
  return table[image_size]


def imagenet_latents(image_size: int = 256, batch_size: int = 256,
                     data_dir: str | None = None) -> fdl.Config:
  """Pre-extracted SD-VAE posteriors of ImageNet (diffuse_nnx's `imagenet_<size>` data presets)."""
  return fdl.Config(latents.LatentFolder, data_dir=data_dir, image_size=image_size,
                    batch_size=batch_size, num_classes=1000)


def imagenet_prepared(image_size: int = 64, batch_size: int = 256,
                      data_dir: str | None = None) -> fdl.Config:
  """ImageNet uint8 images prepared at `image_size` by EDM2's dataset_tool.py, a folder or
  `.zip` (diffuse_nnx's `imagenet_64`)."""
  return fdl.Config(prepared.PreparedImages, data_dir=data_dir, image_size=image_size,
                    batch_size=batch_size, num_classes=1000)


def imagenet_data(image_size: int = 256, batch_size: int = 256,
                  data_dir: str | None = None) -> fdl.Config:
  """The ImageNet training data of `image_size` for `imagenet_encoder(image_size)`: prepared
  images in pixel space (64), pre-extracted SD-VAE latents (256, 512)."""
  imagenet_encoder(image_size)  # an unknown resolution fails here, naming the known ones
  make = imagenet_prepared if image_size in PIXEL_SIZES else imagenet_latents
  return make(image_size, batch_size=batch_size, data_dir=data_dir)


def imagenet_raw(image_size: int = 256, batch_size: int = 256,
                 data_dir: str | None = None) -> fdl.Config:
  """ImageNet JPEGs under `data_dir/train/<wnid>/`, ADM center crop, random flips
  (diffuse_nnx's `imagenet_raw_<size>`)."""
  return fdl.Config(images.ImageFolder, data_dir=data_dir, image_size=image_size,
                    batch_size=batch_size, num_classes=1000)


def digits_data(batch_size: int = 128, image_size: int = 8) -> fdl.Config:
  """scikit-learn's bundled 8x8 digits (no download)."""
  return fdl.Config(digits.Digits, batch_size=batch_size, image_size=image_size)


# ------------------------------------------------------------------------------- encoders
SD_VAE_STATS = {  # per resolution, as diffuse_nnx's `_imagenet_encoder_presets`
    256: dict(raw_mean=(0.865, -0.278, 0.216, 0.374), raw_std=(4.86, 5.32, 3.94, 3.99)),
    512: dict(raw_mean=(1.560, -0.695, 0.483, 0.729), raw_std=(5.27, 5.91, 4.21, 4.31)),
}


def sd_vae_encoder(image_size: int = 256, weights_path: str | None = None) -> fdl.Config:
  """Stability SD-VAE (f8, 4 channels) with diffuse_nnx's latent statistics for the resolution."""
  stats = _for_size(SD_VAE_STATS, image_size, 'SD-VAE latent statistics',
                   f'pixel space is used at {", ".join(map(str, PIXEL_SIZES))}; for another '
                   'resolution add its per-channel raw_mean / raw_std to '
                   'experiments/common.py SD_VAE_STATS')
  return fdl.Config(sd_vae.StabilityVAE, weights_path=weights_path, final_std=0.5, **stats)


def pixel_encoder() -> fdl.Config:
  """Pixel space: uint8 <-> [-1, 1] (diffuse_nnx's `RGB` encoder)."""
  return fdl.Config(pixels.PixelEncoder)


def imagenet_encoder(image_size: int = 256) -> fdl.Config:
  """The encoder of ImageNet at `image_size`, as diffuse_nnx's `_imagenet_encoder_presets`:
  pixel space at 64, the SD-VAE with the resolution's latent statistics at 256 and 512; any
  other size is a ConfigError naming these."""
  return pixel_encoder() if image_size in PIXEL_SIZES else sd_vae_encoder(image_size)


def sd_vae_scaled_encoder(scaling_factor: float = 0.18215,
                          weights_path: str | None = None) -> fdl.Config:
  """SD-VAE latents scaled by the diffusers `scaling_factor` only (z * 0.18215, no per-channel
  statistics), as DiT/SiT/REPA and MCG-NJU DDT train on; their releases need this scaling."""
  return fdl.Config(sd_vae.StabilityVAE, weights_path=weights_path,
                    raw_mean=(0.0, 0.0, 0.0, 0.0), raw_std=(1.0, 1.0, 1.0, 1.0),
                    final_mean=0.0, final_std=scaling_factor)


def sd_vae_latent_elements(image_size: int) -> int:
  """H * W * C of an SD-VAE latent (f8, 4 channels): as `t_shift_base`, no resolution shift."""
  return (image_size // 8) ** 2 * 4


def rae_encoder(encoder_weights: str | None = None, decoder_weights: str | None = None,
                stats_path: str | None = None) -> fdl.Config:
  """RAE (diffuse_nnx's `_imagenet_rae_encoder_presets`): DINOv2-B with registers at 224 ->
  16x16x768 normalised latents, the released ViT-XL decoder back to 256x256 pixels. The three
  files are local copies of `facebook/dinov2-with-registers-base` `model.safetensors` and of
  nyu-visionx/RAE-collections `decoders/dinov2/wReg_base/ViTXL_n08/model.pt` and
  `stats/dinov2/wReg_base/imagenet1k/stat.pt`."""
  return fdl.Config(rae.RAE, encoder_weights=encoder_weights, decoder_weights=decoder_weights,
                    stats_path=stats_path, encoder_size='B', encoder_resolution=224)


# ------------------------------------------------------------------------------- networks
def decode_variant(variant: str, sizes: Mapping[str, object]) -> tuple[str, int]:
  """`'XL/2'` -> `('XL', 2)`: a size of the model's size table `sizes` and the patch size (as
  big_vision's `decode_variant`); a ConfigError naming the known sizes otherwise."""
  size, slash, patch = variant.partition('/')
  if size not in sizes or not slash or not patch.isdigit() or int(patch) < 1:
    raise ConfigError(f'variant={variant!r}: expected SIZE/PATCH with SIZE one of '
                      f'{", ".join(sizes)} and PATCH a positive integer, e.g. '
                      f'{list(sizes)[-1]}/2')
  return size, int(patch)


def variant_presets(family: Callable[..., fdl.Config], *variants: str) -> tuple[Callable, ...]:
  """One preset per variant: `family(variant, ...)` with the variant fixed, named as the variant
  in lower case without its slash (`'XL/2'` -> `xl2`), taking `family`'s other arguments and
  defined in `family`'s module, so `--fdl_config=experiments/dit.py:xl2` finds it:

      s2, b2, l2, xl2 = common.variant_presets(dit, 'S/2', 'B/2', 'L/2', 'XL/2')
  """
  signature = inspect.signature(family)
  others = [p for name, p in signature.parameters.items() if name != 'variant']

  def preset_of(variant: str) -> Callable[..., fdl.Config]:
    def preset(*args, **kwargs) -> fdl.Config:
      return family(variant, *args, **kwargs)
    preset.__name__ = preset.__qualname__ = variant.replace('/', '').lower()
    preset.__module__ = family.__module__
    preset.__doc__ = f'`{family.__name__}(variant={variant!r})`: see `{family.__name__}`.'
    preset.__signature__ = signature.replace(parameters=others)
    preset.__annotations__ = {k: v for k, v in family.__annotations__.items() if k != 'variant'}
    return preset

  return tuple(preset_of(variant) for variant in variants)


def dit_network(variant: str = 'XL/2', **kwargs) -> fdl.Partial:
  """DiT of a variant `SIZE/PATCH`, SIZE of `lib.models.dit.SIZES` (`S`, `B`, `L`, `XL`,
  diffuse_nnx's `_dit_network_presets`)."""
  size, patch_size = decode_variant(variant, dit.SIZES)
  hidden_size, depth, num_heads = dit.SIZES[size]
  return fdl.Partial(dit.DiT, patch_size=patch_size, hidden_size=hidden_size, depth=depth,
                     num_heads=num_heads, mlp_ratio=4.0, class_dropout_prob=0.1,
                     freq_embed_size=256, **kwargs)


def lightning_dit_network(variant: str = 'XL/2', **kwargs) -> fdl.Partial:
  """LightningDiT of a variant `SIZE/PATCH`, SIZE of `lib.models.lightning_dit.SIZES` (`S`,
  `B`, `L`, `XL` as diffuse_nnx's `_dit_network_presets`, and `1p0B`, `1p6B`) with
  diffuse_nnx's `lightning_dit_imagenet` switches: Gaussian-Fourier time embedding of width
  512, SwiGLU, RoPE, RMSNorm, 6-way adaLN, no qk-norm, no dropout."""
  size, patch_size = decode_variant(variant, lightning_dit.SIZES)
  hidden_size, depth, num_heads = lightning_dit.SIZES[size]
  return fdl.Partial(lightning_dit.LightningDiT, **{
      'patch_size': patch_size, 'hidden_size': hidden_size, 'depth': depth,
      'num_heads': num_heads, 'mlp_ratio': 4.0, 'class_dropout_prob': 0.1,
      'continuous_time_embed': True, 'freq_embed_size': 512, 'swiglu': True,
      'use_rope': True, 'rms_norm': True, 'adaln_shift': True, 'qk_norm': False,
      'mlp_dropout': 0.0, 'attn_w_dropout': 0.0, 'attn_o_dropout': 0.0, **kwargs})


def ddt_network(variant: str = 'XL/2', **kwargs) -> fdl.Partial:
  """LightningDDT (RAE DiT-DH) of a `lib.models.lightning_ddt.SIZES` size (diffuse_nnx's
  `_ddt_network_presets`; `S`: encoder 384 x 12 blocks, 6 heads; `XL`: 1152 x 28, 16 heads;
  both with a 2-block, 2048-wide, 16-head decoder) and diffuse_nnx's `lightning_ddt_imagenet`
  switches (as `lightning_dit_network`)."""
  size, patch_size = decode_variant(variant, lightning_ddt.SIZES)
  enc_hidden, enc_heads, enc_blocks, dec_hidden, dec_heads, dec_blocks = \
      lightning_ddt.SIZES[size]
  return fdl.Partial(lightning_ddt.LightningDDT, **{
      'patch_size': patch_size, 'encoder_hidden_size': enc_hidden,
      'encoder_num_heads': enc_heads, 'num_encoder_blocks': enc_blocks,
      'decoder_hidden_size': dec_hidden, 'decoder_num_heads': dec_heads,
      'num_decoder_blocks': dec_blocks, 'mlp_ratio': 4.0, 'class_dropout_prob': 0.1,
      'continuous_time_embed': True, 'freq_embed_size': 512, 'swiglu': True,
      'use_rope': True, 'rms_norm': True, 'adaln_shift': True, 'qk_norm': False,
      'mlp_dropout': 0.0, 'attn_w_dropout': 0.0, 'attn_o_dropout': 0.0, **kwargs})


def mcg_ddt_network(variant: str = 'XL/2', **kwargs) -> fdl.Partial:
  """MCG-NJU DDT (`lib.models.ddt.DDT`, not the RAE DiT-DH of `ddt_network`) of a size in
  `lib.models.ddt.SIZES` (`XL`: 1152 wide, 16 heads, 28 blocks of which 22 encoder, the
  released "22en6de"); label dropout 0.1 as the official trainer."""
  size, patch_size = decode_variant(variant, ddt.SIZES)
  hidden_size, num_heads, num_blocks, num_encoder_blocks = ddt.SIZES[size]
  return fdl.Partial(ddt.DDT, **{
      'patch_size': patch_size, 'hidden_size': hidden_size, 'num_heads': num_heads,
      'num_blocks': num_blocks, 'num_encoder_blocks': num_encoder_blocks, 'mlp_ratio': 4.0,
      'class_dropout_prob': 0.1, **kwargs})


# ------------------------------------------------------------------------------- training
IMAGENET_TRAIN_IMAGES = 1_281_167


def imagenet_epochs(epochs: float, batch_size: int) -> int:
  """Training steps of `epochs` passes over ImageNet-1k at `batch_size` (last partial batch
  dropped, as the official loaders)."""
  return int(epochs * (IMAGENET_TRAIN_IMAGES // batch_size))


def sit_interface(**kwargs) -> fdl.Config:
  return fdl.Config(sit.SiT, **{'time_dist': 'uniform', 't_mu': 0.0, 't_sigma': 1.0,
                                'n_mu': 0.0, 'n_sigma': 1.0, 't_shift_base': 4096, **kwargs})


def meanflow_interface(**kwargs) -> fdl.Config:
  """MeanFlow as Gsunshine/meanflow draws and weights it: logit-normal(-0.4, 1.0) times, the
  first 75% of each batch with r = t and the dropped (null-label, 10%) rows a prefix too
  (`draws='prefix'`), adaptive weight eps 0.01, power 1.0; training-time guidance of
  diffuse_nnx's `mf_imagenet`, w = 0.2, k = 0.92 (effective scale 2.5) for t in [0, 0.75]."""
  return fdl.Config(meanflow.MeanFlow, **{
      'time_dist': 'logit_normal', 't_mu': -0.4, 't_sigma': 1.0, 'n_mu': 0.0, 'n_sigma': 1.0,
      'fm_portion': 0.75, 'cond_drop_ratio': 0.1, 'draws': 'prefix', 'guidance_scale': 0.2,
      'guidance_mixture_ratio': 0.92, 'guidance_t_min': 0.0, 'guidance_t_max': 0.75,
      'norm_eps': 0.01, 'norm_power': 1.0, **kwargs})


def edm_interface(**kwargs) -> fdl.Config:
  """EDM preconditioning (sigma_data 0.5) with the EDM paper's log-normal(-1.2, 1.2) noise."""
  return fdl.Config(edm.EDM, **{'x_sigma': 0.5, 'p_mean': -1.2, 'p_std': 1.2, **kwargs})


def dinov2_detector(image_size: int = 256, weights_path: str | None = None, size: str = 'B',
                    registers: bool = False) -> fdl.Config:
  """Frozen DINOv2 patch features, images resized to 224 per 256 pixels (16x16 tokens at 256,
  32x32 at 512), the position table resampled once with antialias as REPA does.
  `weights_path`: a local `model.safetensors` of facebook/dinov2-base (or a torch-hub
  `dinov2_vitb14_pretrain.pth`)."""
  return fdl.Config(dinov2.DINOv2, weights_path=weights_path, size=size, registers=registers,
                    resolution=224 * image_size // 256, pos_embed='resampled')


def repa_alignment(image_size: int = 256, depth: int = 8, coefficient: float = 0.5,
                   projector_dim: int = 2048, weights_path: str | None = None) -> fdl.Config:
  """REPA (diffuse_nnx's `repa` block): align the tokens of block `depth`, through a 2048-wide
  projector, with DINOv2-B features of the clean image; loss weight 0.5."""
  return fdl.Config(repa.REPA, detector=dinov2_detector(image_size, weights_path), depth=depth,
                    coefficient=coefficient, projector_dim=projector_dim)


def adamw(learning_rate: float = 1e-4, b2: float = 0.999, schedule=None, **kwargs) -> fdl.Partial:
  return fdl.Partial(optim.adamw, learning_rate=learning_rate,
                     schedule=schedule or fdl.Partial(optim.constant), b1=0.9, b2=b2, eps=1e-8,
                     weight_decay=0.0, **kwargs)


def heun(num_steps: int = 32, **kwargs) -> fdl.Config:
  return fdl.Config(samplers.Heun, num_steps=num_steps, sampling_time_dist='uniform', **kwargs)


def euler(num_steps: int = 50, **kwargs) -> fdl.Config:
  return fdl.Config(samplers.Euler, num_steps=num_steps, sampling_time_dist='uniform', **kwargs)


def euler_jump(num_steps: int = 1, **kwargs) -> fdl.Config:
  """MeanFlow's average-velocity sampler (1 step = one network evaluation)."""
  return fdl.Config(samplers.EulerJump, num_steps=num_steps, sampling_time_dist='uniform',
                    **kwargs)


def euler_maruyama(num_steps: int = 250, **kwargs) -> fdl.Config:
  """diffuse_nnx's SDE sampler: 250 steps from t = 0.999, w(t) = t / (1 - t) ('linear_kl')."""
  return fdl.Config(samplers.EulerMaruyama, **{
      'num_steps': num_steps, 'diffusion': 'linear_kl', 'diffusion_norm': 1.0,
      'sampling_time_dist': 'uniform', 't_start': 0.999, 't_end': 0.0, **kwargs})


def repa_sde(num_steps: int = 250, **kwargs) -> fdl.Config:
  """REPA's `euler_maruyama_sampler`: w(t) = 2t ('linear', norm 2) from t = 1 over
  linspace(1, 0.04, num_steps) and a last, noise-free step to 0 (`last_interval=0.04`);
  num_steps network evaluations (twice inside the guidance interval)."""
  return fdl.Config(samplers.EulerMaruyama, **{
      'num_steps': num_steps, 'diffusion': 'linear', 'diffusion_norm': 2.0,
      'sampling_time_dist': 'uniform', 't_start': 1.0, 't_end': 0.0, 'last_interval': 0.04,
      **kwargs})


def repa_ode(num_steps: int = 50, **kwargs) -> fdl.Config:
  """REPA's `euler_sampler(heun=True)` (`generate.py --mode=ode --heun`, `samplers.REPAHeun`):
  Heun on linspace(1, 0, num_steps + 1), the last step Euler, each corrector guided as its
  step's start time; 2 * num_steps - 1 network evaluations."""
  return fdl.Config(samplers.REPAHeun, num_steps=num_steps, sampling_time_dist='uniform',
                    **kwargs)


def karras_heun(num_steps: int = 18, **kwargs) -> fdl.Config:
  """EDM's deterministic sampler: Heun on the Karras grid (sigma 80 -> 0.002, rho 7, then 0);
  the last step is Euler, so 2 * num_steps - 1 network evaluations."""
  return fdl.Config(samplers.Heun, **{
      'num_steps': num_steps, 'sampling_time_dist': 'karras', 'sigma_min': 0.002,
      'sigma_max': 80.0, 'rho': 7.0, **kwargs})


def replicated() -> fdl.Config:
  """Every device holds the whole training state; the batch is split over all devices."""
  return fdl.Config(sharding.Sharding, mesh=(('data', -1),),
                    rules=(('.*', fdl.Config(sharding.Replicate)),),
                    activation_rules=(('batch', 'data'),))


def fsdp(axis: str = 'data') -> fdl.Config:
  """Fully sharded data parallel: state arrays of 4 MiB or more split along `axis`."""
  return fdl.Config(sharding.Sharding, mesh=((axis, -1),),
                    rules=(('.*', fdl.Config(sharding.FSDP, axis=axis, min_size_mb=4.0)),),
                    activation_rules=(('batch', axis),))


def run_services(save_every_steps: int = 50_000, max_to_keep: int = 8,
                 keep_period: int = 100_000, log_every_steps: int = 100) -> dict:
  """Checkpointing, writers, progress reporting (diffuse_nnx's `checkpoint` and logging) and a
  trace of 5 steps early in every run (diffuse_nnx's; it costs under 1 % of the digits demo)."""
  return dict(
      checkpoint=fdl.Config(checkpoint.Checkpointing, save_interval_steps=save_every_steps,
                            max_to_keep=max_to_keep, keep_period=keep_period, async_save=False),
      writers=fdl.Config(hooks.Writers),
      report=fdl.Config(hooks.ReportProgress, every_steps=log_every_steps, every_secs=60.0),
      profile=fdl.Config(hooks.Profile, num_profile_steps=5, first_profile=10),
      log_every_steps=log_every_steps)


# ------------------------------------------------------------------------------- evaluation
def fid_evaluation(inception_weights: str | None = None, reference_stats: str | None = None,
                   **kwargs) -> fdl.Config:
  """Periodic FID / IS with diffuse_nnx's `eval` schedule: cfg 1.0 FID-10K every 25k and FID-50K
  every 100k steps, cfg 1.5 FID-50K every 100k; class-balanced labels. `reference_stats`: the
  statistics of the training data's resolution (EDM2 `.pkl` or ADM `.npz`)."""
  return fdl.Config(eval_actions.FIDEvaluation,
                    inception_weights=inception_weights, reference_stats=reference_stats,
                    all_guidance_scales=(1.0, 1.5),
                    all_eval_samples_nums=((10_000, 50_000), (50_000,)),
                    eval_every_steps=((25_000, 100_000), (100_000,)), **kwargs)


# Sampling guidance of SiT-family models on SD-VAE latents: SiT-XL/2's published best,
# cfg 1.5 (FID 2.06 with the SDE sampler, 2.15 with the ODE; DiT-XL/2's best is 1.5 too), the
# guided scale the FID evaluation measures. `launch.py --mode=sample` uses it by default.
SIT_GUIDANCE = 1.5


def experiment(**nodes) -> fdl.Config:
  """diffuse_nnx's `dit_imagenet.py` defaults around the given nodes (data, encoder, network, ...),
  including its periodic FID evaluation at the data's image size; sampling (Heun, 32 steps)
  at the published best guidance `SIT_GUIDANCE`."""
  defaults = dict(
      evaluate=[fid_evaluation()],
      interface=sit_interface(),
      optimizer=adamw(),
      ema=fdl.Config(ema.EMA, decay=0.9999),
      sampler=heun(32, guidance_scale=SIT_GUIDANCE),
      visualize=fdl.Config(hooks.SampleGrid, every_steps=25_000, num_samples=64,
                           guidance_scales=(1.0, 2.0)),
      sharding=replicated(),
      seed=0,
      total_steps=7_000_000,
      **run_services())
  return fdl.Config(Experiment, **{**defaults, **nodes})
