"""Test setup (CPU JAX, no cloud probes) and what many test files share: `launch`, a fresh
`launch.py` interpreter, and `TINY`, the tiny digits configuration the training tests run."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Google's client libraries probe the GCE metadata server for credentials; keep every probe on
# this machine (the discard port) before any of them is imported. tests/gcs_emulator.py
# points them at a local GCS.
os.environ.setdefault('NO_GCE_CHECK', 'true')
for _name in ('GCE_METADATA_HOST', 'GCE_METADATA_IP', 'GCE_METADATA_ROOT'):
  os.environ.setdefault(_name, '127.0.0.1:9')

pytest_plugins = ['tests.gcs_emulator', 'tests.slurm_cluster']

DIGITS = '--fdl_config=experiments/dit.py:digits'
# The digits demo shrunk for tests (as --fdl_set values): one 32-wide block with 2 heads,
# 16 examples a step, 2 sampling steps, grids of 4 samples and the first evaluation every 1000
# steps (after every test run). Tests add what they check (steps, checkpoint interval, ...).
TINY = ('network.hidden_size=32', 'network.depth=1', 'network.num_heads=2', 'data.batch_size=16',
        'sampler.num_steps=2', 'visualize.every_steps=1000', 'visualize.num_samples=4',
        'evaluate[0].every_steps=1000')
TINY_FLAGS = tuple(f'--fdl_set={assignment}' for assignment in TINY)


def tiny_digits(*assignments: str, preset: str = 'experiments/dit.py:digits'):
  """The `TINY` config of `preset` in this process, then `assignments` (`path=value`)."""
  from lib.config import overrides, presets

  config = presets.load_preset(preset)
  for assignment in TINY + assignments:
    overrides.apply_override(config, assignment)
  return config


def launch(*args: str, cwd: str = ROOT, env: dict | None = None, inherit_env: bool = True,
           wait: bool = True, timeout: float = 600, stderr=subprocess.PIPE):
  """`python launch.py ARGS` in a fresh interpreter, run in `cwd` with this process's
  environment plus `env` (only `env` with `inherit_env=False`): the finished process with its
  output as text, or with `wait=False` the running one (stdout discarded, stderr to `stderr`:
  a pipe, or an open file where nobody reads the pipe while waiting)."""
  command = [sys.executable, os.path.join(ROOT, 'launch.py'), *args]
  environment = {**os.environ, **(env or {})} if inherit_env else env
  if not wait:
    return subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True)
  return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True,
                        timeout=timeout)
