"""Meshes, partition rules, sharded initialisation and multi-device training.

Multi-device checks run in subprocesses with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8), since this process's JAX has one.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lib import sharding
from lib.config import REPO_ROOT
from tests.conftest import launch


def run_on_8_devices(code: str, timeout=900) -> dict:
  """Runs `code` (which prints one JSON line last) in a fresh 8-device CPU process."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_fsdp_splits_the_largest_divisible_dimension():
  mesh = jax.make_mesh((1,), ('data',))
  fake = type('Mesh', (), {'shape': {'data': 8}})()
  fsdp = sharding.FSDP(axis='data', min_size_mb=1.0)
  assert fsdp.spec((1152, 3456), np.float32, fake) == P(None, 'data')
  assert fsdp.spec((100_000, 24), np.float32, fake) == P('data', None)  # 100000 % 8 == 0
  assert fsdp.spec((1001, 3), np.float32, fake) == P()  # too small
  assert fsdp.spec((1001, 1001), np.float32, fake) == P()  # nothing divisible
  assert fsdp.spec((4096, 4096), np.float32, mesh) == P()  # one device: nothing to split
  assert sharding.Replicate().spec((4096, 4096), np.float32, fake) == P()


def test_rules_first_match_wins_on_state_paths():
  rules = sharding.Sharding(rules=(('ema/', sharding.Replicate()),
                                   ('.*', sharding.FSDP(min_size_mb=0.0))))
  fake = type('Mesh', (), {'shape': {'data': 2}})()
  assert rules.spec_for('ema/blocks/0/attn/qkv/kernel', (8, 24), np.float32, fake) == P()
  assert rules.spec_for('params/blocks/0/attn/qkv/kernel', (8, 24), np.float32, fake) == \
      P(None, 'data')


def test_mesh_sizes_resolve_and_mismatches_are_explained():
  assert sharding.Sharding(mesh=(('data', -1),)).make_mesh().shape == {'data': 1}
  with pytest.raises(ValueError, match='needs 4 devices; 1 are available'):
    sharding.Sharding(mesh=(('data', 2), ('model', 2))).make_mesh()
  with pytest.raises(ValueError, match='at most one axis may have size -1'):
    sharding.Sharding(mesh=(('data', -1), ('model', -1)))


TINY_RUN = '''
import json, jax, numpy as np, fiddle as fdl
from experiments import common
from lib import train
from lib.config import overrides, presets

def run(layout, steps=3):
  config = presets.load_preset('experiments/dit.py:digits')
  for assignment in ['network.hidden_size=64', 'network.depth=2', 'network.num_heads=4',
                     'data.batch_size=16', 'visualize=None', 'evaluate=[]']:
    overrides.apply_override(config, assignment)
  config.sharding = layout
  experiment = fdl.build(config)
  r = train.Run(experiment, '/tmp/unused')
  r.load_encoder()
  r.state = r.initial_state()
  batches = experiment.data.batches(0)
  losses = []
  for _ in range(steps):
    batch = {k: jax.make_array_from_process_local_data(r.batch_sharding, v)
             for k, v in next(batches).items()}
    r.state, metrics = r._train_step(r.state, r.encoder_state, batch)
    losses.append(float(metrics['loss']))
  return r, losses
'''


@pytest.mark.slow
def test_fsdp_replicated_and_single_device_steps_agree():
  out = run_on_8_devices(TINY_RUN + '''
fsdp_layout = common.fsdp()
fsdp_layout.rules[0][1].min_size_mb = 0.0   # shard every divisible array of the tiny model
single = common.replicated()
single.mesh = (('data', 1),)
results = {}
for name, layout in [('fsdp', fsdp_layout), ('replicated', common.replicated()),
                     ('single', single)]:
  r, losses = run(layout)
  sharded = [x for x in jax.tree.leaves(r.state['params'])
             if any(s is not None for s in x.sharding.spec)]
  labels = np.arange(5)  # not a multiple of 8 devices: padded
  results[name] = {'losses': losses, 'devices': len(r.mesh.devices.flat),
                   'sharded_arrays': len(sharded),
                   'samples': r.generate(labels, 2.0, seed=3).astype(int).tolist(),
                   'samples_in_threes': r.generate(labels, 2.0, seed=3,
                                                   batch_size=3).astype(int).tolist(),
                   'params': [np.asarray(x).ravel()[:64].tolist()
                              for x in jax.tree.leaves(r.state['params'])]}
print(json.dumps(results))
''')
  assert out['fsdp']['devices'] == out['replicated']['devices'] == 8
  assert out['single']['devices'] == 1
  assert out['fsdp']['sharded_arrays'] > 10 and out['replicated']['sharded_arrays'] == 0
  for name in ('fsdp', 'replicated', 'single'):  # sample i does not depend on its batch
    assert out[name]['samples'] == out[name]['samples_in_threes']
  for name in ('fsdp', 'replicated'):
    np.testing.assert_allclose(out[name]['losses'], out['single']['losses'], rtol=1e-5)
    difference = np.abs(np.subtract(out[name]['samples'], out['single']['samples']))
    assert difference.mean() < 0.5 and difference.max() <= 2  # float rounding of the weights
    for a, b in zip(out[name]['params'], out['single']['params']):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_xl_initialises_sharded_without_a_full_copy_anywhere():
  """DiT-XL/2 with FSDP on 8 devices: the compiled initialisation's per-device output is
  about 1/8 of the state, and every large array is split."""
  out = run_on_8_devices('''
import json, jax, numpy as np, fiddle as fdl
from experiments import common
from lib import train
from lib.config import presets
config = presets.load_preset('experiments/dit.py:xl2')
config.sharding = common.fsdp()
r = train.Run(fdl.build(config), '/tmp/unused')
abstract = jax.eval_shape(r._create)
total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract['params']))
compiled = jax.jit(r._create, out_shardings=r.state_shardings).lower().compile()
per_device = compiled.memory_analysis().output_size_in_bytes
largest_unsplit = max(x.size * x.dtype.itemsize for x, s in zip(
    jax.tree.leaves(abstract), jax.tree.leaves(r.state_shardings))
    if all(p is None for p in s.spec) or not s.spec)
print(json.dumps({'total': total, 'params': params, 'per_device': per_device,
                  'largest_unsplit': largest_unsplit}))
''')
  assert out['params'] == 674_816_272 * 4
  assert out['per_device'] < out['params']  # no device holds a full copy of the weights
  assert out['per_device'] < out['total'] / 8 * 1.1
  assert out['largest_unsplit'] < 4 * 2**20 + 1  # only arrays under FSDP's 4 MiB threshold


