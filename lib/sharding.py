"""Device meshes and partition rules (diffuse_nnx's `sharding` block), as nodes of the graph.

    sharding=fdl.Config(Sharding,
        mesh=(('data', -1),),                                  # axis sizes; -1 = the rest
        rules=(('.*', fdl.Config(FSDP, axis='data')),),        # first matching regex wins
        activation_rules=(('batch', 'data'),))                 # logical activation axes

A rule's regex is searched in the '/'-joined path of every array of the training state:
`params/blocks/3/attn/qkv/kernel`, `opt_state/0/mu/blocks/3/attn/qkv/kernel`,
`ema/blocks/3/attn/qkv/kernel`, so optimizer and EMA state follow their parameters unless a
rule names them. Strategies decide a `PartitionSpec` from an array's shape:

  * `Replicate()`: every device holds the whole array.
  * `FSDP(axis='data', min_size_mb=4)`: arrays of at least `min_size_mb` are split along
    their largest dimension divisible by the axis size (ZeRO-3 / fully sharded data
    parallel); smaller or indivisible arrays are replicated.
"""

import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lib import errors

AxisNames = str | tuple[str, ...]


class Replicate:
  """A full copy on every device."""

  def spec(self, shape: tuple[int, ...], dtype, mesh: Mesh) -> P:
    del shape, dtype, mesh
    return P()


class FSDP:
  """Split the largest divisible dimension over `axis` (one mesh axis or several)."""

  def __init__(self, axis: AxisNames = 'data', min_size_mb: float = 4.0):
    self.axis = axis
    self.min_size_mb = min_size_mb

  def spec(self, shape: tuple[int, ...], dtype, mesh: Mesh) -> P:
    axes = (self.axis,) if isinstance(self.axis, str) else tuple(self.axis)
    ways = math.prod(mesh.shape[a] for a in axes)
    size_mb = math.prod(shape) * np.dtype(dtype).itemsize / 2**20
    if ways == 1 or size_mb < self.min_size_mb:
      return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % ways == 0:
        spec = [None] * len(shape)
        spec[dim] = self.axis
        return P(*spec)
    return P()


def path_string(path) -> str:
  """A pytree key path as 'a/b/0/c' (the trailing `.value` of NNX variables dropped)."""
  parts = []
  for key in path:
    name = getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key)))
    parts.append(str(name))
  if parts and parts[-1] == 'value':
    parts.pop()
  return '/'.join(parts)


class Sharding:
  """How the training state and the batches are laid out on the devices.

  Args:
    mesh: ((axis_name, size), ...); one size may be -1 for "all remaining devices"; fixed
      sizes smaller than the device count use the first devices.
    rules: ((path_regex, strategy), ...) for the training state; the first match wins and
      unmatched arrays are replicated.
    activation_rules: ((logical_axis, mesh_axes), ...); 'batch' places the batch dimension
      of the input (and so of the activations) on mesh axes.
  """

  def __init__(self, mesh: tuple[tuple[str, int], ...] = (('data', -1),),
               rules: tuple[tuple[str, Any], ...] = (('.*', Replicate()),),
               activation_rules: tuple[tuple[str, AxisNames], ...] = (('batch', 'data'),)):
    self.mesh_axes = tuple((name, int(size)) for name, size in mesh)
    self.rules = tuple((re.compile(pattern), strategy) for pattern, strategy in rules)
    self.activation_rules = dict(activation_rules)
    if sum(size == -1 for _, size in self.mesh_axes) > 1:
      raise ValueError(f'sharding.mesh={mesh}: at most one axis may have size -1')

  def make_mesh(self, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = [size for _, size in self.mesh_axes]
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
      if len(devices) % known:
        raise errors.ConfigError(f'sharding.mesh={self.mesh_axes}: {len(devices)} devices are '
                                 f'not a multiple of the fixed axis sizes ({known})')
      sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) > len(devices):
      raise errors.ConfigError(f'sharding.mesh={self.mesh_axes} needs {math.prod(sizes)} '
                               f'devices; {len(devices)} are available')
    devices = devices[:math.prod(sizes)]  # a mesh of fixed sizes may use a subset
    names = tuple(name for name, _ in self.mesh_axes)
    return jax.make_mesh(tuple(sizes), names, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(names))

  def spec_for(self, path: str, shape, dtype, mesh: Mesh) -> P:
    for pattern, strategy in self.rules:
      if pattern.search(path):
        return strategy.spec(tuple(shape), dtype, mesh)
    return P()

  def state_shardings(self, abstract_tree, mesh: Mesh):
    """A tree of NamedShardings for a tree of arrays or ShapeDtypeStructs."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, self.spec_for(path_string(path), x.shape, x.dtype,
                                                          mesh)), abstract_tree)

  def batch_axes(self) -> AxisNames | None:
    return self.activation_rules.get('batch')

  def batch_sharding(self, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(self.batch_axes()))

  def batch_ways(self, mesh: Mesh) -> int:
    axes = self.batch_axes()
    if axes is None:
      return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))

  def check_batch(self, batch_size: int, mesh: Mesh) -> None:
    """Raises ConfigError naming `data.batch_size`, the devices and the nearest valid sizes
    unless the batch splits evenly over the devices of its mesh axes and over the processes
    (each loads an equal share)."""
    ways, processes = self.batch_ways(mesh), jax.process_count()
    multiple = math.lcm(ways, processes)
    if batch_size % multiple:
      lower, upper = batch_size // multiple * multiple, -(-batch_size // multiple) * multiple
      choices = f'{lower} or {upper}' if lower else f'{upper}'
      raise errors.ConfigError(
          f'data.batch_size={batch_size} must be divisible by the {ways} devices the batch is '
          f'split over (mesh {dict(mesh.shape)}, {jax.device_count()} devices, '
          f'{processes} process{"es" if processes > 1 else ""}); use a multiple of {multiple}, '
          f'e.g. {choices}')
