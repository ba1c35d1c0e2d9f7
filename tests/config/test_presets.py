"""Every preset constructs lazily, builds abstractly with its parameter count and round-trips
through JSON; the variant presets are their family at one variant."""

import importlib
import inspect
import subprocess
import sys

import fiddle as fdl
import jax
import pytest
from fiddle.experimental import serialization
from flax import nnx

from experiments import common
from lib import errors
from lib.config import REPO_ROOT, presets, values

PRESETS = [(path, name) for path in presets.preset_files()
           for name in presets.presets_of(importlib.import_module(presets.module_name(path)))]

# Network parameters of every preset at its defaults (a family function is its default variant).
# Published: DiT-S/2 33M, B/2 130M, L/2 458M, XL/2 675M (Peebles & Xie, Table 1; REPA adds only
# its projector, not counted here); DDT-XL/2 22en6de 675M; RAE's DiT-DH-XL 839M. MeanFlow's DiT
# adds a second time embedder (for t - r); LightningDiT's SwiGLU MLP and RMSNorm change the
# count slightly; LightningDDT adds the 2048-wide decoder.
PARAMETERS = {
    'experiments/dit.py': {'s2': 32_858_896, 'b2': 130_303_504, 'l2': 457_824_272,
                           'xl2': 674_816_272, 'dit': 674_816_272, 'digits': 1_272_324},
    'experiments/dit_repa.py': {'s2': 32_858_896, 'b2': 130_303_504, 'l2': 457_824_272,
                                'xl2': 674_816_272, 'dit_repa': 674_816_272},
    'experiments/meanflow.py': {'s2': 33_105_424, 'b2': 131_091_472, 'l2': 459_137_040,
                                'xl2': 676_440_592, 'meanflow': 676_440_592,
                                'digits': 1_321_732},
    'experiments/lightning_dit.py': {'s2': 32_972_944, 'b2': 130_531_600, 'l2': 458_120_176,
                                     'xl2': 675_219_856, 'lightning_dit': 675_219_856},
    'experiments/lightning_ddt.py': {'s2': 192_987_492, 'xl2': 834_433_380,
                                     'lightning_ddt': 834_433_380},
    'experiments/ddt.py': {'xl2': 674_646_352, 'ddt': 674_646_352},
    'experiments/rae.py': {'s1': 196_357_204, 'xl1': 838_380_628, 'rae': 838_380_628},
}


def test_every_preset_file_is_covered():
  assert ('experiments/dit.py', 'xl2') in PRESETS and ('experiments/dit.py', 'digits') in PRESETS
  assert sorted(PRESETS) == sorted((path, name) for path, names in PARAMETERS.items()
                                   for name in names)


@pytest.mark.parametrize('path,name', PRESETS)
def test_preset_constructs_builds_and_checks_abstractly(path, name):
  config = presets.load_preset(f'{path}:{name}')
  assert isinstance(config, fdl.Config)
  experiment = fdl.build(config)
  model = experiment.check_shapes()  # network, optimizer, REPA's projector, batch on devices
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  assert sum(x.size for x in leaves) == PARAMETERS[path][name]


@pytest.mark.parametrize('path,name', PRESETS)
def test_preset_json_round_trip(path, name):
  config = presets.load_preset(f'{path}:{name}')
  assert serialization.load_json(serialization.dump_json(config)) == config


@pytest.mark.slow
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


# ------------------------------------------------------------------------------- variants
@pytest.mark.parametrize('path,name', [(path, name) for path, name in PRESETS
                                       if name[-1].isdigit()])
def test_variant_preset_is_its_family_at_the_variant(path, name):
  module = importlib.import_module(presets.module_name(path))
  family = getattr(module, path.split('/')[-1].removesuffix('.py'))
  size, patch = name[:-1].upper(), name[-1]
  assert getattr(module, name)() == family(f'{size}/{patch}')
  assert presets.load_preset(f'{path}:{name}') == presets.load_preset(f'{path}:{family.__name__}'
                                                              f'(variant="{size}/{patch}")')


def test_variant_preset_takes_its_family_arguments_but_the_variant():
  from experiments import dit
  assert dit.b2.__name__ == 'b2' and dit.b2.__module__ == 'experiments.dit'
  assert list(inspect.signature(dit.b2).parameters) == ['image_size', 'data_dir']
  assert dit.b2(image_size=512) == dit.dit('B/2', image_size=512)
  config = presets.load_preset('experiments/dit.py:b2(image_size=512, data_dir="/data/in512")')
  assert (config.data.image_size, config.data.data_dir) == (512, '/data/in512')


def test_any_variant_of_the_size_table():
  config = presets.load_preset('experiments/dit.py:dit(variant="B/4")')
  assert (config.network.hidden_size, config.network.patch_size) == (768, 4)
  config = presets.load_preset('experiments/lightning_dit.py:lightning_dit(variant="1p0B/2")')
  assert (config.network.hidden_size, config.network.depth, config.network.num_heads) == \
      (1536, 24, 24)  # LightningDiT's own size table, beyond DiT's sizes
  assert common.decode_variant('XL/1', {'S': 0, 'XL': 0}) == ('XL', 1)
  for bad in ('XXL/2', 'XL', 'XL/0', 'XL/two'):
    with pytest.raises(errors.ConfigError, match=rf"variant='{bad}': expected SIZE/PATCH with "
                                                  'SIZE one of S, B, L, XL'):
      presets.load_preset(f'experiments/dit.py:dit(variant="{bad}")')


def test_digits_demos_are_the_digits_fiddler_on_their_family():
  from experiments import dit, fiddlers, meanflow
  demo = meanflow.meanflow('S/2')
  fiddlers.digits(demo, total_steps=300)
  assert demo == meanflow.digits(total_steps=300)
  # any DiT-shaped family moves onto the digits with --fiddler=digits
  config = presets.apply_fiddler(presets.load_preset('experiments/lightning_dit.py:s2'), 'digits')
  assert fdl.get_callable(config.data).__name__ == 'Digits' and config.network.depth == 4
  assert fdl.build(config).make_network is not None
  assert dit.digits().optimizer.b2 == 0.99 and meanflow.digits().optimizer.b2 == 0.95


def test_no_preset_names_a_machine_path():
  """Data folders, statistics and weights are the user's: a run without them stops naming the
  field to set."""
  for path, name in PRESETS:
    config = presets.load_preset(f'{path}:{name}')
    assert not [line for line in values.flat_lines(config) if '/mnt/' in line], (path, name)
  experiment = fdl.build(presets.load_preset('experiments/dit.py:s2'))
  with pytest.raises(errors.UserError, match='data.data_dir is not set; set it to a local path'):
    experiment.check()
