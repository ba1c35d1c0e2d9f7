"""Project base class for Flax NNX modules that appear in Fiddle configs.

Flax's `ModuleMeta.__call__` hides `__init__` from `inspect.signature`: every NNX
module class reports `(*args, **kwargs)`, so Fiddle would accept misspelt argument
names (`network.dpeth=4`) and fail only when the module is finally constructed.
`Module` gives its subclasses the signature of their `__init__` (minus `self`), so
Fiddle validates names when a config is edited, prints defaults, and the launcher
can type-check `--fdl_set` values against the annotations.
"""

import inspect

from flax import nnx


class _SignatureMeta(type(nnx.Module)):

  @property
  def __signature__(cls):
    signature = inspect.signature(cls.__init__)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


class Module(nnx.Module, metaclass=_SignatureMeta):
  """An `nnx.Module` whose class signature is its constructor's."""


class Buffer(nnx.Variable):
  """A fixed array that is part of a module's state but is neither trained,
  averaged by the EMA, nor checkpointed (it is rebuilt by the constructor)."""
