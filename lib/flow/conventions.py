"""Time conventions of velocity networks, and the adapter between them.

Ours (diffuse_nnx, REPA, RAE, MeanFlow): **t = 0 is data, t = 1 is noise**,
x_t = (1 - t) x + t n, velocity v = dx_t/dt = n - x.

SiT, LightningDiT and DDT releases use the reverse: s = 1 is data, s = 0 is noise,
x_s = s x + (1 - s) n, velocity v' = dx_s/ds = x - n. With s = 1 - t the two paths are
the same point, and v' = -v. So a network trained in that convention is used in ours by
feeding it s = 1 - t and negating its output:

    v(x, t, y) = -v'(x, 1 - t, y)

`ReversedTime(network)` does exactly that. An interval input `dt` (MeanFlow's t - r, a
length) is passed through unchanged. `interface.network_time` selects it; importing released
weights sets it to the release's convention (`lib.weights.releases`).
"""

from typing import Literal

NetworkTime = Literal['data_at_0', 'data_at_1']
NETWORK_TIMES = ('data_at_0', 'data_at_1')


class ReversedTime:
  """Wraps a network of the data-at-1 convention so it answers in ours (data at 0).

  Keeps the network's call signature `(x, t, y, dt=None, gw=None, rngs=None)` and its
  `num_classes` (the null class), so interfaces and samplers use it like the network.
  """

  def __init__(self, network):
    self.network = network

  @property
  def num_classes(self):
    return self.network.num_classes

  def __getattr__(self, name):  # other attributes (dt_embedder, ...) of the wrapped network
    if name == 'network':
      raise AttributeError(name)
    return getattr(self.network, name)

  def __call__(self, x, t, y, dt=None, gw=None, rngs=None):
    kwargs = {}
    if dt is not None:
      kwargs['dt'] = dt
    if gw is not None:
      kwargs['gw'] = gw
    if rngs is not None:
      kwargs['rngs'] = rngs
    return -self.network(x, 1 - t, y, **kwargs)


def check_network_time(network_time: str) -> None:
  if network_time not in NETWORK_TIMES:
    raise ValueError(f'interface.network_time={network_time!r}; expected one of {NETWORK_TIMES}')


def adapt(network, network_time: str):
  """`network` seen in our convention (t = 0 data): itself, or wrapped in `ReversedTime`."""
  return ReversedTime(network) if network_time == 'data_at_1' else network
