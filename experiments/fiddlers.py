"""Fiddlers: named changes that apply to any experiment, given on the command line.

    python launch.py --fdl_config=experiments/dit.py:digits --fiddler=tiny --workdir=/tmp/smoke
    python launch.py --fdl_config=experiments/lightning_dit.py:xl2 --fiddler=bf16 --print_config
    python launch.py --fdl_config=experiments/dit.py:b2 --fiddler='tiny(total_steps=40)' ...
    python launch.py --fdl_config=experiments/lightning_dit.py:s2 --fiddler=digits --workdir=...

A fiddler is a function `fiddler(config, **literals)` that changes the config in place (or
returns a new one), as in Fiddle. `launch.py` applies `--fiddler`s in order after the preset,
then `--fdl_tags_set`, then `--fdl_set` (Fiddle's order), so an override refines what a fiddler
set. A bare name is looked up here; `--fiddler=FILE.py:NAME` or `--fiddler=package.module:NAME`
names a fiddler elsewhere. Fiddle's history records each change with the `--fiddler` flag as
its location, so `--print_config --provenance` shows it.
"""

import inspect

import fiddle as fdl

from experiments import common
from lib import hooks, optim
from lib.config import overrides

# Network arguments and their tiny values, set wherever the network class takes them (DiT,
# LightningDiT, DDT: hidden_size/num_heads/depth or num_blocks; LightningDDT: encoder_* and
# decoder_*).
TINY_NETWORK = {
    'hidden_size': 64, 'num_heads': 2, 'depth': 2, 'num_blocks': 3,
    'encoder_hidden_size': 64, 'encoder_num_heads': 2, 'num_encoder_blocks': 2,
    'decoder_hidden_size': 64, 'decoder_num_heads': 2, 'num_decoder_blocks': 1,
}


def _set_taken(node: fdl.Buildable, values: dict) -> None:
  """Sets the entries of `values` that are arguments of `node`'s callable."""
  parameters = inspect.signature(fdl.get_callable(node)).parameters
  for name, value in values.items():
    if name in parameters:
      setattr(node, name, value)


def tiny(config: fdl.Buildable, total_steps: int = 20, batch_size: int = 8) -> None:
  """Shrinks an experiment for a CPU smoke test of its whole structure: a 64-wide network of
  2 blocks (REPA aligned at block 1 through a 64-wide projector), `batch_size` examples per
  step, `total_steps` steps, at most 4 sampling steps, a trace of steps 2-3, and checkpoints,
  grids (4 samples) and evaluations (16 samples) twice in the run. Data, encoder and
  detector, and their files, stay as they are."""
  every = max(1, total_steps // 2)
  _set_taken(config.network, TINY_NETWORK)
  if config.repa is not None:
    config.repa.depth = 1
    config.repa.projector_dim = 64
  config.data.batch_size = batch_size
  config.total_steps = total_steps
  config.log_every_steps = 1
  config.sampler.num_steps = min(config.sampler.num_steps, 4)
  config.checkpoint.save_interval_steps = every
  config.report.every_steps = every
  if config.profile is not None:
    _set_taken(config.profile, {'first_profile': 1, 'num_profile_steps': 2,
                                'profile_duration_ms': None})  # ends within the run
  if config.visualize is not None:
    config.visualize.every_steps = every
    config.visualize.num_samples = 4
  for evaluation in config.evaluate:
    _set_taken(evaluation, {'every_steps': every, 'num_samples': 16, 'batch_size': 16})
    if 'all_eval_samples_nums' in inspect.signature(fdl.get_callable(evaluation)).parameters:
      scales = len(evaluation.all_guidance_scales)
      evaluation.all_eval_samples_nums = ((16,),) * scales
      evaluation.eval_every_steps = ((every,),) * scales


def digits(config: fdl.Buildable, total_steps: int = 2000) -> None:
  """Moves an experiment of a DiT-shaped network (`hidden_size`, `depth`, `num_heads`: DiT,
  LightningDiT) onto scikit-learn's bundled 8x8 digits in pixel space, the CPU demo (minutes):
  a 128-wide network of 4 blocks and 4 heads, batch 128, AdamW at lr 1e-3 with gradient norms
  clipped at 1 and a cosine schedule (200 warmup steps, down to 1e-5), the validation loss every
  500 steps in place of the evaluations, EMA 0.995, checkpoints every 500 steps (2 kept),
  100-sample grids every 1000 steps, `total_steps` steps. The family's objective, sampler and
  Adam b2 stay as they are."""
  config.data = common.digits_data(batch_size=128, image_size=8)
  config.encoder = common.pixel_encoder()
  config.network.hidden_size = 128
  config.network.depth = 4
  config.network.num_heads = 4
  config.optimizer.learning_rate = 1e-3
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.schedule = fdl.Partial(optim.cosine, warmup_steps=200, min_lr=1e-5)
  config.evaluate = [fdl.Config(hooks.ValidationLoss, every_steps=500, batch_size=256)]
  config.total_steps = total_steps
  services = common.run_services(save_every_steps=500, max_to_keep=2, keep_period=None,
                                 log_every_steps=100)
  for name, node in services.items():
    setattr(config, name, node)
  config.ema.decay = 0.995
  config.visualize.every_steps = 1000
  config.visualize.num_samples = 100


def bf16(config: fdl.Buildable) -> None:
  """Computes in bfloat16 wherever a node takes a `dtype` (the network, and the RAE encoder
  and DINOv2 detector when present); parameters, optimizer state and EMA stay float32."""
  for node in overrides.nodes(config):
    _set_taken(node, {'dtype': 'bfloat16'})
