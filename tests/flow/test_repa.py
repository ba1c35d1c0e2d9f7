"""REPA: the alignment loss, the networks' hidden tokens (sown block outputs, captured), the
checks of the experiment graph, and training with a trained projector and a frozen (random,
tiny) DINOv2 detector."""

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from experiments import common
from lib import checkpoint as ckpt
from lib import optim, train
from lib.config import presets
from lib.experiment import ConfigError
from lib.flow import objective, repa, sit
from lib.models import ddt, dinov2, dit, layers, lightning_ddt, lightning_dit
from lib.weights import dinov2 as dinov2_weights


def test_alignment_loss_is_minus_the_mean_token_cosine():
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  np.testing.assert_allclose(repa.alignment_loss(3.0 * target, target), [-1, -1], atol=1e-6)
  np.testing.assert_allclose(repa.alignment_loss(-target, target), [1, 1], atol=1e-6)
  projected = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  cosine = np.sum(np.asarray(projected) * np.asarray(target), -1) / (
      np.linalg.norm(projected, axis=-1) * np.linalg.norm(target, axis=-1))
  np.testing.assert_allclose(repa.alignment_loss(projected, target), -cosine.mean(-1),
                             rtol=1e-5)


def _inputs(size=8, channels=4):
  x = jax.random.normal(jax.random.key(1), (2, size, size, channels))
  return x, jnp.array([0.3, 0.7]), jnp.array([1, 2])


def _call(network, *args):
  return network(*args)


def _hidden(net, x, t, y, depth):
  """(output, tokens output by block `depth`) of one captured evaluation."""
  out, evaluations = layers.capture_block_outputs(_call, net, x, t, y)
  assert len(evaluations) == 1
  return out, evaluations[0][depth - 1]


def test_dit_hidden_tokens_are_the_last_blocks_output_before_the_head():
  make = lambda: dit.DiT(8, 4, 10, patch_size=2, hidden_size=32, depth=3, num_heads=2,
                         rngs=nnx.Rngs(0))
  net = make()
  for block in net.blocks:  # non-zero gates, so every block changes the tokens
    block.adaLN_modulation.kernel[...] = 0.1 * jax.random.normal(
        jax.random.key(2), block.adaLN_modulation.kernel.shape)
  net.final_layer.linear.kernel[...] = 0.1 * jnp.ones(net.final_layer.linear.kernel.shape)
  x, t, y = _inputs()
  out, hidden = _hidden(net, x, t, y, 3)
  np.testing.assert_array_equal(out, net(x, t, y))
  c = net.t_embedder(t) + net.y_embedder(y)
  head = dit.layers.unpatchify(net.final_layer(hidden, c), 2, 4)
  np.testing.assert_allclose(head, out, atol=1e-5)
  _, first = _hidden(net, x, t, y, 1)
  assert first.shape == (2, 16, 32) and not np.allclose(first, hidden)
  shapes = objective.block_output_shapes(make, (8, 8, 4))
  with pytest.raises(ValueError, match=r'repa.depth=4: the network has blocks 1\.\.3'):
    repa.REPA(detector=None, depth=4).trainables(shapes)
  assert 'block_outputs' not in nnx.state(net)  # nothing is stored outside a capture


@pytest.mark.parametrize('make', [
    lambda: lightning_dit.LightningDiT(8, 4, 10, patch_size=2, hidden_size=32, depth=2,
                                       num_heads=2, rngs=nnx.Rngs(0)),
    lambda: lightning_ddt.LightningDDT(8, 4, 10, patch_size=2, encoder_hidden_size=32,
                                       encoder_num_heads=2, num_encoder_blocks=2,
                                       decoder_hidden_size=48, decoder_num_heads=2,
                                       num_decoder_blocks=1, rngs=nnx.Rngs(0)),
])
def test_lightning_networks_return_hidden_tokens_of_any_block(make):
  net = make()
  x, t, y = _inputs()
  plain = net(x, t, y)
  widths = []
  for depth in (1, 2, 3) if isinstance(net, lightning_ddt.LightningDDT) else (1, 2):
    out, hidden = _hidden(net, x, t, y, depth)
    np.testing.assert_array_equal(out, plain)
    widths.append(hidden.shape[-1])
    assert hidden.shape[:2] == (2, 16)
  if isinstance(net, lightning_ddt.LightningDDT):
    assert widths == [32, 32, 48]  # encoder blocks, then the decoder's


def test_ddt_hidden_tokens_are_its_encoder_then_decoder_block_outputs():
  net = ddt.DDT(8, 4, 10, patch_size=2, hidden_size=32, num_heads=2, num_blocks=3,
                num_encoder_blocks=2, rngs=nnx.Rngs(0))
  net.final_layer.linear.kernel[...] = 0.1 * jnp.ones(net.final_layer.linear.kernel.shape)
  x, t, y = _inputs()
  out, evaluations = layers.capture_block_outputs(_call, net, x, t, y)
  np.testing.assert_array_equal(out, net(x, t, y))
  (outputs,) = evaluations
  assert [tuple(h.shape) for h in outputs] == [(2, 16, 32)] * 3
  s = net.encode(x, t, y)  # silu(t_emb + the last encoder block's output)
  t_emb = net.t_embedder(t)[:, None]
  np.testing.assert_allclose(s, nnx.silu(t_emb + outputs[1]), atol=1e-6)
  head = layers.unpatchify_cpq(net.final_layer(outputs[2], s), 2, 8, 8)
  np.testing.assert_allclose(head, out, atol=1e-5)


