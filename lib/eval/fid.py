"""Frechet Inception Distance and Inception Score from streamed Inception outputs.

    stats = FeatureStats(); stats.add(pool)           # float64 running sums, in order
    fid = frechet_distance(*stats.moments(), *load_reference('VIRTUAL_imagenet256_labeled.npz'))
    score = InceptionScore(); score.add(logits); score.value()

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (real part of scipy's sqrtm; when the
product is singular enough to give non-finite values, eps is added to both diagonals, as
pytorch-fid does). Covariances use the N - 1 denominator (np.cov). The Inception Score is
ADM's: exp(mean KL(p(y|x) || p(y))) over consecutive splits of 5,000 samples (the last one may
be shorter), averaged, from the softmax of the 1008 logits without the classifier bias
(`lib.eval.inception`).

Reference statistics: ADM's reference batches (`VIRTUAL_imagenet256_labeled.npz`: `mu`,
`sigma`), files written by this module's command (same keys), or EDM2-style pickles
(`{'fid': {'mu', 'sigma'}}`, read with an unpickler that only builds numpy arrays).

    # reference statistics of an image folder (ADM center crop, no flips)
    python -m lib.eval.fid --stats_from=/data/imagenet --out=imagenet256_stats.npz \
        --inception_weights=pt_inception-2015-12-05-6726825d.pth [--image_size=256] \
        [--num_images=N] [--split=train]
    # FID / IS of a sample file (`--mode=sample`'s samples.npz) against reference statistics
    python -m lib.eval.fid --samples=runs/x/samples.npz --reference=imagenet256_stats.npz \
        --inception_weights=pt_inception-2015-12-05-6726825d.pth
"""

import io
import pickle
import warnings

import numpy as np
from absl import app, flags, logging

from lib import paths

IS_SPLIT_SIZE = 5000


class FeatureStats:
  """Mean and covariance of features streamed in batches, from float64 running sums."""

  def __init__(self, dim: int | None = None):
    self.count = 0
    self.total = None if dim is None else np.zeros(dim)
    self.outer = None if dim is None else np.zeros((dim, dim))

  def add(self, features: np.ndarray) -> None:
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f'features must be (N, D), got {x.shape}')
    if self.total is None:
      self.total, self.outer = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
    self.count += len(x)
    self.total += x.sum(axis=0)
    self.outer += x.T @ x

  def moments(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of everything added (sigma with the N - 1 denominator)."""
    if self.count < 2:
      raise ValueError(f'covariance needs at least 2 samples, got {self.count}')
    mu = self.total / self.count
    sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return mu, sigma


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """Tr(sqrtm(S1 S2)) from two symmetric eigendecompositions: S1 S2 is similar to
  A S2 A, A = S1^(1/2), which is symmetric positive semi-definite, so the trace is the sum
  of the square roots of its eigenvalues (negative rounding errors clipped to 0)."""
  w, v = np.linalg.eigh(sigma1)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  product = root @ sigma2 @ root
  return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = 'sqrtm') -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)).

  `method='sqrtm'` computes the matrix square root with scipy, as pytorch-fid and ADM do
  (tens of seconds for 2048-d statistics on a few CPU cores); `'eigh'` computes the same trace
  from two symmetric eigendecompositions (several times faster, equal to ~1e-6 relative on
  well-conditioned statistics, and better behaved on singular ones).
  """
  import scipy.linalg

  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, '
                     f'sigma {sigma1.shape} vs {sigma2.shape}')
  diff = mu1 - mu2
  if method == 'eigh':
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2.0 * _trace_sqrt_product(sigma1, sigma2))
  if method != 'sqrtm':
    raise ValueError(f'method={method!r}; expected sqrtm or eigh')
  with warnings.catch_warnings():  # a singular product is handled below
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning('FID: sqrtm(S1 S2) is not finite (singular product); adding %g to the '
                    'diagonals', eps)
    offset = np.eye(len(sigma1)) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imaginary = np.abs(np.diagonal(covmean).imag).max()
    if imaginary > 1e-3:
      logging.warning('FID: sqrtm has an imaginary component of %g; taking the real part',
                      imaginary)
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=1, keepdims=True))
  return z / z.sum(axis=1, keepdims=True)


class InceptionScore:
  """ADM's Inception Score over consecutive splits of `split_size`, streamed."""

  def __init__(self, split_size: int = IS_SPLIT_SIZE):
    self.split_size = split_size
    self.splits = []  # per split: [count, sum_x p(y|x), sum_x sum_y p log p]

  def add(self, logits: np.ndarray) -> None:
    p = _softmax(logits)
    start = 0
    while start < len(p):
      if not self.splits or self.splits[-1][0] == self.split_size:
        self.splits.append([0, np.zeros(p.shape[1]), 0.0])
      split = self.splits[-1]
      part = p[start:start + self.split_size - split[0]]
      split[0] += len(part)
      split[1] += part.sum(axis=0)
      split[2] += float(np.sum(part * np.log(np.maximum(part, 1e-300))))
      start += len(part)

  def value(self) -> float:
    if not self.splits:
      raise ValueError('no samples')
    scores = []
    for count, total, plogp in self.splits:
      marginal = total / count
      kl = plogp / count - float(np.sum(marginal * np.log(np.maximum(marginal, 1e-300))))
      scores.append(np.exp(kl))
    return float(np.mean(scores))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  score = InceptionScore(split_size)
  score.add(logits)
  return score.value()


class _NumpyOnly(pickle.Unpickler):
  """Unpickles dicts, lists and numpy arrays / scalars, nothing else."""
  ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', '_reconstruct'),
             ('numpy._core.multiarray', '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
             ('numpy._core.multiarray', 'scalar'), ('collections', 'OrderedDict')}

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f'{module}.{name} is not allowed in a statistics file')
    return super().find_class(module, name)


