"""Shared presets of diffuse_nnx's configs (willisma/diffuse_nnx `configs/common_specs.py`),
with diffuse_nnx's values and default paths, as plain dictionaries the preset files copy from."""

_STATS = '/mnt/disks/data/stats/imagenet_{}.pkl'
_IMAGENET_SAMPLES = 1281167


def _data(data_dir: str, image_size: int, latent_dataset: bool) -> dict:
  return dict(data_dir=data_dir, image_size=image_size, batch_size=256,
              latent_dataset=latent_dataset, num_train_samples=_IMAGENET_SAMPLES,
              stat_dir=_STATS.format(image_size))


_imagenet_data_presets = {
    'imagenet_64': _data('/mnt/disks/data/prepared/imagenet_64', 64, True),
    'imagenet_256': _data('/mnt/disks/data/imagenet_256', 256, True),
    'imagenet_512': _data('/mnt/disks/data/prepared/imagenet_512', 512, True),
    'imagenet_raw_64': _data('/mnt/disks/raw_data/datasets/imagenet', 64, False),
    'imagenet_raw_256': _data('/mnt/disks/data', 256, False),
    'imagenet_raw_512': _data('/mnt/disks/raw_data/datasets/imagenet', 512, False),
}


def _sd_vae(raw_mean: list, raw_std: list) -> dict:
  return dict(encoder='StabilityVAE',
              encoder_kwargs=dict(raw_mean=raw_mean, raw_std=raw_std, final_std=0.5,
                                  downsample_factor=8, latent_channels=4))


_SD_VAE_256 = ([0.865, -0.278, 0.216, 0.374], [4.86, 5.32, 3.94, 3.99])
_SD_VAE_512 = ([1.560, -0.695, 0.483, 0.729], [5.27, 5.91, 4.21, 4.31])

# Latent and raw entries of a resolution are the same encoder.
_imagenet_encoder_presets = {
    f'imagenet{kind}_{size}': preset
    for kind in ('', '_raw')
    for size, preset in ((64, dict(encoder='RGB', encoder_kwargs=dict())),
                         (256, _sd_vae(*_SD_VAE_256)), (512, _sd_vae(*_SD_VAE_512)))
}

_imagenet_rae_encoder_presets = {
    'imagenet_raw_256': dict(encoder='RAE', encoder_kwargs=dict(
        downsample_factor=16, latent_channels=768, pretrained_path='/home/nm3607/model.pt')),
}

_dit_network_presets = {
    'S': dict(hidden_size=384, depth=12, num_heads=6),
    'B': dict(hidden_size=768, depth=12, num_heads=12),
    'L': dict(hidden_size=1024, depth=24, num_heads=16),
    'XL': dict(hidden_size=1152, depth=28, num_heads=16),
}

_ddt_network_presets = {
    size: dict(encoder_hidden_size=width, encoder_num_heads=heads, num_encoder_blocks=blocks,
               decoder_hidden_size=2048, decoder_num_heads=16, num_decoder_blocks=2)
    for size, (width, heads, blocks) in {'S': (384, 6, 12), 'XL': (1152, 16, 28)}.items()
}
