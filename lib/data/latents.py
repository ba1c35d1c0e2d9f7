"""Pre-extracted VAE latents on disk, in the EDM2 / diffuse_nnx layout.

    data_dir/
      dataset.json          {"labels": [["00000/img00000000.npy", 207], ...]}
      00000/img00000000.npy float32 (C, h, w), h = w = image_size / 8; for the SD-VAE
      ...                   C = 8: the posterior [mean(4), std(4)], unscaled

`python -m lib.data.extract_latents` writes this layout from an image folder (file i =
example i in sorted class / file order; with `--flip` the mirrored image of example i is
one more example, N + i, so flipped copies are simply extra training examples).

Files are every `.npy` under `data_dir` (recursively), ordered by relative path ('/'
separated, as in dataset.json). Batches are NHWC float32 (local_B, h, w, C) that the
encoder turns into latents (`StabilityVAE.encode` samples mean + eps * std). The order
is `lib.data.stream`'s, so it is deterministic and resumable.
"""

import functools
import io
import json
from typing import Iterator

import numpy as np

from lib import paths
from lib.data import stream


LABELS_FORMAT = ('{"labels": [[relative_path, int_label], ...]}, as EDM2\'s dataset_tool.py '
                 'writes')


def dataset_labels(label_file: str, text: bytes, files: list[str], num_classes: int,
                   what: str) -> np.ndarray:
  """(N,) int32 labels of `files` (relative '/'-separated paths, in order) from the contents
  of an EDM2 `dataset.json`; every file needs exactly one label in [0, num_classes). Errors
  name `label_file` and what it should hold; `what` names the files (`.npy files under D`)."""
  try:
    entries = json.loads(text)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{label_file} is not valid JSON ({e}); expected {LABELS_FORMAT}') from None
  entries = entries.get('labels', ()) if isinstance(entries, dict) else ()
  if entries is None:
    raise ValueError(f'{label_file} has "labels": null (an unconditional dataset); class-'
                     f'conditional training needs {LABELS_FORMAT}')
  if not isinstance(entries, list) or not all(
      isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
      and isinstance(entry[1], int) for entry in entries):
    raise ValueError(f'{label_file}: expected {LABELS_FORMAT}')
  labels = dict(entries)
  if len(labels) != len(files) or set(labels) != set(files):
    unlabelled = sorted(set(files) - set(labels))[:3]
    missing = sorted(set(labels) - set(files))[:3]
    raise ValueError(f'{label_file} has {len(labels)} labels for {len(files)} {what} '
                     f'(unlabelled files e.g. {unlabelled}, labels without a file e.g. '
                     f'{missing})')
  values = np.array([labels[name] for name in files], np.int64)
  if values.min() < 0 or values.max() >= num_classes:
    raise ValueError(f'{label_file}: labels span [{values.min()}, {values.max()}], outside '
                     f'[0, data.num_classes={num_classes})')
  return values.astype(np.int32)


class LatentFolder:
  """Class-conditional pre-extracted latents (`kind = 'posterior'`).

  Args:
    data_dir: folder of `.npy` files with a `dataset.json` of labels.
    image_size: side of the images the latents were extracted from.
    batch_size: global batch size (all processes together).
    seed: seed of the example order.
    num_classes: number of classes; labels must lie in [0, num_classes).
    num_eval: `eval_batches` yields the first `num_eval` files in order (training files:
      there is no held-out split).
  """
  kind = 'posterior'
  channels = 3  # of the images; the encoder decides the latent channels
  downsample_factor = 8  # image_size / latent side

  def __init__(self, data_dir: str, image_size: int = 256, batch_size: int = 256, seed: int = 0,
               num_classes: int = 1000, num_eval: int = 1024):
    self.data_dir = data_dir
    self.image_size = image_size
    self.batch_size = batch_size
    self.seed = seed
    self.num_classes = num_classes
    self.num_eval = num_eval

  @functools.cached_property
  def _index(self) -> tuple[list[str], np.ndarray]:
    """(sorted relative paths of the .npy files, (N,) int32 labels); raises on a bad folder."""
    folder = self._folder
    if not folder.is_dir():
      raise FileNotFoundError(f'data.data_dir={self.data_dir!r} is not a directory; expected a '
                              'folder of .npy latents with a dataset.json')
    label_file = folder / 'dataset.json'
    if not label_file.is_file():
      raise FileNotFoundError(f'{label_file} not found; expected {{"labels": [[relative_path, '
                              'label], ...]}} beside the .npy files')
    files = sorted(name for name in paths.files_under(folder) if name.endswith('.npy'))
    if not files:
      raise ValueError(f'no .npy files under data.data_dir={self.data_dir!r}')
    labels = dataset_labels(str(label_file), label_file.read_bytes(), files, self.num_classes,
                            f'.npy files under {self.data_dir}')
    return files, labels

  @functools.cached_property
  def _folder(self) -> paths.Path:
    return paths.resolve(self.data_dir, 'data.data_dir')

  def _load(self, name: str) -> np.ndarray:
    """One file as float32 (h, w, C), its shape checked."""
    path = self._folder / name
    try:
      array = np.load(io.BytesIO(path.read_bytes()))
    except (OSError, ValueError) as e:
      raise ValueError(f'cannot read {path}: {e}') from None
    side = self.image_size // self.downsample_factor
    if array.ndim != 3 or array.shape[1:] != (side, side):
      raise ValueError(f'{path} has shape {array.shape}; expected (C, {side}, {side}) latents '
                       f'for data.image_size={self.image_size} (/ {self.downsample_factor})')
    return np.asarray(array, np.float32).transpose(1, 2, 0)

  def _batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
    files, labels = self._index
    return {'image': np.stack([self._load(files[i]) for i in index]), 'label': labels[index]}

  def check(self) -> None:
    """Raises FileNotFoundError / ValueError naming the path and what was expected."""
    if self.image_size % self.downsample_factor:
      raise ValueError(f'data.image_size={self.image_size} is not divisible by the latents\' '
                       f'downsampling factor {self.downsample_factor}')
    files, _ = self._index
    self._load(files[0])

  def batches(self, start_step: int = 0, process_index: int = 0,
              process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the global batches from `start_step` on, forever."""
    num_files = len(self._index[0])
    step = start_step
    while True:
      yield self._batch(stream.batch_indices(step, self.batch_size, num_files, self.seed,
                                             process_index, process_count))
      step += 1

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The first `num_eval` files in order (the last batch may be smaller)."""
    count = min(self.num_eval, len(self._index[0]))
    for start in range(0, count, batch_size):
      yield self._batch(np.arange(start, min(start + batch_size, count)))