def load_reference(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) float64 from an ADM / our `.npz` (`mu`, `sigma`) or an EDM2 `.pkl`, local or in
  a bucket."""
  file = paths.resolve(path, 'reference statistics')
  if not file.is_file():
    raise FileNotFoundError(f'reference statistics {path!r} do not exist; expected an .npz with '
                            '`mu` and `sigma` (ADM reference batch, or `python -m lib.eval.fid '
                            '--stats_from=DATA_DIR --out=FILE.npz`)')
  data = io.BytesIO(file.read_bytes())
  if path.endswith('.pkl'):
    stats = _NumpyOnly(data).load()
    stats = stats.get('fid', stats) if isinstance(stats, dict) else stats
  else:
    with np.load(data, allow_pickle=False) as archive:
      stats = {key: archive[key] for key in ('mu', 'sigma') if key in archive.files}
  if not isinstance(stats, dict) or 'mu' not in stats or 'sigma' not in stats:
    raise ValueError(f'{path}: expected `mu` and `sigma` (for a .pkl, under the key `fid`)')
  mu, sigma = np.asarray(stats['mu'], np.float64), np.asarray(stats['sigma'], np.float64)
  if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
    raise ValueError(f'{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)')
  return mu, sigma


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, count: int) -> None:
  archive = io.BytesIO()
  np.savez(archive, mu=mu, sigma=sigma, count=np.int64(count))
  paths.write_atomic(paths.resolve(path, '--out'), archive.getvalue())


def folder_stats(data_dir: str, inception_weights: str, image_size: int = 256,
                 split: str = 'train', num_images: int | None = None, batch_size: int = 200,
                 num_classes: int = 1000) -> tuple[np.ndarray, np.ndarray, int]:
  """(mu, sigma, count) of the Inception features of an image folder (ADM center crop, no
  flips); `num_images` evenly spaced images, or all."""
  import time

  import jax
  from lib.data.images import ImageFolder
  from lib.eval import inception

  source = ImageFolder(data_dir, image_size=image_size, split=split, num_classes=num_classes,
                       random_flip=False)
  source.check()
  count = source.num_examples if not num_images else min(num_images, source.num_examples)
  indices = np.unique(np.linspace(0, source.num_examples - 1, count).round().astype(np.int64))
  sharding = None
  if jax.device_count() > 1 and jax.process_count() == 1:
    mesh = jax.make_mesh((jax.device_count(),), ('data',))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  detector = inception.Detector(inception_weights, batch_size, sharding)
  stats = FeatureStats()
  start = time.monotonic()
  for k, batch in enumerate(source.ordered_batches(indices, batch_size)):
    stats.add(detector(batch['image'])[0])
    if k % 50 == 0:
      rate = stats.count / max(time.monotonic() - start, 1e-9)
      logging.info('features of %d / %d images (%.1f images/s)', stats.count, len(indices), rate)
  mu, sigma = stats.moments()
  return mu, sigma, stats.count


def define_flags() -> None:
  """The command's flags (defined only when it runs as a command, so that importing
  this module adds no flags to another program)."""
  flags.DEFINE_string('stats_from', None, 'Image tree DATA_DIR/<split>/<class>/*: '
                      'write its reference statistics to --out.')
  flags.DEFINE_string('out', None, 'Output .npz of --stats_from (mu, sigma, count).')
  flags.DEFINE_string('samples', None, '.npz with uint8 `images` (N, H, W, C): print '
                      'its FID against --reference and its Inception Score.')
  flags.DEFINE_string('reference', None, 'Reference statistics (.npz / .pkl).')
  flags.DEFINE_string('inception_weights', None, 'pytorch-fid\'s '
                      'pt_inception-2015-12-05-6726825d.pth.')
  flags.DEFINE_integer('image_size', 256, 'Center-crop size of --stats_from.')
  flags.DEFINE_string('split', 'train', 'Subfolder of --stats_from holding the classes.')
  flags.DEFINE_integer('num_images', 0, 'Evenly spaced images of --stats_from '
                       '(0: all).')
  flags.DEFINE_integer('batch_size', 200, 'Images per Inception call.')


def main(argv):
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.inception_weights:
    raise app.UsageError('--inception_weights is required')
  if bool(FLAGS.stats_from) == bool(FLAGS.samples):
    raise app.UsageError('give either --stats_from (with --out) or --samples (with --reference)')
  if FLAGS.stats_from:
    if not FLAGS.out:
      raise app.UsageError('--stats_from needs --out=FILE.npz')
    mu, sigma, count = folder_stats(FLAGS.stats_from, FLAGS.inception_weights, FLAGS.image_size,
                                    FLAGS.split, FLAGS.num_images or None, FLAGS.batch_size)
    save_stats(FLAGS.out, mu, sigma, count)
    logging.info('wrote %s (statistics of %d images)', FLAGS.out, count)
    print(f'wrote {FLAGS.out} ({count} images)')
    return
  if not FLAGS.reference:
    raise app.UsageError('--samples needs --reference=STATS')
  from lib.eval import inception

  reference = load_reference(FLAGS.reference)
  with np.load(io.BytesIO(paths.resolve(FLAGS.samples, '--samples').read_bytes())) as archive:
    images = archive['images']
  pool, logits = inception.Detector(FLAGS.inception_weights, FLAGS.batch_size)(images)
  stats = FeatureStats()
  stats.add(pool)
  print(f'FID {frechet_distance(*stats.moments(), *reference):.4f}  '
        f'IS {inception_score(logits):.3f}  ({len(images)} samples)')


if __name__ == '__main__':
  define_flags()
  app.run(main)
