"""ImageFolder: ADM center crop, tf.data batches that are deterministic, resumable and sharded,
deterministic flips, and folder errors; on tiny JPEG/PNG trees made on the fly."""

import itertools

import numpy as np
import pytest
from PIL import Image

from lib.data import images, stream
from lib.data.images import ImageFolder

# (class folder, number of images); one PNG and one greyscale image among them.
CLASSES = (('n002', 4), ('n001', 3), ('n003', 5))
NUM_EXAMPLES = sum(n for _, n in CLASSES)


def make_tree(root, classes=CLASSES, split='train') -> None:
  rng = np.random.default_rng(0)
  for c, (name, count) in enumerate(classes):
    folder = root / split / name
    folder.mkdir(parents=True)
    for i in range(count):
      w, h = [(40, 24), (24, 33), (64, 64), (17, 50), (30, 30)][i % 5]
      # smooth content (JPEG-friendly) that differs between images and is not symmetric
      y, x = np.mgrid[:h, :w]
      base = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 40 * c + 9 * i)], -1)
      array = np.clip(base + rng.integers(0, 8, base.shape), 0, 255).astype(np.uint8)
      image = Image.fromarray(array)
      if (c, i) == (1, 1):
        image.convert('L').save(folder / f'img{i}.jpg')
      elif (c, i) == (2, 0):
        image.save(folder / f'img{i}.png')
      else:
        image.save(folder / f'img{i}.JPEG', quality=95)
  (root / split / classes[0][0] / 'notes.txt').write_text('not an image')


@pytest.fixture
def tree(tmp_path):
  make_tree(tmp_path)
  return str(tmp_path)


def take(source, n, **kwargs):
  return list(itertools.islice(source.batches(**kwargs), n))


def test_center_crop_follows_adm():
  """40x20 at size 8: halve (BOX) to 20x10 (10 < 16 stops), BICUBIC to 16x8, crop x 4..12."""
  array = np.random.default_rng(1).integers(0, 256, (20, 40, 3), dtype=np.uint8)
  image = Image.fromarray(array)
  half = image.resize((20, 10), resample=Image.BOX)
  want = np.asarray(half.resize((16, 8), resample=Image.BICUBIC))[:, 4:12]
  np.testing.assert_array_equal(images.center_crop(image, 8), want)
  # no halving when the short side is below twice the size; rounding of the long side
  small = Image.fromarray(array[:15, :33])
  want = np.asarray(small.resize((round(33 * 8 / 15), 8), resample=Image.BICUBIC))
  left = (want.shape[1] - 8) // 2
  np.testing.assert_array_equal(images.center_crop(small, 8), want[:, left:left + 8])
  assert images.center_crop(image.convert('L'), 8).shape == (8, 8, 3)


def test_index_shapes_and_labels(tree):
  source = ImageFolder(tree, image_size=16, batch_size=4, num_classes=5)
  source.check()
  assert source.classes == ['n001', 'n002', 'n003']  # sorted names, not creation order
  assert source.num_examples == NUM_EXAMPLES
  np.testing.assert_array_equal(source.labels_of(range(NUM_EXAMPLES)),
                                [0] * 3 + [1] * 4 + [2] * 5)
  batch = next(source.batches())
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32
  index = stream.batch_indices(0, 4, NUM_EXAMPLES, 0)
  np.testing.assert_array_equal(batch['label'], source.labels_of(index))
  flips = images.flip_decisions(0, np.arange(4))
  np.testing.assert_array_equal(batch['image'], source.load(index, flips))


def test_deterministic_resumable_and_crosses_epochs(tree):
  source = ImageFolder(tree, image_size=8, batch_size=5, seed=3, num_classes=3)
  uninterrupted = take(source, 6)  # 30 positions: 2.5 epochs of 12
  again = take(ImageFolder(tree, image_size=8, batch_size=5, seed=3, num_classes=3), 6)
  for a, b in zip(uninterrupted, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  for a, b in zip(uninterrupted[4:], take(source, 2, start_step=4)):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other_seed = take(ImageFolder(tree, image_size=8, batch_size=5, seed=4, num_classes=3), 6)
  assert any(not np.array_equal(a['label'], b['label'])
             for a, b in zip(uninterrupted, other_seed))
  epoch = np.concatenate([b['label'] for b in uninterrupted])[:NUM_EXAMPLES]
  assert np.bincount(epoch, minlength=3).tolist() == [3, 4, 5]  # each example once an epoch


def test_sharding_across_two_processes(tree):
  source = ImageFolder(tree, image_size=8, batch_size=6, seed=1, num_classes=3)
  whole = take(source, 3)
  shards = [take(source, 3, start_step=1, process_index=p, process_count=2) for p in (0, 1)]
  for step in range(2):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([shards[0][step][key], shards[1][step][key]]), whole[step + 1][key])
  assert shards[0][0]['image'].shape == (3, 8, 8, 3)
  with pytest.raises(ValueError, match='not divisible'):
    next(source.batches(process_count=4))