@pytest.mark.slow
def test_b2_real_initialisation_bytes_per_device():
  out = run_on_8_devices('''
import json, jax, fiddle as fdl
from experiments import common
from lib import train
from lib.config import presets
config = presets.load_preset('experiments/dit.py:b2')
config.sharding = common.fsdp()
r = train.Run(fdl.build(config), '/tmp/unused')
state = r.initial_state()
per_device = {}
for leaf in jax.tree.leaves(state):
  for shard in leaf.addressable_shards:
    per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
total = sum(x.nbytes for x in jax.tree.leaves(state))
print(json.dumps({'per_device': list(per_device.values()), 'total': total}))
''')
  assert len(out['per_device']) == 8
  # arrays under FSDP's 4 MiB threshold (B/2's 768x768 projections) stay replicated
  assert max(out['per_device']) < out['total'] / 4


@pytest.mark.slow
def test_batch_must_divide_the_batch_devices():
  out = run_on_8_devices(TINY_RUN + '''
config = presets.load_preset('experiments/dit.py:digits')
overrides.apply_override(config, 'data.batch_size=12')
try:
  train.Run(fdl.build(config), '/tmp/unused')
  print(json.dumps({'error': None}))
except ValueError as e:
  print(json.dumps({'error': str(e)}))
''')
  assert 'data.batch_size=12 must be divisible by the 8 devices' in out['error']


PRESET = '''
from experiments import common, dit

def tiny(fsdp: bool = False):
  config = dit.digits(total_steps=6)
  config.network.hidden_size = 64
  config.network.depth = 2
  config.network.num_heads = 4
  config.data.batch_size = 16
  config.log_every_steps = 1
  config.checkpoint.save_interval_steps = 3
  config.checkpoint.max_to_keep = None
  config.visualize = None
  config.evaluate = []
  if fsdp:
    config.sharding = common.fsdp()
    config.sharding.rules[0][1].min_size_mb = 0.0
  return config
'''


def launch_tiny(tmp_path, workdir, *args, devices=1, process=None):
  (tmp_path / 'scale_presets.py').write_text(PRESET)
  env = dict(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(tmp_path))
  command = [f'--fdl_config={tmp_path}/scale_presets.py:tiny' + args[0], f'--workdir={workdir}',
             *args[1:]]
  if process is not None:
    # stderr to a file: a pipe nobody reads while waiting for the other process would fill
    with open(tmp_path / f'process_{process}.log', 'w') as log:
      return launch(*command, env=env, wait=False, stderr=log)
  result = launch(*command, env=env, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]


def losses(workdir) -> dict[int, float]:
  out = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    record = json.loads(line)
    if 'train/loss' in record:
      out[record['step']] = record['train/loss']
  return out


@pytest.mark.slow
def test_checkpoint_restores_into_another_mesh_and_continues(tmp_path):
  first = tmp_path / 'eight'
  launch_tiny(tmp_path, first, '(fsdp=True)', devices=8)
  reference = losses(first)
  assert sorted(os.listdir(first / 'checkpoints')) == ['3', '6']
  for devices, fsdp in ((4, True), (1, False)):
    resumed = tmp_path / f'resumed_{devices}'
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / 'checkpoints' / '6')
    (resumed / 'metrics.jsonl').write_text('')
    launch_tiny(tmp_path, resumed, f'(fsdp={fsdp})', devices=devices)
    continued = losses(resumed)
    assert sorted(continued) == [4, 5, 6]
    np.testing.assert_allclose([continued[s] for s in (4, 5, 6)],
                               [reference[s] for s in (4, 5, 6)], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  single = tmp_path / 'single'
  launch_tiny(tmp_path, single, '()')
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  pair = tmp_path / 'pair'
  processes = [launch_tiny(tmp_path, pair, '()', f'--coordinator_address=localhost:{port}',
                           '--num_processes=2', f'--process_id={i}', process=i)
               for i in range(2)]
  codes = [process.wait(timeout=900) for process in processes]
  assert codes == [0, 0], '\n\n'.join(
      f'process {i} (exit {code}):\n{(tmp_path / f"process_{i}.log").read_text()[-3000:]}'
      for i, code in enumerate(codes))
  both, one = losses(pair), losses(single)
  assert sorted(both) == sorted(one) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([both[s] for s in one], list(one.values()), rtol=1e-5)
  assert sorted(os.listdir(pair / 'checkpoints')) == ['3', '6']
