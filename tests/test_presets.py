"""Every preset constructs lazily, builds abstractly and round-trips through JSON."""

import importlib
import subprocess
import sys

import fiddle as fdl
import jax
import pytest
from fiddle.experimental import serialization
from flax import nnx

from lib.config import REPO_ROOT, presets

PRESETS = [(path, name) for path in presets.preset_files()
           for name in presets.presets_of(importlib.import_module(presets.module_name(path)))]

DIT_COUNTS = {'s2': 32_858_896, 'b2': 130_303_504, 'l2': 457_824_272, 'xl2': 674_816_272}


def test_every_preset_file_is_covered():
  assert ('experiments/dit.py', 'xl2') in PRESETS and ('experiments/dit.py', 'digits') in PRESETS


@pytest.mark.parametrize('path,name', PRESETS)
def test_preset_constructs_and_builds_abstractly(path, name):
  config = presets.load_preset(f'{path}:{name}')
  assert isinstance(config, fdl.Config)
  experiment = fdl.build(config)
  model = nnx.eval_shape(experiment.make_network)
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  count = sum(x.size for x in leaves)
  if path == 'experiments/dit.py' and name in DIT_COUNTS:
    assert count == DIT_COUNTS[name]
  assert count > 0


@pytest.mark.parametrize('path,name', PRESETS)
def test_preset_json_round_trip(path, name):
  config = presets.load_preset(f'{path}:{name}')
  assert serialization.load_json(serialization.dump_json(config)) == config


def test_config_paths_import_nothing_heavy_and_allocate_nothing():
  """Building presets and what `--print_config`, `--render` and `--diff_against` do with them
  (launch.py's own functions) import neither TensorFlow, CLU, orbax (tensorstore) nor torch,
  and allocate no array."""
  code = ('import contextlib, io, os, sys, tempfile\n'
          'from absl import flags\n'
          'import fiddle as fdl\n'
          'import launch\n'
          'from lib.config import presets\n'
          'dot = os.path.join(tempfile.mkdtemp(), "graph.dot")\n'
          'flags.FLAGS(["launch.py", "--render=" + dot, '
          '"--diff_against=experiments/dit.py:digits"])\n'
          'with contextlib.redirect_stdout(io.StringIO()) as out:\n'
          '  for spec in ["experiments/dit.py:xl2", "experiments/dit.py:digits"]:\n'
          '    config = presets.load_preset(spec)\n'
          '    launch.print_config(config, fdl.build(config))\n'
          '    assert launch.review_config(config) == 0\n'
          'assert "network parameters: 674,816,272" in out.getvalue(), out.getvalue()[-300:]\n'
          'assert os.path.getsize(dot) > 0\n'
          'heavy = [m for m in ("tensorflow", "clu", "orbax", "tensorstore", "torch") '
          'if m in sys.modules]\n'
          'assert not heavy, f"imported {heavy}"\n'
          'import jax; assert not jax.live_arrays(), jax.live_arrays()\n')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO_ROOT)


def test_presets_sample_at_their_best_guidance():
  """`--mode=sample` uses `sampler.guidance_scale`: the digits demo's is the guided scale its
  evaluation and grids measure; the ImageNet presets' are their families' published best."""
  from experiments import dit
  from lib.eval import actions

  config = presets.load_preset('experiments/dit.py:digits')
  quality, = [node for node in config.evaluate
              if fdl.get_callable(node) is actions.DigitsQuality]
  assert config.sampler.guidance_scale == dit.DIGITS_GUIDANCE == 3.0
  assert quality.guidance_scales == config.visualize.guidance_scales == (1.0, 3.0)
  expected = {  # preset file -> (guidance, interval)
      'dit.py': (1.5, None), 'lightning_dit.py': (1.5, None), 'lightning_ddt.py': (1.5, None),
      'dit_repa.py': (1.8, (0.0, 0.7)), 'ddt.py': (2.0, (0.0, 0.7)), 'meanflow.py': (1.0, None),
      'rae.py': (1.0, None)}
  for path, name in PRESETS:
    if name == 'digits':
      continue
    sampler = fdl.build(presets.load_preset(f'{path}:{name}').sampler)
    got = (sampler.guidance_scale, sampler.guidance_interval)
    want = expected.get(path.split('/')[-1], 'a new preset file: add its best guidance here')
    assert got == want, (path, name, got)
