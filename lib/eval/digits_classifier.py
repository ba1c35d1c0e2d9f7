"""A small CNN classifier of the 8x8 digits: the quality metric of the CPU demo, which has no
Inception network (its images are 8x8 greyscale, and no Inception weights ship offline).

    python -m lib.eval.digits_classifier --train --out=lib/eval/digits_classifier.npz

trains it on the training split of `lib.data.digits` (all images but the last
`Digits.num_holdout`) and reports its accuracy on the held-out images; the committed weights
(`digits_classifier.npz`, ~90 KB) are what `lib.eval.actions.DigitsQuality` loads. Network:
conv3x3(16) -> conv3x3(32) -> maxpool2 -> conv3x3(32) -> maxpool2 -> dense(64) = the
penultimate features used for the Frechet distance -> dense(10). Inputs are uint8
(N, S, S, 1); sizes other than 8 are resized to 8x8 (bilinear with antialiasing).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from lib import nn

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'digits_classifier.npz')
FEATURES = 64


class DigitsCNN(nn.Module):
  """uint8 (N, S, S, 1) digits -> ((N, 64) penultimate features, (N, 10) logits)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), padding='SAME', rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), padding='SAME', rngs=rngs)
    self.conv3 = nnx.Conv(32, 32, (3, 3), padding='SAME', rngs=rngs)
    self.hidden = nnx.Linear(32 * 2 * 2, FEATURES, rngs=rngs)
    self.out = nnx.Linear(FEATURES, 10, rngs=rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = images.astype(jnp.float32) / 255.0
    if x.shape[1:3] != (8, 8):
      x = jax.image.resize(x, (x.shape[0], 8, 8, x.shape[3]), method='linear', antialias=True)
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = nnx.max_pool(nnx.relu(self.conv3(x)), (2, 2), strides=(2, 2))
    features = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return features, self.out(features)


def _key(path) -> str:
  return '/'.join(str(part) for part in path)


def save(model: DigitsCNN, path: str) -> None:
  arrays = {_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
  np.savez(path, **arrays)


def load(path: str | None = None) -> DigitsCNN:
  """The classifier with the weights of `path` (default: the committed weights)."""
  path = path or DEFAULT_WEIGHTS
  if not os.path.isfile(path):
    raise FileNotFoundError(f'digits classifier weights {path!r} do not exist; train them with '
                            '`python -m lib.eval.digits_classifier --train --out=PATH`')
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: DigitsCNN(rngs=nnx.Rngs(0))))
  with np.load(path) as archive:
    given = {key: archive[key] for key in archive.files}
  flat = []
  for p, variable in nnx.to_flat_state(abstract_state):
    key = _key(p)
    if key not in given or given[key].shape != variable.shape:
      raise ValueError(f'{path}: {key} is missing or mis-shaped (expected {variable.shape}); '
                       'retrain the classifier')
    flat.append((p, variable.replace(jnp.asarray(given[key]))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def splits(image_size: int = 8):
  """((train images, labels), (held-out images, labels)) as `lib.data.digits.Digits` splits."""
  from lib.data import digits

  source = digits.Digits(image_size=image_size)
  return source._split(train=True), source._split(train=False)


def _shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random translations by up to one pixel (zero fill)."""
  out = np.zeros_like(images)
  for i, (dy, dx) in enumerate(rng.integers(-1, 2, (len(images), 2))):
    src = images[i, max(0, -dy):8 - max(0, dy), max(0, -dx):8 - max(0, dx)]
    out[i, max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
  return out


def train(steps: int = 3000, batch_size: int = 64, learning_rate: float = 2e-3,
          seed: int = 0) -> tuple[DigitsCNN, float]:
  """Trains on the training split; returns (model, held-out accuracy)."""
  import optax

  (images, labels), (test_images, test_labels) = splits()
  model = DigitsCNN(rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adamw(optax.cosine_decay_schedule(learning_rate, steps),
                                               weight_decay=1e-4), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  for k in range(steps):
    index = rng.integers(0, len(images), batch_size)
    loss = step(model, optimizer, _shift(images[index], rng), labels[index])
    if k % 500 == 0:
      logging.info('step %d: loss %.4f', k, float(loss))
  accuracy = float(np.mean(np.argmax(model(test_images)[1], -1) == test_labels))
  return model, accuracy


def define_flags() -> None:
  """The command's flags (defined only when it runs as a command, so that importing
  this module adds no flags to another program)."""
  flags.DEFINE_bool('train', False, 'Train the classifier and save it to --out.')
  flags.DEFINE_string('out', DEFAULT_WEIGHTS, 'Where to write the weights (.npz).')
  flags.DEFINE_integer('steps', 3000, 'Training steps.')


def main(argv):
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.train:
    (_, _), (test_images, test_labels) = splits()
    model = load(FLAGS.out)
    accuracy = float(np.mean(np.argmax(model(test_images)[1], -1) == test_labels))
    print(f'{FLAGS.out}: held-out accuracy {accuracy:.4f} ({len(test_labels)} images)')
    return
  model, accuracy = train(FLAGS.steps)
  save(model, FLAGS.out)
  print(f'wrote {FLAGS.out}: held-out accuracy {accuracy:.4f}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
