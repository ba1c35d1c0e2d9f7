"""The training loop: a jitted NNX train step driven by CLU writers and periodic actions.

State carried between steps (and checkpointed) is a pytree
    {'step': int32, 'params': nnx.State, 'opt_state': optax state, 'ema': EMA state}.
Fixed arrays of the network (position tables) and the encoder's frozen weights are
passed to the jitted functions as arguments, never baked in as constants.

Every random draw of step k comes from `fold_in(key(seed), k)`, and the data position
is a function of k, so a run resumed from the checkpoint of step k continues exactly
as the uninterrupted run would have.
"""

import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lib import checkpoint as ckpt
from lib import hooks
from lib.experiment import Experiment


class Run:
  """An `Experiment` bound to a workdir and to this process's devices."""

  def __init__(self, experiment: Experiment, workdir: str):
    self.experiment = exp = experiment
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.total_steps = exp.total_steps
    self.num_classes = exp.data.num_classes
    self.mesh = jax.make_mesh((jax.device_count(),), ('data',),
                                 axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P('data'))
    if exp.data.batch_size % jax.device_count():
      raise ValueError(f'data.batch_size={exp.data.batch_size} is not divisible by the '
                       f'{jax.device_count()} devices; use a multiple of {jax.device_count()}')
    self.optimizer = exp.make_optimizer()
    abstract_model = nnx.eval_shape(exp.make_network)
    self.graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    self.param_count = sum(x.size for x in jax.tree.leaves(abstract_params))
    self.key = jax.random.key(exp.seed)
    self.writer = None
    self.state = None
    self._train_step = jax.jit(self._step, donate_argnums=0)
    self._generate = jax.jit(self._sample, static_argnames='guidance_scale')
    self._loss = jax.jit(self._eval_loss)

  # ----------------------------------------------------------------------------- state
  def _create(self):
    model = self.experiment.make_network()
    _, params, buffers = nnx.split(model, nnx.Param, ...)
    state = {'step': jnp.zeros((), jnp.int32), 'params': params,
             'opt_state': self.optimizer.tx.init(params),
             'ema': self.experiment.ema.init(params)}
    return state, buffers

  def initial_state(self):
    """Fresh (state, buffers), created on the devices in their final sharding."""
    return jax.jit(self._create, out_shardings=self.replicated)()

  def make_buffers(self):
    """Only the network's fixed arrays (the parameter initialisation is compiled away)."""
    return jax.jit(lambda: self._create()[1], out_shardings=self.replicated)()

  def abstract_state(self):
    state, _ = jax.eval_shape(self._create)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
                        state)

  def load_encoder(self):
    self.encoder_state = jax.device_put(self.experiment.encoder.load(), self.replicated)

  def network(self, params, buffers) -> nnx.Module:
    return nnx.merge(self.graphdef, params, buffers)

  # ----------------------------------------------------------------------------- jitted
  def _step(self, state, buffers, encoder_state, batch):
    exp = self.experiment
    key = jax.random.fold_in(self.key, state['step'])
    encode_key, loss_key, dropout_key = jax.random.split(key, 3)
    x = exp.encoder.encode(encoder_state, batch['image'], encode_key)

    def loss_fn(params):
      rngs = nnx.Rngs(label_dropout=dropout_key, dropout=jax.random.fold_in(dropout_key, 1))
      per_sample, aux = exp.interface.loss(self.network(params, buffers), x, batch['label'],
                                           loss_key, rngs=rngs)
      return per_sample.mean(), aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = self.optimizer.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'learning_rate': self.optimizer.schedule(state['step']), **aux}
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state,
                 'ema': exp.ema.update(state['ema'], params, state['step'])}
    return new_state, metrics

  def _sample(self, params, buffers, encoder_state, noise, labels, guidance_scale):
    exp = self.experiment
    latents = exp.sampler(exp.interface, self.network(params, buffers), noise, labels,
                          guidance_scale=guidance_scale)
    return exp.encoder.decode(encoder_state, latents)

  def _eval_loss(self, params, buffers, encoder_state, batch, key):
    exp = self.experiment
    encode_key, loss_key = jax.random.split(key)
    x = exp.encoder.encode(encoder_state, batch['image'], encode_key)
    per_sample, _ = exp.interface.loss(self.network(params, buffers), x, batch['label'], loss_key)
    return per_sample.sum()

  # ----------------------------------------------------------------------------- services for hooks
  def ema_params(self):
    return self.experiment.ema.weights(self.state['ema'])

  def generate(self, labels: np.ndarray, guidance_scale: float, seed: int = 0,
               params=None, batch_size: int = 256) -> np.ndarray:
    """uint8 images (N, H, W, C) for `labels` from the EMA weights (or `params`)."""
    params = self.ema_params() if params is None else params
    key = jax.random.key(seed)
    out = []
    for start in range(0, len(labels), batch_size):
      chunk = jnp.asarray(labels[start:start + batch_size], jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(key, start),
                                (len(chunk), *self.experiment.latent_shape))
      out.append(np.asarray(self._generate(params, self.buffers, self.encoder_state, noise,
                                           chunk, guidance_scale=float(guidance_scale))))
    return np.concatenate(out)

  def validation_loss(self, batch_size: int, seed: int) -> dict[str, float]:
    """Mean held-out loss of the EMA and of the trained weights, fixed noise and times."""
    totals = {'eval/loss_ema': 0.0, 'eval/loss': 0.0}
    count = 0
    for i, batch in enumerate(self.experiment.data.eval_batches(batch_size)):
      key = jax.random.fold_in(jax.random.key(seed), i)
      totals['eval/loss_ema'] += float(self._loss(self.ema_params(), self.buffers,
                                                  self.encoder_state, batch, key))
      totals['eval/loss'] += float(self._loss(self.state['params'], self.buffers,
                                              self.encoder_state, batch, key))
      count += len(batch['label'])
    return {k: v / count for k, v in totals.items()}

  # ----------------------------------------------------------------------------- loop
  def restore_or_init(self, manager):
    """Newest checkpoint in the workdir if there is one, else a fresh state."""
    if manager.latest_step() is None:
      self.state, self.buffers = self.initial_state()
      return 0
    self.buffers = self.make_buffers()
    step, self.state = ckpt.restore(manager, self.abstract_state())
    logging.info('Resumed from the checkpoint of step %d in %s', step, self.workdir)
    return step

  def train(self) -> int:
    """Trains to `total_steps`, or until a SIGTERM (preemption), after which it saves a
    checkpoint and returns. Returns the last step reached."""
    preempted = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(time.time()))
    try:
      return self._train(preempted)
    finally:
      signal.signal(signal.SIGTERM, previous_handler)

  def _train(self, preempted: list) -> int:
    exp = self.experiment
    exp.data.check()
    self.load_encoder()
    manager = exp.checkpoint.manager(self.workdir)
    self.writer = exp.writers.create(self.workdir, self.is_main)
    try:
      step = self.restore_or_init(manager)
      if self.is_main:
        logging.info('Network: %s parameters; training steps %d -> %d', f'{self.param_count:,}',
                     step, self.total_steps)
      actions = [exp.report.action(self)]
      actions += [hook.action(self) for hook in (exp.profile, exp.visualize) if hook is not None]
      actions += [hook.action(self) for hook in exp.evaluate]
      batches = exp.data.batches(step, jax.process_index(), jax.process_count())
      pending = []
      while step < self.total_steps and not preempted:
        batch = {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                 for k, v in next(batches).items()}
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          self.state, metrics = self._train_step(self.state, self.buffers, self.encoder_state,
                                                 batch)
        step += 1
        pending.append(metrics)
        if step % exp.log_every_steps == 0 or step == self.total_steps:
          self._write_metrics(step, pending)
          pending = []
        if ckpt.save(manager, step, self.state, force=step == self.total_steps):
          self.writer.flush()  # the metrics log never lags behind the newest checkpoint
        for action in actions:
          action(step)
      if preempted and manager.latest_step() != step:
        logging.warning('SIGTERM: saving the checkpoint of step %d before exiting', step)
        ckpt.save(manager, step, self.state, force=True)
      if exp.visualize is not None and step == self.total_steps and \
          step % exp.visualize.every_steps:
        exp.visualize.draw(self, step)  # the final grid, when the schedule missed it
      return step
    finally:
      manager.wait_until_finished()
      manager.close()
      self.writer.flush()
      self.writer.close()

  def _write_metrics(self, step: int, pending: list) -> None:
    values = jax.device_get(pending)
    means = {f'train/{k}': float(np.mean([v[k] for v in values])) for k in values[0]}
    if not np.isfinite(means['train/loss']):
      raise FloatingPointError(f'training loss is {means["train/loss"]} at step {step}; the last '
                               f'checkpoint in {self.workdir} is untouched')
    self.writer.write_scalars(step, means)


