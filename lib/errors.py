"""Errors a user can cause, which `launch.py` reports as one message instead of a traceback.

    UserError          bad input: a flag, a config value, a path; exit status 2
      UsageError       a command-line value that cannot be applied (`lib.config`)
      ConfigError      experiment values that contradict each other or are out of range
      DataError        data that cannot be read as configured (names the file)
      CheckpointError  no checkpoint of the workdir can be restored
        CheckpointMismatch  a checkpoint saved by another config (shapes, tree)
      WorkdirBusy      another launch holds the workdir's lock
    NonFiniteError     training met a non-finite loss, gradient or weight; exit status 1

`launch.py --verbosity=1` (or `FIDDLEDIFF_TRACEBACK=1` in the environment) prints the
traceback as well.
"""


class UserError(ValueError):
  """Bad input; nothing the message names has been changed."""


class UsageError(UserError):
  """A command-line value that cannot be applied; nothing has run."""


class ConfigError(UserError):
  """An experiment whose values contradict each other or are out of range."""


class DataError(UserError):
  """Data that cannot be read as configured; the message names the file or folder."""


class CheckpointError(UserError):
  """No checkpoint of a workdir can be restored; the message lists what was found."""


class CheckpointMismatch(CheckpointError):
  """A readable checkpoint that does not fit the launched config (another network's shapes
  or tree); the message names the differences. Nothing was moved."""


class WorkdirBusy(UserError):
  """Another launch holds the workdir's lock; the message names the holder."""


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss, gradient norm or weight; nothing was saved from it."""


def check_positive(**values) -> None:
  """Raises ValueError('name=value; expected ...') for the first value below 1 (None passes).
  Building a config prefixes the node's path (`presets.build`): `checkpoint.max_to_keep=0; ...`."""
  for name, value in values.items():
    if value is not None and not (isinstance(value, (int, float)) and value >= 1):
      raise ValueError(f'{name}={value!r}; expected a positive number (at least 1)')
