"""Every value a constructor rejects is a ConfigError naming its field before the workdir is
touched: the network's sizes (`Experiment.check_shapes`, abstractly), the optimizer, the batch
split over the devices; through launch.py one `error:` line, exit 2, no workdir."""

import copy
import os

import fiddle as fdl
import pytest

from lib import errors
from lib.config import presets
from lib.models import ddt, dit, lightning_ddt, lightning_dit
from tests.conftest import DIGITS, TINY_FLAGS, launch, tiny_digits

# Each family small enough for the digits (8x8x1 latents), as it is configured in a preset;
# and its names for the generic fields: (width, heads, blocks).
FAMILIES = {
    'DiT': (fdl.Partial(dit.DiT, hidden_size=32, depth=1, num_heads=2),
            ('hidden_size', 'num_heads', 'depth')),
    'LightningDiT': (fdl.Partial(lightning_dit.LightningDiT, hidden_size=32, depth=1,
                                 num_heads=2),
                     ('hidden_size', 'num_heads', 'depth')),
    'LightningDDT': (fdl.Partial(lightning_ddt.LightningDDT, encoder_hidden_size=32,
                                 encoder_num_heads=2, num_encoder_blocks=1,
                                 decoder_hidden_size=32, decoder_num_heads=2,
                                 num_decoder_blocks=1, freq_embed_size=64),
                     ('encoder_hidden_size', 'decoder_num_heads', 'num_decoder_blocks')),
    'DDT': (fdl.Partial(ddt.DDT, hidden_size=32, num_heads=2, num_blocks=2,
                        num_encoder_blocks=1),
            ('hidden_size', 'num_heads', 'num_blocks')),
}

# (field: generic name or a network argument, value, the message after `network.FIELD=VALUE`)
BAD_SIZES = [
    ('heads', 3, r' must divide \w*hidden_size=32'),
    ('heads', 0, '; expected a positive number'),
    ('width', 0, '; expected a positive number'),
    ('width', -1, '; expected a positive number'),
    ('mlp_ratio', -1.0, '; expected a number > 0'),
    ('blocks', 0, '; expected a positive number'),
    ('blocks', -2, '; expected a positive number'),
    ('class_dropout_prob', 1.5, r'; expected a number in \[0, 1\]'),
    ('class_dropout_prob', -0.1, r'; expected a number in \[0, 1\]'),
    ('patch_size', 3, ' does not divide the latent size 8'),
]


def digits_with(network: fdl.Partial, **changes) -> fdl.Config:
  """The tiny digits config with a copy of `network`, changed."""
  config = tiny_digits()
  config.network = copy.deepcopy(network)
  for name, value in changes.items():
    setattr(config.network, name, value)
  return config


@pytest.mark.parametrize('field,value,message', BAD_SIZES)
@pytest.mark.parametrize('family', FAMILIES)
def test_each_bad_network_size_is_a_config_error_naming_the_field(family, field, value,
                                                                  message):
  network, (width, heads, blocks) = FAMILIES[family]
  name = dict(width=width, heads=heads, blocks=blocks).get(field, field)
  config = digits_with(network, **{name: value})
  with pytest.raises(errors.ConfigError, match=rf'^network\.{name}={value}{message}'):
    presets.build(config).check_shapes()


@pytest.mark.parametrize('family', FAMILIES)
def test_sizes_at_the_edges_of_their_ranges_pass(family):
  network, _ = FAMILIES[family]
  config = digits_with(network, mlp_ratio=0.5, class_dropout_prob=1.0)
  model = presets.build(config).check_shapes()
  assert model.y_embedder.dropout_prob == 1.0