def test_an_interface_that_evaluates_the_network_twice_is_refused():
  """The capture counts evaluations: a loss that calls the network twice cannot be aligned."""
  net = dit.DiT(8, 4, 10, patch_size=2, hidden_size=32, depth=2, num_heads=2, rngs=nnx.Rngs(0))

  class Twice(sit.SiT):
    def loss(self, network, x, y, key, rngs=None):
      first, aux = super().loss(network, x, y, key, rngs=rngs)
      return first + super().loss(network, x, y, key, rngs=rngs)[0], aux

  x, _, y = _inputs()
  aligned = objective.Objective(Twice(), terms=(repa.REPA(detector=None, depth=1),))
  with pytest.raises(ValueError, match='Twice.loss evaluated the network 2 times'):
    aligned.loss(net, {}, (None,), x, {'label': y}, jax.random.key(0))


# ------------------------------------------------------------------------------- graph checks
def _tiny_config(tmp_path, weights_path=None) -> fdl.Config:
  """DiT (hidden 32, 2 blocks, patch 4) on 16x16 RGB JPEGs in pixel space: 16 tokens, aligned
  at block 1 with a 2-block, 32-wide random DINOv2 at resolution 56 (16 patch features)."""
  config = presets.load_preset('experiments/dit_repa.py:s2')
  config.data = fdl.Config(common.images.ImageFolder, data_dir=str(tmp_path / 'images'),
                           image_size=16, batch_size=8, num_classes=3, num_parallel_reads=1)
  config.encoder = common.pixel_encoder()
  config.network.patch_size = 4
  config.network.hidden_size = 32
  config.network.depth = 2
  config.network.num_heads = 2
  config.repa.depth = 1
  config.repa.projector_dim = 64
  config.repa.detector.size = 'tiny'
  config.repa.detector.resolution = 56
  config.repa.detector.weights_path = weights_path
  config.optimizer.learning_rate = 1e-3
  config.sampler = common.euler(4)
  config.sharding = common.replicated()
  config.visualize = None
  config.evaluate = []
  config.total_steps = 4
  config.checkpoint.save_interval_steps = 2
  config.log_every_steps = 1
  return config


@pytest.fixture
def tiny_dinov2(monkeypatch, tmp_path):
  """A random 2-block, 32-wide DINOv2 saved as a torch-hub state dict (.npz)."""
  monkeypatch.setitem(dinov2.SIZES, 'tiny', dict(hidden_size=32, depth=2, num_heads=2))
  model = dinov2.DINOv2ViT(hidden_size=32, depth=2, num_heads=2, rngs=nnx.Rngs(3))
  path = tmp_path / 'dinov2_tiny.npz'
  np.savez(path, **dinov2_weights.export_hub_state_dict(nnx.state(model, nnx.Param)))
  return str(path)


