"""The training loop: a jitted NNX train step driven by CLU writers and periodic actions.

State carried between steps (and checkpointed) is a pytree
    {'step': int32, 'params': nnx.State, 'opt_state': optax state, 'ema': EMA state,
     'buffers': the network's fixed arrays (position tables, fixed Fourier features)}
plus the parameters of the objective's own trainables under their names (REPA: 'projector';
trained with the network by the same optimizer, not averaged by the EMA). The step calls the
objective (`lib.flow.objective.Objective`) for the loss. The frozen weights of the encoder and
of the objective (REPA's detector) are passed to the jitted functions as arguments, never
baked in as constants.

Every random draw of step k comes from `fold_in(key(seed), k)`, and the data position
is a function of k, so a run resumed from the checkpoint of step k continues exactly
as the uninterrupted run would have.
"""

import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lib import checkpoint as ckpt
from lib import errors
from lib import paths
from lib import stopping
from lib import storage
from lib.experiment import Experiment
from lib.sharding import Sharding


class Run:
  """An `Experiment` bound to a workdir and to this process's devices."""

  def __init__(self, experiment: Experiment, workdir):
    self.experiment = exp = experiment
    self.workdir = paths.resolve(workdir, '--workdir')
    self.is_main = jax.process_index() == 0
    self.total_steps = exp.total_steps
    self.num_classes = exp.data.num_classes
    self.layout = exp.sharding or Sharding()
    self.mesh = self.layout.make_mesh()
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = self.layout.batch_sharding(self.mesh)
    self.layout.check_batch(exp.data.batch_size, self.mesh)
    self.optimizer = exp.make_optimizer()
    abstract_model = nnx.eval_shape(exp.make_network)
    self.graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    self.param_count = sum(x.size for x in jax.tree.leaves(abstract_params))
    self.objective = exp.objective
    self._make_extras = self.objective.trainables(exp.make_network, exp.latent_shape, exp.seed)
    self.extra_graphdefs = {name: nnx.graphdef(module)
                            for name, module in nnx.eval_shape(self._make_extras).items()}
    self.state_shardings = self.layout.state_shardings(jax.eval_shape(self._create), self.mesh)
    self.key = jax.random.key(exp.seed)
    self.writer = None
    self.state = None
    self.objective_state = None
    self._train_step = jax.jit(self._step, donate_argnums=0,
                               out_shardings=(self.state_shardings, self.replicated))
    self._generate = jax.jit(self._sample, static_argnames='guidance_scale',
                             out_shardings=self.replicated)
    self._loss = jax.jit(self._eval_loss, out_shardings=self.replicated)
    self._reconstruct = jax.jit(
        lambda state, images: exp.encoder.decode(
            state, exp.encoder.encode(state, images, jax.random.key(0))),
        out_shardings=self.replicated)

  # ----------------------------------------------------------------------------- state
  def _create(self):
    model = self.experiment.make_network()
    _, params, buffers = nnx.split(model, nnx.Param, ...)
    extras = {name: nnx.state(module, nnx.Param) for name, module in self._make_extras().items()}
    return self.state_from_weights(params, buffers, extras)

  def state_from_weights(self, params, buffers, extras=None):
    """A step-0 state: `params` as the weights and as the EMA, a fresh optimizer state, the
    network's fixed arrays (position tables, fixed Fourier features) and the parameters of
    the objective's trainables `extras` ({name: nnx.State}, REPA's projector)."""
    state = {'step': jnp.zeros((), jnp.int32), 'params': params,
             'ema': self.experiment.ema.init(params), 'buffers': buffers, **(extras or {})}
    state['opt_state'] = self.optimizer.tx.init(self.trained(state))
    return state

  def trained(self, state):
    """What the optimizer updates: the network's parameters, and with objective trainables
    {'network': parameters, name: its parameters, ...}."""
    if not self.extra_graphdefs:
      return state['params']
    return {'network': state['params'], **{name: state[name] for name in self.extra_graphdefs}}

  def _untrained(self, trained):
    """The inverse of `trained`: (the network's parameters, {name: trainable's parameters})."""
    if not self.extra_graphdefs:
      return trained, {}
    return trained['network'], {name: trained[name] for name in self.extra_graphdefs}

  def imported_state(self, weights: nnx.State):
    """The step-0 state of imported weights (`lib.weights.registry.import_file`): their
    parameters, and their fixed arrays where they have them (else the constructor's); fresh
    objective trainables (REPA's projector)."""
    # only the buffers and the trainables are made: the network's parameters are compiled away
    fresh = jax.jit(lambda: {k: v for k, v in self._create().items()
                             if k == 'buffers' or k in self.extra_graphdefs})()
    params, imported_buffers = nnx.split_state(weights, nnx.Param, ...)
    buffers = nnx.merge_state(fresh.pop('buffers'), imported_buffers)
    return jax.jit(self.state_from_weights, out_shardings=self.state_shardings)(
        params, buffers, fresh)

  def initial_state(self):
    """A fresh state, created by one jitted call directly in its final sharding: no device
    (or host) ever holds a full copy of a sharded array."""
    return jax.jit(self._create, out_shardings=self.state_shardings)()

  def abstract_state(self, parts: tuple[str, ...] | None = None):
    """Shapes, dtypes and target shardings of the state (the restore target: a checkpoint
    saved on another mesh is resharded into this one); with `parts`, of those entries only."""
    abstract = ckpt.abstract(jax.eval_shape(self._create), self.state_shardings)
    return abstract if parts is None else {part: abstract[part] for part in parts}

  def restore(self, manager, step: int | None = None, parts: tuple[str, ...] | None = None,
              *, may_set_aside: bool = False) -> int:
    """Loads the newest (or the given) checkpoint of `manager` into `self.state`; with `parts`
    (`lib.sample.RESTORED`, `lib.evaluate.RESTORED`), only those entries of the state: the
    others (the optimizer's moments) are not read. `may_set_aside`: move damaged checkpoints
    aside (a training launch holding the workdir's lock; `lib.checkpoint.restore`)."""
    step, self.state = ckpt.restore(manager, self.abstract_state(parts), step,
                                    partial=parts is not None, may_set_aside=may_set_aside)
    return step

  def load_encoder(self):
    self.encoder_state = jax.device_put(self.experiment.encoder.load(), self.replicated)

  def load_objective(self):
    """The objective's frozen weights (REPA's detector; training only), replicated."""
    self.objective_state = jax.device_put(self.objective.load(), self.replicated)

  def network(self, params, buffers) -> nnx.Module:
    return nnx.merge(self.graphdef, params, buffers)

  # ----------------------------------------------------------------------------- jitted
  def _step(self, state, encoder_state, batch, objective_state=None, votes=None):
    """One update; `votes` (int32, one per example, split like the batch) are the processes'
    stop votes, returned as their maximum in metrics['stop'] (`lib.stopping`)."""
    exp = self.experiment
    key = jax.random.fold_in(self.key, state['step'])
    encode_key, loss_key, dropout_key = jax.random.split(key, 3)
    x = exp.encoder.encode(encoder_state, batch['image'], encode_key)

    def loss_fn(trained):
      rngs = nnx.Rngs(label_dropout=dropout_key, dropout=jax.random.fold_in(dropout_key, 1))
      params, extras = self._untrained(trained)
      modules = {name: nnx.merge(self.extra_graphdefs[name], weights)
                 for name, weights in extras.items()}
      per_sample, aux = self.objective.loss(self.network(params, state['buffers']), modules,
                                            objective_state, x, batch, loss_key, rngs=rngs)
      return per_sample.mean(), aux

    trained = self.trained(state)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    updates, opt_state = self.optimizer.tx.update(grads, state['opt_state'], trained)
    trained = optax.apply_updates(trained, updates)
    params, extras = self._untrained(trained)
    grad_norm = optax.tree.norm(grads)
    metrics = {'loss': loss, 'grad_norm': grad_norm,
               'learning_rate': self.optimizer.schedule(state['step']), **aux}
    if votes is not None:
      metrics['stop'] = jnp.max(votes)
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state,
                 'ema': exp.ema.update(state['ema'], params, state['step']),
                 'buffers': state['buffers'], **extras}
    if exp.skip_nonfinite_updates:
      # Keep the weights, optimizer state and EMA of a step whose loss, gradient or new
      # weights are not finite; the step counter (and so the data) moves on.
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & \
          jnp.isfinite(optax.tree.norm(trained))
      new_state = {k: v if k == 'step' else jax.tree.map(
          lambda new, old: jnp.where(finite, new, old), v, state[k])
                   for k, v in new_state.items()}
      metrics['skipped'] = 1 - finite.astype(jnp.int32)
    return new_state, metrics

  def _sample(self, params, buffers, encoder_state, labels, indices, seed, guidance_scale):
    """Samples for `labels`; sample i starts from noise drawn from a key folded with its
    index i, so it does not depend on the batch it is generated in."""
    exp = self.experiment
    noise_key, sde_key = jax.random.split(jax.random.key(seed))
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i),
                                                 exp.latent_shape))(indices)
    sde_key = jax.random.fold_in(sde_key, indices[0])  # stochastic samplers (Euler-Maruyama)
    latents = exp.sampler(exp.interface, self.network(params, buffers), noise, labels,
                          guidance_scale=guidance_scale, key=sde_key)
    return exp.encoder.decode(encoder_state, latents)

  def _eval_loss(self, params, buffers, encoder_state, batch, seed, index):
    exp = self.experiment
    encode_key, loss_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), index))
    x = exp.encoder.encode(encoder_state, batch['image'], encode_key)
    per_sample, _ = exp.interface.loss(self.network(params, buffers), x, batch['label'], loss_key)
    return per_sample.sum()

  # ----------------------------------------------------------------------------- services for hooks
  def ema_params(self):
    return self.experiment.ema.weights(self.state['ema'])

  def generate(self, labels: np.ndarray, guidance_scale: float, seed: int = 0,
               params=None, batch_size: int = 256) -> np.ndarray:
    """uint8 images (N, H, W, C) for `labels` from the EMA weights (or `params`); the same
    on every process. Each batch is split over the devices like a training batch (padded to
    a multiple of their number); deterministic samplers give every image independently of
    the batch size and the mesh."""
    params = self.ema_params() if params is None else params
    ways = self.layout.batch_ways(self.mesh)
    out = []
    for start in range(0, len(labels), batch_size):
      chunk = np.asarray(labels[start:start + batch_size], np.int32)
      count = len(chunk)
      padded = -(-count // ways) * ways
      inputs = [np.pad(chunk, (0, padded - count), mode='edge'),
                np.arange(start, start + padded, dtype=np.int32)]
      labels_in, indices = (jax.make_array_from_callback(
          (padded,), self.batch_sharding, lambda index, a=a: a[index]) for a in inputs)
      images = self._generate(params, self.state['buffers'], self.encoder_state, labels_in,
                              indices, seed, guidance_scale=float(guidance_scale))
      out.append(np.asarray(images)[:count])
    return np.concatenate(out)

  def reconstruct(self, images: np.ndarray) -> np.ndarray:
    """decode(encode(images)) (uint8, as the input; a fixed posterior draw where the encoder
    samples one)."""
    images = jax.device_put(np.asarray(images), self.replicated)
    return np.asarray(self._reconstruct(self.encoder_state, images))

  def validation_loss(self, batch_size: int, seed: int) -> dict[str, float]:
    """Mean held-out loss of the EMA and of the trained weights, fixed noise and times."""
    totals = {'eval/loss_ema': 0.0, 'eval/loss': 0.0}
    count = 0
    for i, batch in enumerate(self.experiment.data.eval_batches(batch_size)):
      batch = jax.device_put(batch, self.replicated)
      for name, params in (('eval/loss_ema', self.ema_params()),
                           ('eval/loss', self.state['params'])):
        totals[name] += float(self._loss(params, self.state['buffers'], self.encoder_state,
                                         batch, seed, i))
      count += len(batch['label'])
    return {k: v / count for k, v in totals.items()}

  # ----------------------------------------------------------------------------- loop
  # `train(restart_from_scratch=True)`: start at step 0 although every checkpoint of the
  # workdir was set aside as damaged.
  restart_from_scratch = False

  def restore_or_init(self, manager):
    """Newest good checkpoint in the workdir if there is one (damaged ones are set aside,
    `lib.checkpoint.restore`), else a fresh state (or the imported weights of `init_from`).
    A workdir whose checkpoints were all set aside (now or by an earlier launch) is refused
    with `CheckpointError` unless `restart_from_scratch`; a checkpoint of another config
    raises `CheckpointMismatch`."""
    if manager.all_steps():
      try:
        step = self.restore(manager, may_set_aside=True)
        logging.info('Resumed from the checkpoint of step %d in %s', step, self.workdir)
        return step
      except errors.CheckpointMismatch:
        raise
      except errors.CheckpointError as error:  # every checkpoint was damaged, now set aside
        self._start_again_after_damage(manager, str(error))
    elif set_aside := ckpt.set_aside_steps(manager):
      self._start_again_after_damage(manager, f'no checkpoint in {manager.directory}; '
                                     f'checkpoints {", ".join(set_aside)} were set aside as damaged')
    if self.experiment.init_from:
      from lib.weights import registry

      if not paths.is_file(self.experiment.init_from, 'init_from'):
        raise errors.UserError(f'init_from={self.experiment.init_from!r} is not a file; give '
                               'the released checkpoint (.pt / .safetensors) to start from')
      self.state = self.imported_state(
          registry.import_file(self.experiment.init_from, self.experiment))
      logging.info('Starting from the weights of %s (params and EMA)', self.experiment.init_from)
    else:
      self.state = self.initial_state()
    return 0

  def _start_again_after_damage(self, manager, damage: str) -> None:
    """Refuses to start at step 0 where damaged checkpoints were set aside (`damage` says
    which), unless `restart_from_scratch`."""
    folder = ckpt.set_aside_folder(manager)
    if not self.restart_from_scratch:
      raise errors.CheckpointError(
          f'{damage}\nrefusing to start again at step 0: the damaged checkpoints are kept in '
          f'{folder} (each with REASON.txt); move a repaired one back into '
          f'{manager.directory}, or pass --restart_from_scratch to train from step 0')
    logging.warning('Starting at step 0 (--restart_from_scratch); the damaged checkpoints stay '
                    'in %s', folder)

  def train(self, on_start: Callable[[int], None] | None = None, lock=None) -> int:
    """Trains to `total_steps` and returns it. `on_start(step)` is called once the state is
    restored (or initialised), before the first step.

    A SIGTERM, SIGUSR2 or SIGINT stops every process at the same step (`lib.stopping`), which
    is saved; then `errors.Preempted` is raised. With `lock` (the workdir's
    `lib.workdir.WorkdirLock`), a run whose lock is taken over raises `errors.LockLost` before
    its next write. Raises `NonFiniteError` on the first step whose loss or gradient norm is
    not finite (or, with `skip_nonfinite_updates=N`, after N such updates in a row), before any
    state from it is saved, and `errors.StorageError` when a file of the run cannot be written
    (`lib.storage`)."""
    self._manager = None  # the checkpoint manager, once _train opened it
    with stopping.StopSignals() as signals:
      try:
        return self._train(signals, on_start, lock)
      except (errors.UserError, errors.Preempted, errors.NonFiniteError):
        raise
      except Exception as error:  # a full disk or an unwritable folder: one message
        # the manager knows its newest commit; listing storage that does not answer would hang
        newest = ((lambda: ckpt.latest_step(self.workdir)) if self._manager is None else
                  self._manager.latest_step)
        failure = storage.storage_error(error, self.workdir, newest)
        if failure is None:
          raise
        raise failure from error

  def _train(self, signals: stopping.StopSignals, on_start, lock) -> int:
    exp = self.experiment
    exp.data.check()
    self.load_encoder()
    self.load_objective()
    manager = self._manager = exp.checkpoint.manager(self.workdir)
    self.writer = None
    actions = []
    try:
      step = self.restore_or_init(manager)
      if on_start is not None:
        on_start(step)
      # Once the config is saved: a tracker run takes it from the workdir (lib.tracking).
      self.writer = exp.writers.create(self.workdir, self.is_main, start_step=step)
      if self.is_main:
        logging.info('Network: %s parameters; training steps %d -> %d', f'{self.param_count:,}',
                     step, self.total_steps)
      actions.append(exp.report.action(self))
      actions += [hook.action(self) for hook in (exp.profile, exp.visualize) if hook is not None]
      actions += [hook.action(self) for hook in exp.evaluate]
      batches = exp.data.batches(step, jax.process_index(), jax.process_count())
      pending = []  # metrics since the last log step
      unchecked = None  # (step, metrics) dispatched but not yet checked for finiteness
      self._skipped_in_a_row = 0
      stop, previous_vote = 0, None  # the agreed vote of the step before the last dispatched
      while step < self.total_steps and not stop:
        local = next_batch(batches, step)
        votes = np.full(len(jax.tree.leaves(local)[0]), signals.vote(lock), np.int32)
        batch, votes = jax.tree.map(
            lambda v: jax.make_array_from_process_local_data(self.batch_sharding, v),
            (local, votes))
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          self.state, metrics = self._train_step(self.state, self.encoder_state, batch,
                                                 self.objective_state, votes)
        metrics = dict(metrics)
        if unchecked is not None:  # the previous step has finished by now, or nearly
          self._check_finite(*unchecked, manager)
        if previous_vote is not None:
          stop = int(previous_vote)  # the same on every process: stop after this step
          if stop == stopping.LOCK_LOST:
            raise lock.lost_error()
        previous_vote = metrics.pop('stop')
        step += 1
        unchecked = (step, metrics)
        pending.append(metrics)
        writes = lock is None or lock.owned()  # else nothing is written; the next vote stops
        if step % exp.log_every_steps == 0 or step == self.total_steps:
          self._check_finite(*unchecked, manager)
          unchecked = None
          if writes:
            self._write_metrics(step, pending)
          pending = []
        if step == self.total_steps or manager.should_save(step):
          if unchecked is not None:
            self._check_finite(*unchecked, manager)
            unchecked = None
          self._save(manager, step, lock)
        # Actions write metrics, grids and traces; in a multi-host run they are collective, so
        # every process runs them until the vote stops them all.
        if not stop and (writes or jax.process_count() > 1):
          for action in actions:
            action(step)
      if unchecked is not None:
        self._check_finite(*unchecked, manager)
      if step < self.total_steps:  # stopped by a signal
        if manager.latest_step() != step:
          self._save(manager, step, lock)
        raise errors.Preempted(signals.received or 'a stop signal to another process', step,
                               self.total_steps, manager.directory)
      if exp.visualize is not None and step % exp.visualize.every_steps:
        exp.visualize.draw(self, step)  # the final grid, when the schedule missed it
      return step
    finally:
      if lock is None or lock.owned():  # closing writes (traces, buffered metrics)
        for action in actions:
          if hasattr(action, 'close'):
            action.close()
      manager.wait_until_finished()
      manager.close()
      if self.writer is not None:
        self.writer.flush()
        self.writer.close()

  def _save(self, manager, step: int, lock) -> None:
    """The checkpoint of `step`, once every process knows the lock is still this run's; then
    the metrics log is flushed, so that it never lags behind the newest checkpoint."""
    if lock is not None:
      owned = lock.owned()
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        owned = bool(multihost_utils.broadcast_one_to_all(np.int32(owned)))
      if not owned:
        raise lock.lost_error()
    storage.retrying(lambda: ckpt.save(manager, step, self.state, force=True),
                     f'saving the checkpoint of step {step}')
    self.writer.flush()

  def _check_finite(self, step: int, metrics: dict, manager) -> None:
    """Stops the run (before anything of `step` is saved) if its loss or gradient norm is
    not finite; with `skip_nonfinite_updates`, counts skipped updates instead."""
    if self.experiment.skip_nonfinite_updates:
      if int(metrics['skipped']):
        self._skipped_in_a_row += 1
        logging.warning('Step %d: non-finite loss or gradient; update skipped (%d in a row)',
                        step, self._skipped_in_a_row)
        if self._skipped_in_a_row <= self.experiment.skip_nonfinite_updates:
          return
      else:
        self._skipped_in_a_row = 0
        return
    loss, grad_norm = (float(v) for v in jax.device_get((metrics['loss'],
                                                         metrics['grad_norm'])))
    if np.isfinite(loss) and np.isfinite(grad_norm) and not self._skipped_in_a_row:
      return
    skipped = (f' after {self._skipped_in_a_row} skipped updates in a row (more than '
               f'skip_nonfinite_updates={self.experiment.skip_nonfinite_updates})'
               if self._skipped_in_a_row else '')
    raise errors.NonFiniteError(
        f'step {step}: training loss {loss}, gradient norm {grad_norm}{skipped}; stopped '
        f'before saving any state of this step{ckpt.newest_note(manager)}. Lower '
        f'optimizer.learning_rate, clip gradients (optimizer.grad_clip_norm) or set '
        f'skip_nonfinite_updates=N to skip such updates')

  def _write_metrics(self, step: int, pending: list) -> None:
    values = jax.device_get(pending)
    if 'skipped' in values[0]:  # means over the applied updates; the count of the others
      skipped = sum(int(v.pop('skipped')) for v in values)
      values = [v for v in values if np.isfinite(v['loss'])] or values
    means = {f'train/{k}': float(np.mean([v[k] for v in values])) for k in values[0]}
    if self.experiment.skip_nonfinite_updates:
      means['train/skipped_updates'] = float(skipped)
    self.writer.write_scalars(step, means)


def next_batch(batches, step: int) -> dict:
  """The next batch of a data iterator; a read or decode failure becomes a `DataError`
  naming the step (and the file, which the data sources put in their messages)."""
  try:
    return next(batches)
  except StopIteration:
    raise
  except Exception as error:  # tf.errors.OpError and others, raised inside tf.data
    message = str(getattr(error, 'message', '') or error)
    cause = re.search(r'\b\w+(?:Error|Exception): [^\n]+', message)  # the reader's own
    raise errors.DataError(f'reading the batch of step {step + 1} failed: '
                           f'{cause.group(0) if cause else message.strip()[:500]}') from error


def train(experiment: Experiment, workdir, on_start: Callable[[int], None] | None = None,
          lock=None, restart_from_scratch: bool = False) -> int:
  """Trains `experiment` in `workdir` (see `Run.train`); returns the last step reached.
  `restart_from_scratch`: start at step 0 although the workdir's checkpoints were all set
  aside as damaged (else refused, `Run.restore_or_init`)."""
  paths.resolve(workdir, '--workdir').mkdir(parents=True, exist_ok=True)
  run = Run(experiment, workdir)
  run.restart_from_scratch = restart_from_scratch
  return run.train(on_start, lock)

