"""64 px in pixel space: EDM2 dataset_tool.py datasets (folder and .zip of PNGs with
dataset.json) through ImageFolder's tf.data pipeline, the native and legacy 64 px presets, and
clear errors for a bad dataset.json or a resolution without encoder statistics."""

import itertools
import json
import zipfile

import fiddle as fdl
import numpy as np
import pytest
from PIL import Image

from experiments.legacy import converter
from lib import errors
from lib.config import presets
from lib.data import stream
from lib.data.prepared import PreparedImages
from lib.experiment import ConfigError
from lib.encoders.pixels import PixelEncoder
from tests.legacy_configs import dit_imagenet

NUM_IMAGES = 12


def image_array(i: int, size: int) -> np.ndarray:
  """Image i: distinct, not left-right symmetric content."""
  y, x = np.mgrid[:size, :size]
  return np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 20 * i)], -1).astype(
      np.uint8)


def write_dataset(root, size: int = 8, as_zip: bool = False, num_classes: int = 3,
                  labels_json=None) -> str:
  """An EDM2 dataset_tool.py layout of NUM_IMAGES PNGs (label of image i: i % num_classes)
  in folder `root`, or in `root`.zip; returns the data_dir."""
  files = {}
  for i in range(NUM_IMAGES):
    name = f'{i // 10:05d}/img{i:08d}.png'
    target = root / name
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_array(i, size)).save(target)
    files[name] = target.read_bytes()
  if labels_json is None:
    labels_json = json.dumps({'labels': [[name, i % num_classes]
                                         for i, name in enumerate(files)]})
  (root / 'dataset.json').write_text(labels_json)
  if not as_zip:
    return str(root)
  path = f'{root}.zip'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('dataset.json', labels_json)
    for name, data in files.items():
      archive.writestr(name, data)
  return path


@pytest.mark.parametrize('as_zip', [False, True], ids=['folder', 'zip'])
def test_batches_hold_the_stored_images_and_labels_and_resume(tmp_path, as_zip):
  data_dir = write_dataset(tmp_path / 'imagenet_64', as_zip=as_zip)
  source = PreparedImages(data_dir, image_size=8, batch_size=5, num_classes=3,
                          random_flip=False)
  source.check()
  batches = list(itertools.islice(source.batches(), 4))  # crosses an epoch (12 images)
  for step, batch in enumerate(batches):
    assert batch['image'].shape == (5, 8, 8, 3) and batch['image'].dtype == np.uint8
    index = stream.batch_indices(step, 5, NUM_IMAGES, 0)
    np.testing.assert_array_equal(batch['image'], np.stack([image_array(i, 8) for i in index]))
    np.testing.assert_array_equal(batch['label'], index % 3)
  resumed = next(source.batches(start_step=3))
  np.testing.assert_array_equal(resumed['image'], batches[3]['image'])
  evaluation = list(source.eval_batches(8))
  assert sum(len(b['label']) for b in evaluation) == NUM_IMAGES


@pytest.mark.parametrize('as_zip', [False, True], ids=['folder', 'zip'])
@pytest.mark.parametrize('labels_json,message', [
    ('{"labels": [["00000/img00000000.png", 0]', r'is not valid JSON'),
    ('{"labels": null}', r'"labels": null'),
    ('{"labels": {"00000/img00000000.png": 0}}', r'expected \{"labels": \[\[relative_path'),
    ('[["00000/img00000000.png", 0]]', r'expected \{"labels"'),
    ('{"labels": [["00000/img00000000.png", 0]]}', r'1 labels for 12 images'),
])
def test_malformed_dataset_json_names_the_file(tmp_path, as_zip, labels_json, message):
  data_dir = write_dataset(tmp_path / 'data', as_zip=as_zip, labels_json=labels_json)
  with pytest.raises(ValueError, match=rf'{data_dir}/dataset\.json.*' + message):
    PreparedImages(data_dir, image_size=8, num_classes=3).check()


def test_missing_dataset_or_labels_or_wrong_size(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'neither a directory nor a \.zip'):
    PreparedImages(str(tmp_path / 'absent')).check()
  data_dir = write_dataset(tmp_path / 'data')
  with pytest.raises(ValueError, match=r'img00000000\.png is 8x8, but data\.image_size=64'):
    PreparedImages(data_dir, image_size=64, num_classes=3).check()
  (tmp_path / 'data' / 'dataset.json').unlink()
  with pytest.raises(FileNotFoundError, match=r'data/dataset\.json not found.*dataset_tool'):
    PreparedImages(data_dir, image_size=8, num_classes=3).check()


@pytest.mark.parametrize('as_zip', [False, True], ids=['folder', 'zip'])
@pytest.mark.parametrize('damage', ['garbage', 'truncated'])
def test_an_unreadable_first_image_is_named(tmp_path, as_zip, damage):
  root = tmp_path / 'data'
  data_dir, first = write_dataset(root), root / '00000' / 'img00000000.png'
  data = first.read_bytes()
  first.write_bytes(b'not a png' if damage == 'garbage' else data[:len(data) // 2])
  if as_zip:
    data_dir = f'{root}.zip'
    with zipfile.ZipFile(data_dir, 'w') as archive:
      for file in sorted(root.rglob('*')):
        archive.write(file, file.relative_to(root).as_posix())
  with pytest.raises(errors.DataError, match=r'00000/img00000000\.png: the first image cannot '
                                             r'be read'):
    PreparedImages(data_dir, image_size=8, num_classes=3).check()


def test_64px_preset_is_pixel_space_and_other_sizes_fail_clearly():
  experiment = fdl.build(presets.load_preset('experiments/dit.py:b2(image_size=64)'))
  assert isinstance(experiment.data, PreparedImages) and experiment.data.image_size == 64
  assert isinstance(experiment.encoder, PixelEncoder)
  assert experiment.latent_shape == (64, 64, 3)
  for spec in ('experiments/dit.py:b2(image_size=128)',
               'experiments/lightning_dit.py:xl2(image_size=32)'):
    with pytest.raises(ConfigError, match=r'image_size=\d+: no SD-VAE latent statistics for '
                                          r'this resolution \(known: 256, 512\); pixel space '
                                          r'is used at 64'):
      presets.load_preset(spec)


def test_legacy_default_option_reads_a_prepared_png_dataset(tmp_path):
  """diffuse_nnx's default `imagenet_64-B_2`: latent_dataset=True with the RGB encoder."""
  legacy_config = dit_imagenet.get_config('imagenet_64-B_2')
  legacy_config.data.data_dir = write_dataset(tmp_path / 'imagenet_64', size=64, as_zip=True)
  experiment = fdl.build(converter.convert(legacy_config))
  assert isinstance(experiment.data, PreparedImages)
  experiment.data.check()
  batch = next(experiment.data.batches())
  assert batch['image'].shape == (256, 64, 64, 3)


def test_64px_preset_trains_on_a_prepared_zip(tmp_path):
  from experiments import fiddlers
  from lib import train

  config = presets.load_preset('experiments/dit.py:b2(image_size=64)')
  fiddlers.tiny(config)
  config.data.data_dir = write_dataset(tmp_path / 'imagenet_64', size=64, as_zip=True)
  config.data.batch_size = 4
  config.total_steps = 2
  config.evaluate = []
  config.visualize = None
  experiment = fdl.build(config)
  assert train.train(experiment, str(tmp_path / 'run')) == 2
  records = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  assert losses and all(np.isfinite(losses))