def test_rope_heads_dropout_rates_dtype_and_table_width_name_the_field():
  network = FAMILIES['LightningDiT'][0]
  with pytest.raises(errors.ConfigError, match=r'^network\.num_heads=4 gives hidden_size / '
                     'num_heads = 6 channels a head; 2-D RoPE needs a multiple of 4'):
    presets.build(digits_with(network, hidden_size=24, num_heads=4)).check_shapes()
  with pytest.raises(errors.ConfigError,
                     match=r'^network\.attn_w_dropout=1\.0; expected a number in \[0, 1\)'):
    presets.build(digits_with(network, attn_w_dropout=1.0)).check_shapes()
  with pytest.raises(errors.ConfigError, match=r"^network \(LightningDiT\): .*'float17'"):
    presets.build(digits_with(network, dtype='float17')).check_shapes()
  with pytest.raises(errors.ConfigError, match=r'^network\.hidden_size=30 must be a multiple '
                     r'of 4 \(the 2-D sin-cos position table\)'):
    presets.build(digits_with(FAMILIES['DiT'][0], hidden_size=30, num_heads=3)).check_shapes()


def test_optimizer_values_are_checked_with_the_network():
  config = tiny_digits('optimizer.learning_rate=-0.001')
  with pytest.raises(errors.ConfigError,
                     match=r'^optimizer\.learning_rate=-0\.001; expected a number >= 0'):
    presets.build(config).check_shapes()
  config = tiny_digits('optimizer.grad_clip_norm=0.0')
  with pytest.raises(errors.ConfigError, match=r'^optimizer\.grad_clip_norm=0\.0; expected'):
    presets.build(config).check_shapes()


def test_constructor_errors_of_built_nodes_name_their_path_once():
  # messages that name their node already (`ema.decay=...`) are not prefixed again
  with pytest.raises(errors.ConfigError, match=r'^ema\.decay=1\.5; expected 0 <= decay < 1'):
    presets.build(tiny_digits('ema.decay=1.5'))
  with pytest.raises(errors.ConfigError, match=r'^sampler\.num_steps=0; expected'):
    presets.build(tiny_digits('sampler.num_steps=0'))


def test_the_range_checks_name_the_value_and_the_range():
  errors.check_in_range(0, 1, p=0, q=1.0)
  errors.check_divides(num_heads=4, hidden_size=32)
  with pytest.raises(ValueError, match=r'^p=nan; expected a number in \[0, 1\]$'):
    errors.check_in_range(0, 1, p=float('nan'))
  with pytest.raises(ValueError, match=r'^r=0; expected a number > 0$'):
    errors.check_in_range(0, open_low=True, r=0)
  with pytest.raises(ValueError, match=r'^d=1; expected a number in \[0, 1\)$'):
    errors.check_in_range(0, 1, open_high=True, d=1)
  with pytest.raises(ValueError, match=r'^heads=0; expected a positive number'):
    errors.check_divides(heads=0, width=32)
  assert str(errors.at_node('network', 'DiT', 'depth=0; x')) == 'network.depth=0; x'
  assert str(errors.at_node('network', 'DiT', 'a sentence')) == 'network (DiT): a sentence'
  assert str(errors.at_node('', 'Experiment', 'seed=-1')) == 'seed=-1'


@pytest.mark.slow
def test_bad_sizes_and_an_indivisible_batch_exit_2_before_the_workdir_exists(tmp_path):
  eight_devices = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  cases = [  # (flags, environment, the start of the error line)
      (('--fdl_set=network.num_heads=3',), {}, 'network.num_heads=3 must divide hidden_size=32'),
      (('--fdl_set=network.depth=-2',), {}, 'network.depth=-2; expected a positive number'),
      (('--fdl_set=network.class_dropout_prob=1.5', '--mode=sample'), {},
       'network.class_dropout_prob=1.5; expected a number in [0, 1]'),
      (('--fdl_set=data.batch_size=15',), eight_devices,
       'data.batch_size=15 must be divisible by the 8 devices the batch is split over'),
  ]
  for i, (flags, env, message) in enumerate(cases):
    workdir = tmp_path / f'run{i}'
    result = launch(DIGITS, f'--workdir={workdir}', *TINY_FLAGS, *flags, env=env)
    lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f'error: {message}'), lines
    assert 'Traceback' not in result.stderr
    assert not os.path.exists(workdir), os.listdir(workdir)
