"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 greyscale images, 10 classes.

The data ship inside the scikit-learn wheel, so this source needs no download. Pixel
values 0..16 become uint8 0..255; `image_size` > 8 resizes bilinearly. The last
`num_holdout` images (a fixed split) are held out for evaluation.
"""

import functools
from typing import Iterator

import numpy as np

from lib.data import stream


@functools.lru_cache(maxsize=4)
def load_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """All digits as ((N, S, S, 1) uint8, (N,) int32)."""
  from PIL import Image
  from sklearn import datasets

  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  if image_size != 8:
    images = np.stack([
        np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR))
        for image in images])
  return images[..., None], digits.target.astype(np.int32)


class Digits:
  """Class-conditional digits in pixel space.

  Args:
    batch_size: global batch size (all processes together).
    image_size: side of the square images (>= 8).
    seed: seed of the example order.
    num_holdout: images at the end of the set kept out of training.
  """
  kind = 'pixels'
  channels = 1
  num_classes = 10

  def __init__(self, batch_size: int = 128, image_size: int = 8, seed: int = 0,
               num_holdout: int = 197):
    if image_size < 8:
      raise ValueError(f'data.image_size={image_size}; the digits are 8x8, use 8 or more')
    self.batch_size = batch_size
    self.image_size = image_size
    self.seed = seed
    self.num_holdout = num_holdout

  def check(self) -> None:
    """The bundled data are always present; nothing to check."""

  def _split(self, train: bool):
    images, labels = load_digits(self.image_size)
    cut = len(images) - self.num_holdout
    return (images[:cut], labels[:cut]) if train else (images[cut:], labels[cut:])

  def batches(self, start_step: int = 0, process_index: int = 0,
              process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the global batches from `start_step` on, forever."""
    images, labels = self._split(train=True)
    step = start_step
    while True:
      index = stream.batch_indices(step, self.batch_size, len(images), self.seed,
                                   process_index, process_count)
      yield {'image': images[index], 'label': labels[index]}
      step += 1

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The held-out images in fixed order (the last batch may be smaller)."""
    images, labels = self._split(train=False)
    for start in range(0, len(images), batch_size):
      yield {'image': images[start:start + batch_size], 'label': labels[start:start + batch_size]}
