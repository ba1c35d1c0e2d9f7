"""Data-parallel scaling: train-step throughput of one preset on 1, 2, 4 and 8 devices.

    python benchmarks/scaling.py --fdl_config=experiments/dit.py:digits --batch_size=64
    python benchmarks/scaling.py --fdl_config=experiments/dit.py:s2 --batch_size=64 --devices=1,2,4,8

Each device count runs `benchmarks/train_step.py` in a fresh process (on CPU the devices are
simulated with XLA_FLAGS=--xla_force_host_platform_device_count=N; on an accelerator host the
first N devices are used through the preset's mesh), with the same global batch, and the
results are printed as one JSON object: per device count the step time, images/s and the
speed-up over one device. Extra flags (`--fdl_set=...`, `--steps`) are passed through.

On a CPU the simulated devices share the same cores, so the speed-up there measures the
overhead of sharding and collectives, not the gain of more hardware: values near 1 mean the
partitioned program costs no more than the single-device one.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str]) -> None:
  counts = [1, 2, 4, 8]
  passthrough = []
  for arg in argv:
    if arg.startswith('--devices='):
      counts = [int(n) for n in arg.split('=', 1)[1].split(',')]
    else:
      passthrough.append(arg)
  results = {}
  for n in counts:
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')
    if os.environ.get('JAX_PLATFORMS', 'cpu') != 'cpu':
      passthrough_n = passthrough + [f'--fdl_set=sharding.mesh=(("data", {n}),)']
    else:
      passthrough_n = passthrough
    out = subprocess.run([sys.executable, os.path.join(HERE, 'train_step.py'), *passthrough_n],
                         capture_output=True, text=True, env=env, check=True)
    results[n] = json.loads(out.stdout[out.stdout.index('{'):])
  base = results[counts[0]]['images_per_s']
  print(json.dumps({
      'args': passthrough,
      'backend': results[counts[0]]['backend'],
      'by_devices': {n: {'devices': r['devices'], 'step_ms': r['step_ms'],
                         'images_per_s': r['images_per_s'],
                         'speedup': round(r['images_per_s'] / base, 3)}
                     for n, r in results.items()}}, indent=2))


if __name__ == '__main__':
  main(sys.argv[1:])
