"""The training objective: what the train step differentiates.

    L(batch) = interface.loss(network, x, y)  +  sum over terms of term.loss(...)   (per sample)

The interface (`lib.flow.sit.SiT`, `edm.EDM`, `ddpm.DDPM`, `meanflow.MeanFlow`) gives the flow
loss. A term (REPA, `lib.flow.repa.REPA`) adds a loss computed from the block outputs of the
interface's one network evaluation (`lib.models.layers.capture_block_outputs`), and may bring

  * trainables: modules trained with the network by the same optimizer, not averaged by the
    EMA, not used for sampling (REPA's projector), kept in the training state under their names;
  * frozen state: weights loaded once and passed to the step as an argument (REPA's detector).

A term has `check(experiment, patch_size)` (raises `ConfigError` before any compute),
`trainables(block_outputs) -> {name: constructor(rngs=...)}` from the abstract block outputs
((1, N, D) per block), `load()` -> its frozen state, and `loss(trainables, frozen,
block_outputs, batch) -> ((B,) added to the flow loss, aux)`.

`Experiment` derives `objective = Objective(interface, terms)` from its `interface` and `repa`
fields; `lib.train.Run` calls only this class.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lib.models import layers


def block_output_shapes(make_network: Callable[[], nnx.Module],
                        latent_shape: tuple[int, int, int]) -> tuple:
  """Shapes (1, N, D) of the tokens output by each block of the network, in block order,
  evaluated abstractly (nothing is allocated)."""
  def evaluate():
    x = jnp.zeros((1, *latent_shape))
    t, y = jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    _, evaluations = layers.capture_block_outputs(lambda network, *a: network(*a),
                                                  make_network(), x, t, y)
    return evaluations[0]
  return jax.eval_shape(evaluate)


class Objective:
  """A flow interface's loss plus optional terms with their own trainables and frozen state.

  Args:
    interface: the flow formulation (`loss(network, x, y, key, rngs) -> ((B,), aux)`).
    terms: added losses (REPA); each needs an interface whose loss evaluates the network once.
  """

  def __init__(self, interface, terms: tuple = ()):
    self.interface = interface
    self.terms = tuple(terms)

  def check(self, experiment, patch_size: int | None) -> None:
    for term in self.terms:
      term.check(experiment, patch_size)

  def trainables(self, make_network: Callable[[], nnx.Module],
                 latent_shape: tuple[int, int, int], seed: int) -> Callable[[], dict]:
    """The constructor of the terms' trainable modules, {name: nnx.Module} ({} without terms;
    term i's drawn from seed + 1 + i). The network is evaluated abstractly once, here."""
    if not self.terms:
      return lambda: {}
    blocks = block_output_shapes(make_network, latent_shape)
    makers = [term.trainables(blocks) for term in self.terms]
    return lambda: {name: make(rngs=nnx.Rngs(seed + 1 + i))
                    for i, made in enumerate(makers) for name, make in made.items()}

  def load(self) -> tuple:
    """The terms' frozen state (weights read from their files), one entry per term."""
    return tuple(term.load() for term in self.terms)

  def loss(self, network, trainables: dict[str, nnx.Module], frozen: tuple, x: jax.Array,
           batch: dict, key: jax.Array, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict]:
    """Per-sample loss (B,) of clean data x (B, H, W, C) encoded from `batch` (its `label`,
    and its `image` for terms that need the pixels), and aux metrics (batch means). With
    terms, aux has the flow loss as `diffusion_loss` and each term's own metrics."""
    y = batch['label']
    if not self.terms:
      return self.interface.loss(network, x, y, key, rngs=rngs)
    (flow_loss, aux), evaluations = layers.capture_block_outputs(
        self.interface.loss, network, x, y, key, rngs=rngs)
    if len(evaluations) != 1:
      raise ValueError(f'{type(self.interface).__name__}.loss evaluated the network '
                       f'{len(evaluations)} times; the terms need an interface whose loss '
                       'evaluates it once (SiT, EDM, DDPM)')
    total, aux = flow_loss, {**aux, 'diffusion_loss': flow_loss.mean()}
    for term, state in zip(self.terms, frozen):
      added, term_aux = term.loss(trainables, state, evaluations[0], batch)
      total = total + added
      aux.update(term_aux)
    return total, aux
