"""Images prepared by EDM2's `dataset_tool.py`: a folder or a `.zip` of uint8 images already
at the training resolution, with their labels in `dataset.json` (ImageNet 64 in pixel space).

    data_dir/  or  data_dir.zip
      dataset.json          {"labels": [["00000/img00000000.png", 207], ...]}
      00000/img00000000.png uint8 RGB (or greyscale), image_size x image_size
      ...

Examples are the image files (.png / .jpg / .jpeg, any case; other files are ignored) in
sorted relative-path order, each needing one label. Batches go through `ImageFolder`'s tf.data
pipeline, so the order, the per-process sharding, resumption at any step and the flips are the
same; the images are already square at `image_size`, so the ADM center crop leaves them
unchanged. A `.zip` is read member by member (one handle per reading thread), never unpacked.
`data_dir` may be a local path or a gs:// URL (read through `lib.paths`).
"""

import functools
import io
import threading
import zipfile

import numpy as np

from lib import errors, paths
from lib.data import latents
from lib.data.images import EXTENSIONS, ImageFolder


class PreparedImages(ImageFolder):
  """Class-conditional uint8 images in the EDM2 dataset layout (`kind = 'pixels'`).

  Args:
    data_dir: the dataset folder, or its `.zip` archive.
    image_size: side of the stored images (checked on the first image).
    batch_size: global batch size (all processes together).
    seed: seed of the example order and of the flips.
    num_classes: number of classes; labels must lie in [0, num_classes).
    random_flip: mirror each training example left-right with probability 1/2.
    num_eval: `eval_batches` yields this many images, evenly spaced over the sorted list.
    num_parallel_reads: decoding threads of the tf.data pipeline (-1: autotune).
  """

  def __init__(self, data_dir: str, image_size: int = 64, batch_size: int = 256, seed: int = 0,
               num_classes: int = 1000, random_flip: bool = True, num_eval: int = 1024,
               num_parallel_reads: int = -1):
    super().__init__(data_dir, image_size=image_size, batch_size=batch_size, seed=seed,
                     num_classes=num_classes, split='', random_flip=random_flip,
                     num_eval=num_eval, num_parallel_reads=num_parallel_reads)
    self._archives = threading.local()

  @functools.cached_property
  def _source(self) -> paths.Path:
    return paths.resolve(self.data_dir, 'data.data_dir')

  @functools.cached_property
  def is_zip(self) -> bool:
    if not self._source.is_file():
      return False
    with self._source.open('rb') as f:
      return zipfile.is_zipfile(f)

  def _archive(self) -> zipfile.ZipFile:
    """This thread's handle on the archive (ZipFile handles are not shared across threads)."""
    archive = getattr(self._archives, 'handle', None)
    if archive is None:
      archive = self._archives.handle = zipfile.ZipFile(self._source.open('rb'))
    return archive

  @functools.cached_property
  def _index(self) -> tuple[list[str], np.ndarray, None]:
    """(image paths, or member names of the archive; (N,) int32 labels; no class names)."""
    expected = ('expected a folder or .zip written by EDM2\'s dataset_tool.py: images with a '
                'dataset.json of labels')
    if self.is_zip:
      names = self._archive().namelist()
      label_file = f'{self.data_dir}/dataset.json'
      read_labels = lambda: self._archive().read('dataset.json')
    elif self._source.is_dir():
      names = list(paths.files_under(self._source))
      label_file = self._source / 'dataset.json'
      read_labels = label_file.read_bytes
    else:
      raise FileNotFoundError(f'data.data_dir={self.data_dir!r} is neither a directory nor a '
                              f'.zip archive; {expected}')
    if 'dataset.json' not in names:
      raise FileNotFoundError(f'{label_file} not found; {expected}')
    files = sorted(name for name in names if name.lower().endswith(EXTENSIONS))
    if not files:
      raise ValueError(f'no images (.png, .jpg) in data.data_dir={self.data_dir!r}; {expected}')
    labels = latents.dataset_labels(str(label_file), read_labels(), files, self.num_classes,
                                    f'images in {self.data_dir}')
    images = files if self.is_zip else [str(self._source / name) for name in files]
    return images, labels, None

  def _read(self, path: str) -> bytes:
    if self.is_zip:
      return self._archive().read(path)
    return super()._read(path)

  def check(self) -> None:
    """Raises FileNotFoundError / ValueError naming the dataset (or its dataset.json) and what
    was expected, or DataError naming the first image if it cannot be read; the first image
    must be image_size x image_size."""
    from PIL import Image

    images, _, _ = self._index
    first = f'{self.data_dir}: {images[0]}' if self.is_zip else images[0]
    try:
      with Image.open(io.BytesIO(self._read(images[0]))) as image:
        image.load()
        size = image.size
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
      raise errors.DataError(f'{first}: the first image cannot be read ({error}); re-create the '
                             'dataset with EDM2\'s dataset_tool.py or replace the file') from None
    if size != (self.image_size, self.image_size):
      raise ValueError(f'{first} is {size[0]}x{size[1]}, but data.image_size='
                       f'{self.image_size}; a prepared dataset holds images at the training '
                       f'resolution (set data.image_size={size[0]} or prepare the data at '
                       f'{self.image_size})')
    super().check()
