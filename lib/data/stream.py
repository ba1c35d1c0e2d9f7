"""Deterministic, resumable order of examples shared by every in-memory or indexed source.

The global batch of step k holds positions [k*B, (k+1)*B) of an endless stream that
concatenates one permutation of the N examples per epoch, drawn from (seed, epoch).
Process p of P reads the p-th contiguous slice of each global batch, so the union over
processes is the global batch and a run resumed at step k sees exactly the batches an
uninterrupted run would have seen.
"""

import numpy as np


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(step: int, global_batch: int, num_examples: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Example indices of this process's share of global batch `step`."""
  if global_batch % process_count:
    raise ValueError(f'data.batch_size={global_batch} is not divisible by the number of '
                     f'processes ({process_count})')
  local = global_batch // process_count
  start = step * global_batch + process_index * local
  positions = np.arange(start, start + local)
  epochs = positions // num_examples
  out = np.empty(local, dtype=np.int64)
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    out[mask] = epoch_permutation(seed, int(epoch), num_examples)[positions[mask] % num_examples]
  return out