@pytest.fixture
def image_tree(tmp_path):
  rng = np.random.default_rng(0)
  for c in range(3):
    folder = tmp_path / 'images' / 'train' / f'n{c:03d}'
    folder.mkdir(parents=True)
    for i in range(6):
      y, x = np.mgrid[:20, :20]
      base = np.stack([x * 12, y * 12, np.full_like(x, 60 * c + 10 * i)], -1)
      pixels = np.clip(base + rng.integers(0, 30, base.shape), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(folder / f'{i}.JPEG', quality=95)
  return tmp_path


def test_repa_needs_pixels_matching_tokens_and_a_single_evaluation_interface(tmp_path,
                                                                             tiny_dinov2):
  config = _tiny_config(tmp_path)
  fdl.build(config)  # consistent
  bad = _tiny_config(tmp_path)
  bad.network.patch_size = 2
  with pytest.raises(ConfigError, match=r'network sees 64 tokens .*patch_size=2.* gives 16 '
                                        r'patch features \(resolution=56\)'):
    fdl.build(bad)
  latents = presets.load_preset('experiments/dit_repa.py:b2')
  latents.data = common.imagenet_latents(256)
  with pytest.raises(ConfigError, match="data must yield pixels.*'posterior'"):
    fdl.build(latents)
  meanflow = _tiny_config(tmp_path)
  meanflow.interface = common.meanflow_interface()
  meanflow.network.take_dt = True
  with pytest.raises(ConfigError, match='MeanFlow evaluates it inside jax.jvp'):
    fdl.build(meanflow)


def test_presets_align_the_papers_blocks_with_dinov2_b_at_224():
  for name, depth in (('s2', 4), ('b2', 4), ('l2', 8), ('xl2', 8)):
    experiment = fdl.build(presets.load_preset(f'experiments/dit_repa.py:{name}'))
    assert experiment.repa.depth == depth
    assert experiment.repa.detector.num_tokens == 256 == (experiment.latent_shape[0] // 2) ** 2
    assert experiment.repa.detector.feature_dim == 768
  big = fdl.build(presets.load_preset('experiments/dit_repa.py:xl2(image_size=512)'))
  assert big.repa.detector.resolution == 448 and big.repa.detector.num_tokens == 1024


# ------------------------------------------------------------------------------- training
def _steps(run, experiment, count):
  batches = experiment.data.batches(0, 0, 1)
  history = []
  for _ in range(count):
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    run.state, metrics = run._train_step(run.state, run.encoder_state, batch,
                                         run.objective_state)
    history.append(jax.device_get(metrics))
  return history


def test_repa_trains_the_projector_and_aligns(image_tree, tiny_dinov2):
  experiment = fdl.build(_tiny_config(image_tree, tiny_dinov2))
  run = train.Run(experiment, str(image_tree / 'run'))
  run.load_encoder()
  run.load_objective()
  run.state = run.initial_state()
  projector0 = jax.device_get(run.state['projector'])
  assert jax.tree.structure(run.state['ema']) == jax.tree.structure(run.state['params'])
  history = _steps(run, experiment, 40)
  alignment = [h['repa_loss'] for h in history]
  total = [h['loss'] for h in history]
  assert all(np.isfinite(total))
  np.testing.assert_allclose(
      total, [h['diffusion_loss'] + 0.5 * h['repa_loss'] for h in history], rtol=1e-5)
  assert np.mean(alignment[-5:]) < np.mean(alignment[:5]) - 0.05, alignment
  images = next(experiment.data.eval_batches(4))['image']
  np.testing.assert_array_equal(run.reconstruct(images), images)  # pixel space: exact
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), projector0,
                       jax.device_get(run.state['projector']))
  assert min(jax.tree.leaves(moved)) > 0  # every projector array is trained


def _sgd_run(image_tree, tiny_dinov2, coefficient: float, network=None):
  """(run at its initial state, experiment) of the tiny REPA config with `repa.coefficient`
  and plain SGD, so that updates are proportional to the gradients; `network` replaces the
  config's."""
  config = _tiny_config(image_tree, tiny_dinov2)
  if network is not None:
    config.network = network
  config.repa.coefficient = coefficient
  config.optimizer = fdl.Partial(optim.sgd, learning_rate=0.1)
  experiment = fdl.build(config)
  run = train.Run(experiment, str(image_tree / 'run'))
  run.load_encoder()
  run.load_objective()
  run.state = run.initial_state()
  return run, experiment


def test_alignment_gradient_reaches_the_network(image_tree, tiny_dinov2):
  updated = []
  for coefficient in (0.0, 0.5):
    run, experiment = _sgd_run(image_tree, tiny_dinov2, coefficient)
    _steps(run, experiment, 1)
    updated.append(jax.device_get(run.state['params']['x_embedder']['proj']['kernel'][...]))
  assert np.abs(updated[0] - updated[1]).max() > 1e-6


@pytest.mark.slow
def test_repa_aligns_the_condition_encoder_of_a_ddt(image_tree, tiny_dinov2):
  """MCG-NJU DDT (2 blocks, 1 in the condition encoder), block 1 aligned: the projector is
  sized from its tokens and trained, and the alignment gradient reaches the encoder's patch
  embedding (`s_embedder`)."""
  updated = []
  network = fdl.Partial(ddt.DDT, patch_size=4, hidden_size=32, num_heads=2, num_blocks=2,
                        num_encoder_blocks=1)
  for coefficient in (0.0, 0.5):
    run, experiment = _sgd_run(image_tree, tiny_dinov2, coefficient, network)
    assert run.state['projector']['fc1']['kernel'].shape == (32, 64)
    projector0 = jax.device_get(run.state['projector'])
    (metrics,) = _steps(run, experiment, 1)
    np.testing.assert_allclose(metrics['loss'],
                               metrics['diffusion_loss'] + coefficient * metrics['repa_loss'],
                               rtol=1e-5)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), projector0,
                         jax.device_get(run.state['projector']))
    assert (min(jax.tree.leaves(moved)) > 0) == (coefficient > 0)
    updated.append(jax.device_get(run.state['params']['s_embedder']['proj']['kernel'][...]))
  assert np.abs(updated[0] - updated[1]).max() > 1e-6


def test_repa_run_checkpoints_the_projector_and_resumes(image_tree, tiny_dinov2):
  workdir = str(image_tree / 'run')
  experiment = fdl.build(_tiny_config(image_tree, tiny_dinov2))
  assert train.train(experiment, workdir) == 4
  run = train.Run(experiment, workdir)
  manager = experiment.checkpoint.manager(workdir)
  assert run.restore(manager) == 4
  manager.close()
  assert set(run.state) == {'step', 'params', 'opt_state', 'ema', 'buffers', 'projector'}
  assert run.state['projector']['fc3']['kernel'].shape == (64, 32)
  assert ckpt.latest_step(workdir) == 4
