"""Encodes an image folder with the SD-VAE into a `LatentFolder` (pre-extracted posteriors).

    python -m lib.data.extract_latents --data_dir=/data/imagenet --out_dir=/data/imagenet_256 \
        --image_size=256 --weights_path=/weights/sd-vae-ft-mse/diffusion_pytorch_model.safetensors \
        [--batch_size=64] [--flip] [--split=train]

Images are read as `lib.data.images.ImageFolder` reads them (ADM center crop, classes from the
sorted folder names, examples numbered by class then file name) and encoded by
`lib.encoders.sd_vae.StabilityVAE`'s encoder. Example i becomes
`out_dir/{i // 1000:05d}/img{i:08d}.npy`, float32 (8, h, w) = the posterior [mean, std] of the
raw (unnormalised) latent, h = w = image_size / 8; with `--flip` the mirrored image of example
i is also written, as example N + i (N = number of images). `dataset.json` ({"labels":
[[relative path, label], ...]}) is written once every file exists, so an incomplete folder never
loads as a dataset.

Resumable: files already present are skipped, and each file is written to a temporary name and
renamed, so an interrupted run leaves only whole files; rerun the same command to finish. With
several JAX processes, process p writes the files j with j % process_count == p; the batch is
spread over this process's local devices when it divides evenly.
"""

import io
import json
import time
from concurrent import futures

import numpy as np
from absl import app, flags, logging

from lib import paths
from lib.data.images import ImageFolder


def file_name(index: int) -> str:
  """Relative path of example `index` (EDM2 layout)."""
  return f'{index // 1000:05d}/img{index:08d}.npy'


def _existing(out_dir) -> set[str]:
  return {name for name in paths.files_under(paths.resolve(out_dir, '--out_dir'))
          if name.endswith('.npy')}


def _save(out_dir, name: str, array: np.ndarray) -> None:
  path = paths.resolve(out_dir, '--out_dir') / name
  path.parent.mkdir(parents=True, exist_ok=True)
  data = io.BytesIO()
  np.save(data, array)
  paths.write_atomic(path, data.getvalue())


def write_labels(out_dir, labels: list[list]) -> str:
  """Writes `dataset.json` atomically; returns its path."""
  path = paths.resolve(out_dir, '--out_dir') / 'dataset.json'
  paths.write_atomic(path, json.dumps({'labels': labels}))
  return str(path)


