"""Which importer fills which network: network class -> importer of its released checkpoints
(subclasses use their base's entry; configs name no importer). Every importer follows
`lib.weights.importer`'s convention, `fn(state_dict, abstract_network) -> nnx.State`: the
network's parameters, plus the fixed arrays (buffers) the checkpoint carries, which replace the
constructor's. `import_file` is what `Experiment.init_from` and `launch.py --mode=import` use;
another family registers one line in `IMPORTERS` (and its conventions in
`lib.weights.releases.FAMILIES`).
"""

from typing import Callable

import numpy as np
from absl import logging
from flax import nnx

from lib.models import ddt, dit
from lib.models.lightning_ddt import LightningDDT
from lib.models.lightning_dit import LightningDiT
from lib.weights import ddt as ddt_weights
from lib.weights import dit as dit_weights
from lib.weights import importer, lightning, releases
from lib.weights.files import read_state_dict

IMPORTERS: dict[type, Callable[..., nnx.State]] = {
    dit.DiT: dit_weights.import_dit,
    LightningDiT: lightning.import_lightning_dit,
    LightningDDT: lightning.import_lightning_ddt,
    ddt.DDT: ddt_weights.import_ddt,  # MCG-NJU DDT
}


def importer_for(network) -> Callable[..., nnx.State]:
  """The importer for a network class (or partial, or unbuilt `fdl.Partial`): the entry of its
  nearest base class."""
  found = importer.lookup(IMPORTERS, network)
  if found is None:
    cls = importer.network_class(network)
    names = ', '.join(f'{c.__module__}.{c.__qualname__}' for c in IMPORTERS)
    raise ValueError(f'no weight importer for network class '
                     f'{getattr(cls, "__qualname__", cls)}; importers exist for: {names} '
                     '(register one in lib.weights.registry.IMPORTERS)')
  return found


def import_file(path: str, experiment) -> nnx.State:
  """The network parameters of `experiment` (an `Experiment`) from a released weights file,
  after checking that the experiment follows the release's conventions (`releases.check`)."""
  releases.check(experiment, path)
  params = importer_for(experiment.network)(read_state_dict(path),
                                            nnx.eval_shape(experiment.make_network))
  logging.info('Imported %s parameters from %s',
               f'{sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(params)):,}', path)
  return params
