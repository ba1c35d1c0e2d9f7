"""lib.cpu_runtime: a computation's temp buffer is reused by the next execution instead of
being mapped and page-faulted afresh; settings made in the environment are left alone."""

import os
import subprocess
import sys

import pytest

from lib import cpu_runtime
from lib.config import REPO_ROOT

# Page faults per execution of a computation with a 256 MiB temp buffer (tanh(a) before the
# dot), in a fresh interpreter with or without the settings: the fewest of three executions
# after four warm-up ones (an execution may start before the previous one's buffer is freed,
# and then takes memory not touched yet).
PROBE = '''
import resource, sys
import jax, jax.numpy as jnp
from lib import cpu_runtime
if sys.argv[1] == "keep":
  assert cpu_runtime.run_inline() and cpu_runtime.keep_freed_memory()
a = jnp.full((8192, 8192), 0.5, jnp.float32)
b = jnp.ones((8192, 8), jnp.float32)
f = jax.jit(lambda a, b: jnp.tanh(a) @ b)
assert f.lower(a, b).compile().memory_analysis().temp_size_in_bytes >= 2**28
for _ in range(4):
  f(a, b).block_until_ready()
faults = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(a, b).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))
'''


def _faults(mode: str) -> int:
  env = {k: v for k, v in os.environ.items()
         if k != 'GLIBC_TUNABLES' and k != 'JAX_CPU_ENABLE_ASYNC_DISPATCH'
         and not (k.startswith('MALLOC_') and k.endswith('_'))}
  result = subprocess.run([sys.executable, '-c', PROBE, mode], check=True, cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True)
  return int(result.stdout.split()[-1])


@pytest.mark.slow
def test_temp_buffer_is_reused_instead_of_faulted_in_again():
  pages = 2**28 // 4096  # 65536 pages of 4 KiB
  default, keep = _faults('default'), _faults('keep')
  assert default > pages // 2, default
  assert keep < pages // 50, keep


def test_settings_made_in_the_environment_are_left_alone(monkeypatch):
  monkeypatch.setenv('JAX_CPU_ENABLE_ASYNC_DISPATCH', 'true')
  assert not cpu_runtime.run_inline()
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.trim_threshold=0')
  assert not cpu_runtime.keep_freed_memory()
  monkeypatch.delenv('GLIBC_TUNABLES')
  monkeypatch.setenv('MALLOC_ARENA_MAX_', '2')
  assert not cpu_runtime.keep_freed_memory()