def test_flips_are_a_function_of_seed_and_position(tree):
  flipped = ImageFolder(tree, image_size=8, batch_size=12, seed=5, num_classes=3)
  plain = ImageFolder(tree, image_size=8, batch_size=12, seed=5, num_classes=3,
                      random_flip=False)
  a, b = take(flipped, 2), take(plain, 2)
  decisions = images.flip_decisions(5, np.arange(24))
  for step in range(2):
    for j in range(12):
      want = b[step]['image'][j][:, ::-1] if decisions[12 * step + j] else b[step]['image'][j]
      np.testing.assert_array_equal(a[step]['image'][j], want)
  assert 0 < decisions.sum() < 24
  many = images.flip_decisions(5, np.arange(100_000))
  assert abs(many.mean() - 0.5) < 0.01
  assert abs((many == images.flip_decisions(6, np.arange(100_000))).mean() - 0.5) < 0.01
  np.testing.assert_array_equal(images.flip_decisions(5, np.arange(10, 20)), many[10:20])


def test_eval_batches_are_bounded_spread_and_fixed(tree):
  source = ImageFolder(tree, image_size=8, batch_size=4, num_classes=3, num_eval=6)
  batches = list(source.eval_batches(4))
  assert [len(b['label']) for b in batches] == [4, 2]
  labels = np.concatenate([b['label'] for b in batches])
  assert set(labels.tolist()) == {0, 1, 2}
  again = list(source.eval_batches(4))
  np.testing.assert_array_equal(batches[0]['image'], again[0]['image'])
  np.testing.assert_array_equal(batches[0]['image'], source.load(source.eval_indices()[:4]))


def test_errors_name_the_path_and_the_expectation(tmp_path):
  missing = tmp_path / 'nowhere'
  with pytest.raises(FileNotFoundError, match='nowhere.*not a directory.*ImageNet-style'):
    ImageFolder(str(missing)).check()
  with pytest.raises(FileNotFoundError, match=r'train.*data.split'):
    ImageFolder(str(tmp_path)).check()
  (tmp_path / 'train').mkdir()
  with pytest.raises(ValueError, match=r'no class folders in .*train'):
    ImageFolder(str(tmp_path)).check()
  (tmp_path / 'train' / 'n0').mkdir()
  (tmp_path / 'train' / 'n0' / 'readme.txt').write_text('x')
  with pytest.raises(ValueError, match=r'n0.*holds no images'):
    ImageFolder(str(tmp_path)).check()
  make_tree(tmp_path, split='val')
  with pytest.raises(ValueError, match='3 class folders, more than data.num_classes=2'):
    ImageFolder(str(tmp_path), split='val', num_classes=2).check()
  (tmp_path / 'val' / 'n001' / 'img0.JPEG').write_bytes(b'garbage')
  with pytest.raises(ValueError, match=r'cannot decode .*img0.JPEG'):
    ImageFolder(str(tmp_path), split='val', num_classes=3).check()


def test_trains_a_pixel_model_through_the_trainer(tree, tmp_path):
  """The data contract end to end: tf.data uint8 batches into two jitted train steps."""
  import json

  import fiddle as fdl

  from lib import train
  from lib.config import overrides, presets

  config = presets.load_preset('experiments/dit.py:digits')
  config.data = fdl.Config(ImageFolder, data_dir=tree, image_size=8, batch_size=4, num_classes=3)
  for assignment in ('network.hidden_size=32', 'network.depth=1', 'network.num_heads=2',
                     'total_steps=2', 'log_every_steps=1', 'visualize=None',
                     'report.every_steps=1000'):
    overrides.apply_override(config, assignment)
  config.evaluate = []
  experiment = fdl.build(config)
  assert experiment.latent_shape == (8, 8, 3)
  assert train.train(experiment, str(tmp_path / 'run')) == 2
  losses = [json.loads(line)['train/loss'] for line in open(tmp_path / 'run' / 'metrics.jsonl')
            if 'train/loss' in line]
  assert len(losses) == 2 and all(np.isfinite(losses))