def train(experiment: Experiment, workdir: str) -> int:
  os.makedirs(workdir, exist_ok=True)
  return Run(experiment, workdir).train()


def sample(experiment: Experiment, workdir: str, num_samples: int,
           labels: list[int] | None = None, guidance_scale: float | None = None,
           seed: int = 0) -> str:
  """Samples the EMA weights of the newest checkpoint in `workdir` into `samples.npz`
  (`images` uint8 NHWC, `labels` int32) and `samples.png`. Returns the npz path."""
  run = Run(experiment, workdir)
  manager = experiment.checkpoint.manager(workdir)
  if manager.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.join(workdir, "checkpoints")}; train '
                            f'first (--mode=train) or point --workdir at a trained run')
  run.load_encoder()
  run.buffers = run.make_buffers()
  step, run.state = ckpt.restore(manager, run.abstract_state())
  manager.close()
  if labels:
    bad = [label for label in labels if not 0 <= label < run.num_classes]
    if bad:
      raise ValueError(f'--labels {bad} outside the {run.num_classes} classes 0..'
                       f'{run.num_classes - 1}')
    label_array = np.resize(np.asarray(labels, np.int32), num_samples)
  else:
    label_array = np.arange(num_samples, dtype=np.int32) % run.num_classes
  scale = experiment.sampler.guidance_scale if guidance_scale is None else guidance_scale
  images = run.generate(label_array, scale, seed=seed)
  path = os.path.join(workdir, 'samples.npz')
  np.savez(path, images=images, labels=label_array)
  hooks.save_png(os.path.join(workdir, 'samples.png'), hooks.image_grid(images))
  logging.info('Wrote %d samples of step %d (guidance %g) to %s', num_samples, step, scale, path)
  return path
