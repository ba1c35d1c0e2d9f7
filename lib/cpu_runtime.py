"""How a run uses the CPU backend: computations on the calling thread, freed memory kept.

XLA:CPU allocates an executable's temp buffer (the train step's activations and gradients:
2.1 GiB for DiT-S/2 at batch 16, 0.1 GiB for the digits demo) when the execution starts and
frees it when it ends. With glibc's defaults such a buffer, larger than the 32 MiB mmap
threshold, is mapped afresh and returned at every step, so every step page-faults all of it in
again: 580k faults and 1 s of kernel time per DiT-S/2 step, a third of the digits demo's CPU
time. Two settings make the next step reuse the pages instead (`benchmarks/README.md`):

  * `run_inline()`, before any backend starts: `jax_cpu_enable_async_dispatch=False`, so a
    computation runs on the thread that calls it and its buffers come from glibc's main heap
    (the worker threads of asynchronous dispatch have per-thread arenas, which map large
    buffers whatever the settings);
  * `keep_freed_memory()`, once the default backend is the CPU: glibc serves large requests
    from the heap, not with mmap (`M_MMAP_MAX` = 0), and keeps up to 2 GiB of freed memory at
    the top of the heap (`M_TRIM_THRESHOLD`, `M_TOP_PAD`) instead of returning it.

The process then keeps its peak memory resident. Each setting is left to the user where the
environment already makes it: `JAX_CPU_ENABLE_ASYNC_DISPATCH`, and `GLIBC_TUNABLES` or glibc's
`MALLOC_*_` variables. `launch.py` applies both; so do the benchmarks, which measure what it
runs.
"""

import ctypes
import os

import jax

# mallopt(3) parameters of glibc's malloc.h.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
KEEP_BYTES = 2**31 - 1  # the largest value mallopt takes (an int): 2 GiB


def run_inline() -> bool:
  """Runs CPU computations on the calling thread (call before any backend starts). Returns
  whether the setting was made (not when JAX_CPU_ENABLE_ASYNC_DISPATCH is set)."""
  if 'JAX_CPU_ENABLE_ASYNC_DISPATCH' in os.environ:
    return False
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True


def keep_freed_memory() -> bool:
  """On the CPU backend with glibc, keeps freed memory for reuse (module docstring). Returns
  whether the settings were made (not on other backends or allocators, nor when the
  environment configures glibc's malloc)."""
  if jax.default_backend() != 'cpu':
    return False
  if 'GLIBC_TUNABLES' in os.environ or any(
      name.startswith('MALLOC_') and name.endswith('_') for name in os.environ):
    return False
  mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)
  if mallopt is None:  # not glibc
    return False
  return all(mallopt(option, value) == 1 for option, value in
             ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_BYTES), (M_TOP_PAD, KEEP_BYTES)))
