"""Raw images from an ImageNet-style folder tree, center-cropped as ADM does.

    data_dir/
      train/                    (`split`)
        n01440764/              one folder per class; class id = rank of the sorted names
          n01440764_10026.JPEG  .JPEG / .jpg / .jpeg / .png (any case), sorted by name
        ...

Examples are numbered by (sorted class folder, sorted file name); the global batch of
step k holds the examples `lib.data.stream.batch_indices` chooses for k, so the order is
deterministic, sharded per JAX process and resumable at any step, exactly like the
in-memory sources.

Preprocessing (`center_crop`) reproduces ADM's `center_crop_arr` (also used by DiT, SiT,
REPA and diffuse_nnx): halve the image with a BOX filter while its short side is at
least twice `image_size`, resize it with BICUBIC so that the short side is `image_size`
(the long side rounded), and cut the central `image_size` square. It runs in PIL, not in
TensorFlow ops: TF's bicubic kernel and JPEG decoder differ from PIL's in the last bits,
and PIL is what the published pipelines (and their FID reference statistics) used. tf.data
calls it through `tf.numpy_function` from parallel map threads; PIL releases the GIL while
decoding and resampling, so the threads do run in parallel. Folders are listed and files
read through `lib.paths` (etils epath), so `data_dir` may be a local folder or a gs:// URL.

Random horizontal flips (`random_flip`, on by default) are a
function of (seed, position of the example in the global stream), not of a stateful RNG,
so a resumed run flips exactly the images the uninterrupted run would have flipped.

TensorFlow is imported inside the methods that iterate, never when the module is imported
or a config is built.
"""

import functools
import io
from typing import Iterator, Sequence

import numpy as np
from absl import logging

from lib import paths
from lib.data import stream

EXTENSIONS = ('.jpeg', '.jpg', '.png')


def center_crop(image, image_size: int) -> np.ndarray:
  """ADM's `center_crop_arr`: a PIL image -> (image_size, image_size, 3) uint8 RGB."""
  from PIL import Image

  image = image.convert('RGB')
  while min(image.size) >= 2 * image_size:
    image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
  scale = image_size / min(image.size)
  image = image.resize(tuple(round(side * scale) for side in image.size),
                       resample=Image.BICUBIC)
  array = np.asarray(image)
  top = (array.shape[0] - image_size) // 2
  left = (array.shape[1] - image_size) // 2
  return array[top:top + image_size, left:left + image_size]


def decode_and_crop(data: bytes, image_size: int, flip: bool = False) -> np.ndarray:
  """Encoded image bytes -> center-cropped (image_size, image_size, 3) uint8, mirrored
  left-right when `flip`."""
  from PIL import Image

  with Image.open(io.BytesIO(data)) as image:
    array = center_crop(image, image_size)
  return np.ascontiguousarray(array[:, ::-1] if flip else array)


