"""Errors a user can cause, which `launch.py` reports as one message instead of a traceback.

    UserError          bad input: a flag, a config value, a path; exit status 2
      UsageError       a command-line value that cannot be applied (`lib.config`)
      ConfigError      experiment values that contradict each other or are out of range
      DataError        data that cannot be read as configured (names the file)
      CheckpointError  no checkpoint of the workdir can be restored
        CheckpointMismatch  a checkpoint saved by another config (shapes, tree)
      WorkdirBusy      another launch holds the workdir's lock
        LockLost       a running launch lost the lock to another one and stopped unwritten
      StorageError     the workdir cannot be written (disk full, permission denied, a bucket
                       unreachable for longer than FIDDLEDIFF_IO_RETRY_SECS)
    NonFiniteError     training met a non-finite loss, gradient or weight; exit status 1
    Preempted          training stopped by SIGTERM, SIGUSR2 or SIGINT after writing a checkpoint
                       of the step it stopped at; exit status PREEMPTED_STATUS (75)

Exit statuses of `launch.py`: 0 a run that reached its end (or a command that completed);
1 non-finite training or an unexpected crash; 2 a `UserError`; 75 (`PREEMPTED_STATUS`,
EX_TEMPFAIL of sysexits.h) a run stopped by a signal, to be resumed by relaunching it (a
scheduler requeues it); 130 a second Ctrl-C, which exits at once without saving.

`launch.py --verbosity=1` (or `FIDDLEDIFF_TRACEBACK=1` in the environment) prints the
traceback as well.
"""

import math
import numbers
import re


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


class LockLost(WorkdirBusy):
  """This run's workdir lock was taken over (its holder was stopped or cut off for longer than
  the lock's staleness limit); the run stopped before writing anything more."""


class StorageError(UserError):
  """The workdir cannot be written; the message names the folder, the cause, the newest intact
  checkpoint and what to do. Nothing half-written was kept."""


class Preempted(Exception):
  """A training run stopped by a signal after saving the step it stopped at."""

  def __init__(self, signal_name: str, step: int, total_steps: int, checkpoints):
    super().__init__(f'{signal_name}: stopped at step {step} of {total_steps} and saved its '
                     f'checkpoint in {checkpoints}; relaunch the same command to resume')
    self.step = step


PREEMPTED_STATUS = 75  # EX_TEMPFAIL: try again later
INTERRUPTED_STATUS = 130  # 128 + SIGINT: the second Ctrl-C


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss, gradient norm or weight; nothing was saved from it."""


def check_positive(**values) -> None:
  """Raises ValueError('name=value; expected ...') for the first value below 1 (None passes).
  Building a config prefixes the node's path (`presets.build`): `checkpoint.max_to_keep=0; ...`."""
  for name, value in values.items():
    if value is not None and not (isinstance(value, numbers.Real) and value >= 1):
      raise ValueError(f'{name}={value!r}; expected a positive number (at least 1)')


def check_in_range(low: float, high: float = math.inf, /, *, open_low: bool = False,
                   open_high: bool = False, **values) -> None:
  """Raises ValueError('name=value; expected a number in [low, high]') for the first value
  outside the interval (`open_low` / `open_high` exclude its ends; high=inf: no upper bound)."""
  for name, value in values.items():
    inside = isinstance(value, numbers.Real) and (low < value if open_low else low <= value) \
        and (value < high if open_high or high == math.inf else value <= high)
    if not inside:
      expected = (f'> {low}' if open_low else f'>= {low}') if high == math.inf else \
          f'in {"(" if open_low else "["}{low}, {high}{")" if open_high else "]"}'
      raise ValueError(f'{name}={value!r}; expected a number {expected}')


def check_divides(**divisor_and_dividend) -> None:
  """`check_divides(num_heads=3, hidden_size=32)` raises
  ValueError('num_heads=3 must divide hidden_size=32') unless the first value divides the
  second; either below 1 is `check_positive`'s error."""
  check_positive(**divisor_and_dividend)
  (divisor_name, divisor), (dividend_name, dividend) = divisor_and_dividend.items()
  if dividend % divisor:
    raise ValueError(f'{divisor_name}={divisor} must divide {dividend_name}={dividend}')


def at_node(path: str, owner: str, message: str) -> ConfigError:
  """A constructor's complaint about its own argument, as a ConfigError naming the graph node
  it was made from: `num_heads=3 must divide hidden_size=32` of the node `network` ->
  `network.num_heads=3 must divide hidden_size=32`; a message that names the node already is
  kept, any other becomes `network (DiT): MESSAGE`."""
  text = message.strip()
  if path and not text.startswith(f'{path}.'):
    text = f'{path}.{text}' if re.match(r'[A-Za-z_]\w*=', text) else f'{path} ({owner}): {text}'
  return ConfigError(text)
