"""LatentFolder: shapes, deterministic and resumable order, sharding, and folder errors."""

import itertools
import json
import os

import numpy as np
import pytest

from lib.data import stream
from lib.data.latents import LatentFolder

NUM_FILES = 20


def _write_folder(root, num_files: int = NUM_FILES, shape=(8, 4, 4)) -> dict[str, np.ndarray]:
  """Writes files in two subfolders; returns {relative path: array}. File i holds the value
  i everywhere in channel 0, so batches can be traced back to files."""
  arrays = {}
  for i in range(num_files):
    name = f'{i % 2:05d}/img{i:08d}.npy'
    array = np.random.default_rng(i).normal(size=shape).astype(np.float32)
    array[0] = i
    os.makedirs(root / os.path.dirname(name), exist_ok=True)
    np.save(root / name, array)
    arrays[name] = array
  labels = [[name, i % 10] for i, name in enumerate(arrays)]
  (root / 'dataset.json').write_text(json.dumps({'labels': labels}))
  return arrays


def _take(source, n, **kwargs):
  return list(itertools.islice(source.batches(**kwargs), n))


def test_shapes_values_and_labels(tmp_path):
  arrays = _write_folder(tmp_path)
  source = LatentFolder(str(tmp_path), image_size=32, batch_size=8, num_classes=10)
  source.check()
  batch = next(source.batches())
  assert batch['image'].shape == (8, 4, 4, 8) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  files = sorted(arrays)
  index = stream.batch_indices(0, 8, NUM_FILES, 0)
  for image, label, i in zip(batch['image'], batch['label'], index):
    np.testing.assert_array_equal(image, arrays[files[i]].transpose(1, 2, 0))
    assert label == int(files[i][-12:-4]) % 10


def test_deterministic_and_resumable(tmp_path):
  _write_folder(tmp_path)
  source = LatentFolder(str(tmp_path), image_size=32, batch_size=8, seed=3, num_classes=10)
  uninterrupted = _take(source, 6)
  again = _take(LatentFolder(str(tmp_path), image_size=32, batch_size=8, seed=3, num_classes=10), 6)
  for a, b in zip(uninterrupted, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  resumed = _take(source, 2, start_step=4)
  for a, b in zip(uninterrupted[4:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # the first 40 examples (2 epochs) hold every file twice
  seen = np.concatenate([b['image'][:, 0, 0, 0] for b in uninterrupted[:5]]).astype(int)
  assert sorted(seen) == sorted(list(range(NUM_FILES)) * 2)
  other_seed = _take(LatentFolder(str(tmp_path), image_size=32, batch_size=8, seed=4,
                                  num_classes=10), 1)[0]
  assert not np.array_equal(other_seed['image'], uninterrupted[0]['image'])


def test_sharding_across_processes(tmp_path):
  _write_folder(tmp_path)
  source = LatentFolder(str(tmp_path), image_size=32, batch_size=8, num_classes=10)
  global_batches = _take(source, 3, start_step=2)
  shards = [_take(source, 3, start_step=2, process_index=p, process_count=2) for p in range(2)]
  for step, whole in enumerate(global_batches):
    assert shards[0][step]['image'].shape == (4, 4, 4, 8)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([shards[0][step][key], shards[1][step][key]]), whole[key])


def test_eval_batches_in_order(tmp_path):
  arrays = _write_folder(tmp_path)
  source = LatentFolder(str(tmp_path), image_size=32, num_classes=10, num_eval=7)
  batches = list(source.eval_batches(3))
  assert [len(b['label']) for b in batches] == [3, 3, 1]
  images = np.concatenate([b['image'] for b in batches])
  np.testing.assert_array_equal(
      images, np.stack([arrays[name].transpose(1, 2, 0) for name in sorted(arrays)[:7]]))


def test_constructor_opens_nothing(tmp_path):
  LatentFolder(str(tmp_path / 'absent'))  # no error until used


def test_missing_directory(tmp_path):
  source = LatentFolder(str(tmp_path / 'absent'))
  with pytest.raises(FileNotFoundError, match=r'absent.*not a directory'):
    source.check()


def test_missing_dataset_json(tmp_path):
  _write_folder(tmp_path)
  os.remove(tmp_path / 'dataset.json')
  with pytest.raises(FileNotFoundError, match=r'dataset\.json not found'):
    LatentFolder(str(tmp_path), image_size=32).check()


def test_no_npy_files(tmp_path):
  (tmp_path / 'dataset.json').write_text(json.dumps({'labels': []}))
  with pytest.raises(ValueError, match=r'no \.npy files under'):
    LatentFolder(str(tmp_path), image_size=32).check()


def test_label_count_mismatch(tmp_path):
  _write_folder(tmp_path)
  np.save(tmp_path / 'extra.npy', np.zeros((8, 4, 4), np.float32))
  with pytest.raises(ValueError, match=r'20 labels for 21 \.npy files.*extra\.npy'):
    LatentFolder(str(tmp_path), image_size=32, num_classes=10).check()


def test_wrong_shape_for_image_size(tmp_path):
  _write_folder(tmp_path)
  with pytest.raises(ValueError, match=r'img00000000\.npy has shape \(8, 4, 4\); expected '
                                       r'\(C, 32, 32\).*data.image_size=256'):
    LatentFolder(str(tmp_path), image_size=256, num_classes=10).check()


def test_label_out_of_range(tmp_path):
  _write_folder(tmp_path)
  with pytest.raises(ValueError, match=r'outside \[0, data.num_classes=5\)'):
    LatentFolder(str(tmp_path), image_size=32, num_classes=5).check()


def test_malformed_dataset_json(tmp_path):
  _write_folder(tmp_path)
  (tmp_path / 'dataset.json').write_text(json.dumps({'labels': {'a.npy': 1}}))
  with pytest.raises(ValueError, match=r'dataset\.json: expected'):
    LatentFolder(str(tmp_path), image_size=32, num_classes=10).check()
