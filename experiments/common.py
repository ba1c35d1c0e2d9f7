"""Shared building blocks of the presets (the Fiddle counterpart of the seed's `common_specs.py`).

Each function returns a fresh, unbuilt Fiddle node; preset files combine them and
override leaves. Nothing here allocates parameters, opens files or imports TensorFlow.
Values that other values depend on (network input size and channels, number of
classes) are not set here: `lib.experiment.Experiment` derives them when it is built.
"""

import fiddle as fdl

from lib import checkpoint, ema, hooks, optim
from lib.data import digits, latents
from lib.experiment import Experiment
from lib.flow import samplers, sit
from lib.models import dit, encoders, sd_vae

# ------------------------------------------------------------------------------- data
IMAGENET_LATENT_DIRS = {
    64: '/mnt/disks/data/prepared/imagenet_64',
    256: '/mnt/disks/data/imagenet_256',
    512: '/mnt/disks/data/prepared/imagenet_512',
}


def imagenet_latents(image_size: int = 256, batch_size: int = 256,
                     data_dir: str | None = None) -> fdl.Config:
  """Pre-extracted SD-VAE posteriors of ImageNet (the seed's `imagenet_<size>` data presets)."""
  return fdl.Config(latents.LatentFolder, data_dir=data_dir or IMAGENET_LATENT_DIRS[image_size],
                    image_size=image_size, batch_size=batch_size, num_classes=1000)


def digits_data(batch_size: int = 128, image_size: int = 8) -> fdl.Config:
  """scikit-learn's bundled 8x8 digits (no download)."""
  return fdl.Config(digits.Digits, batch_size=batch_size, image_size=image_size)


# ------------------------------------------------------------------------------- encoders
SD_VAE_STATS = {  # per resolution, as the seed's `_imagenet_encoder_presets`
    256: dict(raw_mean=(0.865, -0.278, 0.216, 0.374), raw_std=(4.86, 5.32, 3.94, 3.99)),
    512: dict(raw_mean=(1.560, -0.695, 0.483, 0.729), raw_std=(5.27, 5.91, 4.21, 4.31)),
}


def sd_vae_encoder(image_size: int = 256, weights_path: str | None = None) -> fdl.Config:
  """Stability SD-VAE (f8, 4 channels) with the seed's latent statistics for the resolution."""
  return fdl.Config(sd_vae.StabilityVAE, weights_path=weights_path, final_std=0.5,
                    **SD_VAE_STATS[image_size])


def pixel_encoder() -> fdl.Config:
  """Pixel space: uint8 <-> [-1, 1] (the seed's `RGB` encoder)."""
  return fdl.Config(encoders.PixelEncoder)


# ------------------------------------------------------------------------------- networks
def dit_network(size: str = 'XL', patch_size: int = 2, **kwargs) -> fdl.Partial:
  """DiT of a published size (`S`, `B`, `L`, `XL`); sizes are the seed's `_dit_network_presets`."""
  hidden_size, depth, num_heads = dit.SIZES[size]
  return fdl.Partial(dit.DiT, patch_size=patch_size, hidden_size=hidden_size, depth=depth,
                     num_heads=num_heads, mlp_ratio=4.0, class_dropout_prob=0.1,
                     freq_embed_size=256, **kwargs)


# ------------------------------------------------------------------------------- training
def sit_interface(**kwargs) -> fdl.Config:
  return fdl.Config(sit.SiT, **{'time_dist': 'uniform', 't_mu': 0.0, 't_sigma': 1.0,
                                'n_mu': 0.0, 'n_sigma': 1.0, 't_shift_base': 4096, **kwargs})


def adamw(learning_rate: float = 1e-4, b2: float = 0.999, schedule=None, **kwargs) -> fdl.Partial:
  return fdl.Partial(optim.adamw, learning_rate=learning_rate,
                     schedule=schedule or fdl.Partial(optim.constant), b1=0.9, b2=b2, eps=1e-8,
                     weight_decay=0.0, **kwargs)


def heun(num_steps: int = 32, **kwargs) -> fdl.Config:
  return fdl.Config(samplers.Heun, num_steps=num_steps, sampling_time_dist='uniform', **kwargs)


def euler(num_steps: int = 50, **kwargs) -> fdl.Config:
  return fdl.Config(samplers.Euler, num_steps=num_steps, sampling_time_dist='uniform', **kwargs)


def run_services(save_every_steps: int = 50_000, max_to_keep: int = 8,
                 keep_period: int = 100_000, log_every_steps: int = 100) -> dict:
  """Checkpointing, writers and progress reporting (the seed's `checkpoint` and logging)."""
  return dict(
      checkpoint=fdl.Config(checkpoint.Checkpointing, save_interval_steps=save_every_steps,
                            max_to_keep=max_to_keep, keep_period=keep_period, async_save=False),
      writers=fdl.Config(hooks.Writers),
      report=fdl.Config(hooks.ReportProgress, every_steps=log_every_steps, every_secs=60.0),
      log_every_steps=log_every_steps)


def experiment(**nodes) -> fdl.Config:
  """The seed's `dit_imagenet.py` defaults around the given nodes (data, encoder, network, ...)."""
  defaults = dict(
      interface=sit_interface(),
      optimizer=adamw(),
      ema=fdl.Config(ema.EMA, decay=0.9999),
      sampler=heun(32),
      visualize=fdl.Config(hooks.SampleGrid, every_steps=25_000, num_samples=64,
                           guidance_scales=(1.0, 2.0)),
      seed=0,
      total_steps=7_000_000,
      **run_services())
  return fdl.Config(Experiment, **{**defaults, **nodes})
