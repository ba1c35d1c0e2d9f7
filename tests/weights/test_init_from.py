"""Imported weights carry their fixed arrays through the state, checkpoints and resumes."""

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib import checkpoint as ckpt
from lib import errors
from lib.config import overrides, presets
from lib.train import Run


def test_imported_fixed_arrays_replace_the_constructors_and_survive_a_checkpoint(tmp_path):
  config = presets.load_preset('experiments/dit.py:digits')
  for assignment in ['network.hidden_size=16', 'network.depth=1', 'network.num_heads=2']:
    overrides.apply_override(config, assignment)
  experiment = fdl.build(config)
  run = Run(experiment, str(tmp_path))
  model = experiment.make_network(seed=3)
  weights = nnx.state(model)  # Params and the fixed position table, as an importer returns
  weights['pos_embed'] = weights['pos_embed'].replace(jnp.full_like(model.pos_embed[...], 0.25))
  run.state = run.imported_state(weights)
  np.testing.assert_array_equal(run.state['buffers']['pos_embed'][...], 0.25)
  for a, b in zip(jax.tree.leaves(run.state['params']),
                  jax.tree.leaves(nnx.state(model, nnx.Param))):
    np.testing.assert_array_equal(a, b)
  manager = experiment.checkpoint.manager(str(tmp_path))
  ckpt.save(manager, 1, run.state, force=True)
  manager.wait_until_finished()
  resumed = Run(experiment, str(tmp_path))
  assert resumed.restore(manager) == 1
  manager.close()
  np.testing.assert_array_equal(resumed.state['buffers']['pos_embed'][...], 0.25)


def test_init_from_a_missing_file_names_the_field(tmp_path):
  config = presets.load_preset('experiments/dit.py:digits')
  for assignment in ['network.hidden_size=16', 'network.depth=1', 'network.num_heads=2']:
    overrides.apply_override(config, assignment)
  config.init_from = str(tmp_path / 'missing.pt')
  experiment = fdl.build(config)
  run = Run(experiment, str(tmp_path))
  manager = experiment.checkpoint.manager(str(tmp_path))
  with pytest.raises(errors.UserError, match=r"init_from='.*missing\.pt' is not a file"):
    run.restore_or_init(manager)
  manager.close()