def _encoder_fn(vae, batch_size: int):
  """A jitted uint8 (B, S, S, 3) -> float32 (B, 8, h, w) [mean, std] on the local devices."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devices = jax.local_devices()
  sharding = None
  if len(devices) > 1 and batch_size % len(devices) == 0:
    sharding = NamedSharding(Mesh(np.asarray(devices), ('data',)), P('data'))

  @jax.jit
  def encode(state, pixels):
    x = pixels.astype(jnp.float32) / 127.5 - 1.0
    mean, logvar = vae.model(state).posterior(x)
    return jnp.concatenate([mean, jnp.exp(0.5 * logvar)], axis=-1).transpose(0, 3, 1, 2)

  def run(state, pixels):
    pixels = jax.device_put(pixels, sharding) if sharding is not None else pixels
    return np.asarray(encode(state, pixels))

  return run


def extract(data_dir: str, out_dir: str, image_size: int, vae, batch_size: int = 64,
            flip: bool = False, split: str = 'train', num_classes: int = 1000,
            process_index: int = 0, process_count: int = 1, log_every_secs: float = 60.0
            ) -> str | None:
  """Encodes the missing examples of `data_dir` into `out_dir` (see the module docstring).

  Args:
    vae: a `lib.encoders.sd_vae.StabilityVAE` whose `weights_path` is set.
  Returns:
    the path of `dataset.json` once the folder is complete, else None (other processes still
    have files to write).
  """
  if image_size % vae.downsample_factor:
    raise ValueError(f'--image_size={image_size} is not divisible by the VAE\'s downsampling '
                     f'factor {vae.downsample_factor}')
  source = ImageFolder(data_dir, image_size=image_size, split=split, num_classes=num_classes,
                       random_flip=False)
  source.check()
  count = source.num_examples
  examples = [(i, False) for i in range(count)] + \
      ([(i, True) for i in range(count)] if flip else [])
  names = [file_name(j) for j in range(len(examples))]
  paths.resolve(out_dir, '--out_dir').mkdir(parents=True, exist_ok=True)
  existing = _existing(out_dir)
  todo = [j for j, name in enumerate(names) if name not in existing]
  mine = [j for j in todo if j % process_count == process_index]
  logging.info('%d images in %s (%d classes)%s; %d of %d latent files present; this process '
               'encodes %d', count, source.root, len(source.classes),
               ', with flipped copies' if flip else '', len(names) - len(todo), len(names),
               len(mine))
  if mine:
    state = vae.load()
    encode = _encoder_fn(vae, batch_size)
    chunks = [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]

    def load(chunk):
      pixels = source.load([examples[j][0] for j in chunk], [examples[j][1] for j in chunk])
      if len(chunk) < batch_size:  # one compiled shape
        pixels = np.concatenate([pixels, np.zeros((batch_size - len(chunk), *pixels.shape[1:]),
                                                  np.uint8)])
      return pixels

    start = last_log = time.monotonic()
    done = 0
    with futures.ThreadPoolExecutor(1) as reader:
      pending = reader.submit(load, chunks[0])
      for k, chunk in enumerate(chunks):
        pixels = pending.result()
        if k + 1 < len(chunks):
          pending = reader.submit(load, chunks[k + 1])  # decode the next batch meanwhile
        moments = encode(state, pixels)
        for j, array in zip(chunk, moments):
          _save(out_dir, names[j], array)
        done += len(chunk)
        now = time.monotonic()
        if now - last_log >= log_every_secs or k + 1 == len(chunks):
          rate = done / max(now - start, 1e-9)
          logging.info('encoded %d / %d (%.1f images/s, %.0f s left)', done, len(mine), rate,
                       (len(mine) - done) / rate)
          last_log = now
  if len(_existing(out_dir) & set(names)) < len(names):
    logging.info('%s is incomplete (other processes are still writing); rerun to finish and '
                 'write dataset.json', out_dir)
    return None
  labels = source.labels_of([i for i, _ in examples])
  path = write_labels(out_dir, [[name, int(label)] for name, label in zip(names, labels)])
  logging.info('wrote %s: %d latents of %d classes', path, len(names), len(source.classes))
  return path


def define_flags() -> None:
  """The command's flags (defined only when it runs as a command, so that importing
  this module adds no flags to another program)."""
  flags.DEFINE_string('data_dir', None, 'Image tree: DATA_DIR/<split>/<class>/*.JPEG.')
  flags.DEFINE_string('out_dir', None, 'Output LatentFolder.')
  flags.DEFINE_integer('image_size', 256, 'Side of the center crops.')
  flags.DEFINE_string('weights_path', None, 'diffusers AutoencoderKL weights '
                      '(diffusion_pytorch_model.safetensors or .bin).')
  flags.DEFINE_integer('batch_size', 64, 'Images per encoder call (per process).')
  flags.DEFINE_bool('flip', False, 'Also write the mirrored copy of every image.')
  flags.DEFINE_string('split', 'train', 'Subfolder of --data_dir holding the classes.')
  flags.DEFINE_integer('num_classes', 1000, 'Upper bound on class folders.')
  flags.DEFINE_list('block_out_channels', ['128', '256', '512', '512'],
                    'VAE widths (SD-VAE default).')
  flags.DEFINE_integer('layers_per_block', 2, 'VAE resnets per level.')
  flags.DEFINE_integer('norm_num_groups', 32, 'VAE GroupNorm groups.')


def main(argv):
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for name in ('data_dir', 'out_dir', 'weights_path'):
    if not FLAGS[name].value:
      raise app.UsageError(f'--{name} is required')
  import jax
  from lib.encoders import sd_vae

  vae = sd_vae.StabilityVAE(weights_path=FLAGS.weights_path,
                            block_out_channels=tuple(int(c) for c in FLAGS.block_out_channels),
                            layers_per_block=FLAGS.layers_per_block,
                            norm_num_groups=FLAGS.norm_num_groups)
  extract(FLAGS.data_dir, FLAGS.out_dir, FLAGS.image_size, vae, FLAGS.batch_size,
          FLAGS.flip, FLAGS.split, FLAGS.num_classes, jax.process_index(),
          jax.process_count())


if __name__ == '__main__':
  define_flags()
  app.run(main)