def _mix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser: a bijective scramble of uint64 values."""
  x = x.astype(np.uint64)
  with np.errstate(over='ignore'):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def flip_decisions(seed: int, positions: np.ndarray) -> np.ndarray:
  """(N,) bool: whether the examples at these positions of the global stream are flipped;
  a fixed function of (seed, position), independent across positions and seeds."""
  key = _mix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], np.uint64) ^ np.uint64(0x9E3779B97F4A7C15))
  with np.errstate(over='ignore'):
    return (_mix64(np.asarray(positions, np.uint64) + key) >> np.uint64(63)).astype(bool)


class ImageFolder:
  """Class-conditional raw images (`kind = 'pixels'`), uint8 RGB, ADM center crop.

  Args:
    data_dir: root of the tree; images are under `data_dir/<split>/<class>/`.
    image_size: side of the square crops.
    batch_size: global batch size (all processes together).
    seed: seed of the example order and of the flips.
    num_classes: number of classes; there may be fewer class folders (a subset keeps the
      ids of its sorted folders), not more.
    split: subfolder holding the class folders.
    random_flip: mirror each training example left-right with probability 1/2.
    num_eval: `eval_batches` yields this many training images, evenly spaced over the
      sorted list (so every class is represented), never flipped.
    num_parallel_reads: decoding threads of the tf.data pipeline (-1: autotune).
  """
  kind = 'pixels'
  channels = 3

  def __init__(self, data_dir: str, image_size: int = 256, batch_size: int = 256,
               seed: int = 0, num_classes: int = 1000, split: str = 'train',
               random_flip: bool = True, num_eval: int = 1024, num_parallel_reads: int = -1):
    self.data_dir = data_dir
    self.image_size = image_size
    self.batch_size = batch_size
    self.seed = seed
    self.num_classes = num_classes
    self.split = split
    self.random_flip = random_flip
    self.num_eval = num_eval
    self.num_parallel_reads = num_parallel_reads

  # --------------------------------------------------------------------------- index
  @property
  def root(self) -> paths.Path:
    folder = paths.resolve(self.data_dir, 'data.data_dir')
    return folder / self.split if self.split else folder

  @functools.cached_property
  def _index(self) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths of all images, (N,) int32 labels, sorted class names); raises on a bad tree."""
    root = self.root
    expected = (f'expected an ImageNet-style tree {self.data_dir.rstrip("/")}/{self.split}'
                '/<class>/*.JPEG (also .jpg, .png)')
    if not paths.resolve(self.data_dir, 'data.data_dir').is_dir():
      raise FileNotFoundError(f'data.data_dir={self.data_dir!r} is not a directory; {expected}')
    if not root.is_dir():
      raise FileNotFoundError(f'{str(root)!r} (data.data_dir / data.split={self.split!r}) is '
                              f'not a directory; {expected}')
    classes = sorted(next(root.walk())[1])  # one listing per folder, local or in a bucket
    if not classes:
      raise ValueError(f'no class folders in {str(root)!r}; {expected}')
    if len(classes) > self.num_classes:
      raise ValueError(f'{str(root)!r} has {len(classes)} class folders, more than '
                       f'data.num_classes={self.num_classes}')
    if len(classes) < self.num_classes:
      logging.warning('%s has %d class folders for data.num_classes=%d; ids follow the sorted '
                      'folder names', root, len(classes), self.num_classes)
    images, labels = [], []
    for label, name in enumerate(classes):
      folder = root / name
      files = sorted(file for file in next(folder.walk())[2]
                     if file.lower().endswith(EXTENSIONS))
      if not files:
        raise ValueError(f'class folder {str(folder)!r} holds no images; {expected}')
      images.extend(str(folder / file) for file in files)
      labels.extend([label] * len(files))
    return images, np.asarray(labels, np.int32), classes

  @property
  def num_examples(self) -> int:
    return len(self._index[0])

  @property
  def classes(self) -> list[str]:
    """Sorted class folder names; the label of `classes[i]` is i."""
    return self._index[2]

  def check(self) -> None:
    """Raises FileNotFoundError / ValueError naming the path and what was expected, and
    decodes the first image."""
    if self.image_size < 1:
      raise ValueError(f'data.image_size={self.image_size} must be positive')
    self.load([0])  # lists and checks the tree, then decodes one image

  # --------------------------------------------------------------------------- loading
  def _read(self, path: str) -> bytes:
    """The encoded bytes of the image `path` (an entry of `_index`)."""
    return paths.Path(path).read_bytes()

  def load(self, indices: Sequence[int], flips: Sequence[bool] | None = None,
           num_threads: int = 8) -> np.ndarray:
    """Examples `indices` as (n, S, S, 3) uint8 without TensorFlow (a thread pool of PIL
    decoders): for tools and tests; training reads through `batches`."""
    from concurrent import futures

    files, _, _ = self._index
    flips = [False] * len(indices) if flips is None else list(flips)

    def one(i, flip):
      try:
        return decode_and_crop(self._read(files[i]), self.image_size, bool(flip))
      except Exception as error:
        raise ValueError(f'cannot decode {files[i]}: {error}') from error

    if len(indices) <= 1:
      return np.stack([one(i, f) for i, f in zip(indices, flips)]) if len(indices) else \
          np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
    with futures.ThreadPoolExecutor(min(num_threads, len(indices))) as pool:
      return np.stack(list(pool.map(one, indices, flips)))

  def labels_of(self, indices: Sequence[int]) -> np.ndarray:
    return self._index[1][np.asarray(indices, np.int64)]

  def _dataset(self, examples: Iterator[tuple[np.ndarray, np.ndarray]], batch_size: int,
               drop_remainder: bool):
    """tf.data over (indices, flips) chunks yielded by `examples`, batched to `batch_size`."""
    from lib import tf_devices
    tf_devices.hide_accelerators()
    import tensorflow as tf

    files, labels, _ = self._index
    files = np.asarray(files)
    image_size = self.image_size

    def chunks():
      for index, flip in examples:
        yield files[index], labels[index], np.asarray(flip, bool)

    def decode(path, flip):
      path = path.decode()
      try:
        return decode_and_crop(self._read(path), image_size, bool(flip))
      except Exception as error:  # tf.data reports it without the file otherwise
        raise ValueError(f'cannot decode {path}: {error}') from None

    def load(path, label, flip):
      image = tf.numpy_function(decode, [path, flip], tf.uint8, stateful=False)
      image.set_shape((image_size, image_size, 3))
      return {'image': image, 'label': label}

    dataset = tf.data.Dataset.from_generator(chunks, output_signature=(
        tf.TensorSpec((None,), tf.string), tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((None,), tf.bool)))
    dataset = dataset.unbatch().map(
        load, num_parallel_calls=tf.data.AUTOTUNE if self.num_parallel_reads < 0
        else self.num_parallel_reads, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(2).as_numpy_iterator()

  # --------------------------------------------------------------------------- contract
  def batches(self, start_step: int = 0, process_index: int = 0,
              process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the global batches from `start_step` on, forever."""
    num_examples = self.num_examples
    local = self.batch_size // process_count
    if self.batch_size % process_count:
      raise ValueError(f'data.batch_size={self.batch_size} is not divisible by the number of '
                       f'processes ({process_count})')

    def examples():
      step = start_step
      while True:
        index = stream.batch_indices(step, self.batch_size, num_examples, self.seed,
                                     process_index, process_count)
        first = step * self.batch_size + process_index * local
        positions = np.arange(first, first + local)
        flips = flip_decisions(self.seed, positions) if self.random_flip else \
            np.zeros(local, bool)
        yield index, flips
        step += 1

    return self._dataset(examples(), local, drop_remainder=True)

  def eval_indices(self) -> np.ndarray:
    """The `num_eval` examples of `eval_batches`: evenly spaced over the sorted list."""
    count = min(self.num_eval, self.num_examples)
    return np.unique(np.linspace(0, self.num_examples - 1, count).round().astype(np.int64))

  def ordered_batches(self, indices: np.ndarray, batch_size: int
                      ) -> Iterator[dict[str, np.ndarray]]:
    """Examples `indices` in this order, not flipped (the last batch may be smaller)."""
    indices = np.asarray(indices, np.int64)
    chunks = ((indices[s:s + batch_size], np.zeros(len(indices[s:s + batch_size]), bool))
              for s in range(0, len(indices), batch_size))
    return self._dataset(chunks, batch_size, drop_remainder=False)

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """`num_eval` training images evenly spaced over the classes, fixed order, no flips
    (the last batch may be smaller)."""
    return self.ordered_batches(self.eval_indices(), batch_size)
