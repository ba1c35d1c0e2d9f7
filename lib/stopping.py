"""Stop requests of a training run: SIGTERM (preemption), SIGUSR2 (Slurm's time-limit warning,
`sbatch --signal=USR2@SECONDS`) and SIGINT (Ctrl-C).

    with StopSignals() as signals:
      ...
      vote = signals.vote(lock)    # 0 train on, STOP a signal arrived, LOCK_LOST
      ...

A signal only records its name; the training loop decides where to stop. Every process of a
multi-host run must stop at the same step, because the checkpoint written there is a collective
save: a per-process flag would leave one process saving while another trains on. So each
process's vote (one int32 per example of its part of the batch) goes into the train step, which
returns the maximum over the whole batch (`lib.train`): a reduction inside the step's own
computation, no extra collective and no host round-trip. Every process reads the same maximum of
step k while step k+1 runs, so all of them stop after step k+1, wherever the signal arrived.
JAX's own preemption service (`multihost_utils.reached_preemption_sync_point`) listens to
SIGTERM only, and only in multi-process runs; this covers the three signals, single- and
multi-process runs, one way.

A second Ctrl-C exits at once (`errors.INTERRUPTED_STATUS`, 130) with one line and without
saving: the checkpoints already written are kept.
"""

import os
import signal
import sys

from lib import errors

STOP = 1  # a stop signal arrived: save the step and exit with errors.PREEMPTED_STATUS
LOCK_LOST = 2  # the workdir lock was taken over: stop without writing (errors.LockLost)

SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class StopSignals:
  """Records the first stop signal while installed (a context manager; main thread only)."""

  def __init__(self):
    self.received = None  # name of the first stop signal, e.g. 'SIGTERM'
    self._previous = {}

  def _handle(self, number, frame) -> None:
    name = signal.Signals(number).name
    if self.received == 'SIGINT' and number == signal.SIGINT:
      print('error: interrupted again; exiting at once without saving (the checkpoints '
            'written so far are kept)', file=sys.stderr, flush=True)
      os._exit(errors.INTERRUPTED_STATUS)
    if self.received is None:
      self.received = name
      print(f'{name}: saving a checkpoint of the current step, then exiting'
            + (' (Ctrl-C again to exit at once, without saving)' if name == 'SIGINT' else ''),
            file=sys.stderr, flush=True)

  def vote(self, lock=None) -> int:
    """This process's vote for the step being dispatched (see the module docstring)."""
    if lock is not None and not lock.owned():
      return LOCK_LOST
    return STOP if self.received else 0

  def __enter__(self):
    self._previous = {number: signal.signal(number, self._handle) for number in SIGNALS}
    return self

  def __exit__(self, *exc):
    for number, handler in self._previous.items():
      signal.signal(number, handler)
