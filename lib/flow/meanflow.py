"""MeanFlow: one-step generation with average velocities (Geng et al., arXiv 2505.13447).

Time convention: ours, **t = 0 data, t = 1 noise**, r <= t, linear interpolant as SiT:

    z_t = (1 - t) x + t n,   v = n - x
    u(z, t, r) = (1 / (t - r)) int_r^t v(z_s, s) ds          (average velocity; u(z, t, t) = v)
    network:  u_theta(z, t, r, y) = network(z, t, y, dt=t - r)   (DiT with take_dt=True)

MeanFlow identity u = v - (t - r) du/dt, with du/dt = v d_z u + d_t u (total derivative along
the trajectory), computed by one forward-mode product

    (u, du/dt) = jax.jvp(u_theta, (z, t, r), (v_g, 1, 0))
    u_tgt = stop_grad(v_g - clip(t - r, 0, 1) du/dt)

where v_g is the guided velocity (also the z-tangent, as the official code).

Training draws (`draws`), t, r from the training distribution (logit-normal(-0.4, 1.0)):
  * 'prefix' (default; Gsunshine/meanflow `sample_tr`, `cond_drop`): t = max, r = min of two
    draws; the first int(B * fm_portion) rows of the batch get r = t, and the first
    Binomial(B, cond_drop_ratio) rows get the null label. Both are prefixes, so a dropped
    sample is (almost surely) an r = t sample: P(drop | r != t) = 0, P(drop | r = t) =
    cond_drop_ratio / fm_portion (0.1 / 0.75 = 13.3 %).
  * 'independent': exactly int(B * fm_portion) rows, chosen by a random permutation, get
    r = t; each row is dropped independently with probability cond_drop_ratio.
  * 'py_meanflow_v0', 'py_meanflow_v1' (Gsunshine/py-meanflow `sample_two_timesteps_t_r_v0`,
    `_v1`): t ~ logit-normal(t_mu, t_sigma), r ~ logit-normal(r_mu, r_sigma); each row gets
    r = t with probability fm_portion (py-meanflow's `--ratio` counts the other share, r != t:
    its 0.75 is fm_portion = 0.25); v0 sorts (t, r) first, v1 sets r = min(t, r) after the
    mask. Drops as 'independent' (py-meanflow's CIFAR recipe is unconditional).
  * training-time guidance, for guidance_t_min <= t <= guidance_t_max:
        v_g = w v + (1 - w - k) v_uncond + k v_cond         (w = guidance_scale, k = mixture)
    with v_uncond, v_cond the stop-gradient network velocities at r = t (dt = 0) for the
    null label (network.num_classes) and the label; the effective CFG scale is w / (1 - k)
    (preset: 0.2 / 0.08 = 2.5). Outside the interval v_g = v.
  * condition dropout: each sample independently (Bernoulli(cond_drop_ratio)) gets the null
    label and v_g = v.
Loss per sample: L = sum_{H,W,C} (u - u_tgt)^2, adaptively weighted
L / stop_grad((L + norm_eps)^norm_power). No resolution shift of t.
"""

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lib.flow.sit import SiT
from lib.models import layers

Draws = Literal['prefix', 'independent', 'py_meanflow_v0', 'py_meanflow_v1']
DRAWS = ('prefix', 'independent', 'py_meanflow_v0', 'py_meanflow_v1')


def _col(v: jax.Array, ndim: int) -> jax.Array:
  return v.reshape(-1, *([1] * (ndim - 1)))


def _sum_flat(x: jax.Array) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


class MeanFlow(SiT):
  """MeanFlow interface (defaults: the preset's, `experiments/common.py:meanflow_interface`:
  Gsunshine/meanflow's draws and adaptive weight with diffuse_nnx's `mf_imagenet` guidance).

  Args:
    time_dist, t_mu, t_sigma: distribution of t (and of r, but see r_mu).
    r_mu, r_sigma: logit-normal of r (None: t_mu, t_sigma), for py-meanflow's draws.
    n_mu, n_sigma: noise distribution.
    fm_portion: fraction of each batch trained with r = t.
    cond_drop_ratio: probability of training a sample with the null label.
    draws: how the r = t rows and the dropped rows are chosen (module docstring).
    guidance_scale, guidance_mixture_ratio: w and k of the training-time guidance
      (w = 1, k = 0 turns it off).
    guidance_t_min, guidance_t_max: times where guidance applies.
    norm_eps, norm_power: adaptive loss weight 1 / (L + eps)^p.
  """
  evaluates_network = 'inside jax.jvp'  # (and twice more for guidance): no REPA

  def __init__(self, time_dist: Literal['uniform', 'logit_normal'] = 'logit_normal',
               t_mu: float = -0.4, t_sigma: float = 1.0, n_mu: float = 0.0,
               n_sigma: float = 1.0, fm_portion: float = 0.75, cond_drop_ratio: float = 0.1,
               guidance_scale: float = 0.2, guidance_mixture_ratio: float = 0.92,
               guidance_t_min: float = 0.0, guidance_t_max: float = 0.75,
               norm_eps: float = 0.01, norm_power: float = 1.0, draws: Draws = 'prefix',
               r_mu: float | None = None, r_sigma: float | None = None):
    super().__init__(time_dist, t_mu=t_mu, t_sigma=t_sigma, n_mu=n_mu, n_sigma=n_sigma)
    if not 0.0 <= fm_portion <= 1.0 or not 0.0 <= cond_drop_ratio <= 1.0:
      raise ValueError(f'interface.fm_portion={fm_portion}, cond_drop_ratio={cond_drop_ratio}; '
                       f'expected fractions in [0, 1]')
    if draws not in DRAWS:
      raise ValueError(f'interface.draws={draws!r}; expected one of {DRAWS}')
    self.draws = draws
    self.r_mu = t_mu if r_mu is None else r_mu
    self.r_sigma = t_sigma if r_sigma is None else r_sigma
    self.fm_portion = fm_portion
    self.cond_drop_ratio = cond_drop_ratio
    self.guidance_scale = guidance_scale
    self.guidance_mixture_ratio = guidance_mixture_ratio
    self.guidance_t_min, self.guidance_t_max = guidance_t_min, guidance_t_max
    self.norm_eps, self.norm_power = norm_eps, norm_power

  @staticmethod
  def _check(network):
    if getattr(network, 'dt_embedder', True) is None:
      raise ValueError('MeanFlow needs a network that takes the interval t - r: build the DiT '
                       'with take_dt=True')

  # ---------------------------------------------------------------------------- draws
  def sample_t_r(self, key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """(t, r), r <= t, with the r = t rows chosen as `draws` says."""
    t_key, r_key, mask_key = jax.random.split(key, 3)
    a = self.sample_t(t_key, (batch,))
    if self.time_dist == 'uniform':
      b = self.sample_t(r_key, (batch,))
    else:
      b = jax.nn.sigmoid(self.r_mu + self.r_sigma * jax.random.normal(r_key, (batch,)))
    if self.draws == 'py_meanflow_v1':
      equal = jax.random.uniform(mask_key, (batch,)) < self.fm_portion
      return a, jnp.minimum(a, jnp.where(equal, a, b))
    t, r = jnp.maximum(a, b), jnp.minimum(a, b)
    num_fm = int(batch * self.fm_portion)
    if self.draws == 'prefix':
      equal = jnp.arange(batch) < num_fm
    elif self.draws == 'independent':
      equal = jnp.argsort(jax.random.uniform(mask_key, (batch,))) < num_fm  # random rows
    else:  # 'py_meanflow_v0'
      equal = jax.random.uniform(mask_key, (batch,)) < self.fm_portion
    return t, jnp.where(equal, t, r)

  def sample_drop(self, key: jax.Array, batch: int) -> jax.Array:
    """(B,) bool, the rows trained with the null label: a prefix for 'prefix' draws."""
    drop = jax.random.uniform(key, (batch,)) < self.cond_drop_ratio
    if self.draws == 'prefix':
      return jnp.arange(batch) < jnp.sum(drop)
    return drop

  # ---------------------------------------------------------------------------- pieces
  def guided_velocity(self, network, z: jax.Array, t: jax.Array, y: jax.Array,
                      v: jax.Array) -> jax.Array:
    """Training-time guided velocity v_g (stop-gradient network terms); v outside
    [guidance_t_min, guidance_t_max] or when guidance is off."""
    w, k = self.guidance_scale, self.guidance_mixture_ratio
    if w == 1.0 and k == 0.0:
      return v
    batch = z.shape[0]
    null = jnp.full_like(y, network.num_classes)
    if k == 0.0:
      v_uncond = self.velocity(network, z, t, null)
      v_g = v_uncond + w * (v - v_uncond)
    else:
      both = self.velocity(network, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                           jnp.concatenate([null, y]))
      v_uncond, v_cond = both[:batch], both[batch:]
      v_g = w * v + (1 - w - k) * v_uncond + k * v_cond
    v_g = jax.lax.stop_gradient(v_g)
    inside = (t >= self.guidance_t_min) & (t <= self.guidance_t_max)
    return jnp.where(_col(inside, z.ndim), v_g, v)

  def target(self, network, z: jax.Array, t: jax.Array, r: jax.Array, y: jax.Array,
             v_g: jax.Array, rngs=None) -> tuple[jax.Array, jax.Array]:
    """(u_theta(z, t, r), u_tgt): the prediction is the primal of the JVP (one forward).

    NNX forbids advancing `rngs` inside `jax.jvp`, so one key per stream is drawn here and a
    fresh `nnx.Rngs` of those keys is made inside (the primal and the tangent share it).
    """
    keys = None if rngs is None else {name: stream() for name, stream in rngs.items()}

    def u_fn(z, t, r):
      kwargs = {} if keys is None else {'rngs': nnx.Rngs(**keys)}
      return network(z, t, y, dt=t - r, **kwargs).astype(jnp.float32)

    with layers.forward_mode():  # (custom reverse-mode-only gradients are switched off)
      u, dudt = jax.jvp(u_fn, (z, t, r), (v_g, jnp.ones_like(t), jnp.zeros_like(r)))
    u_tgt = v_g - _col(jnp.clip(t - r, 0.0, 1.0), z.ndim) * dudt
    return u, jax.lax.stop_gradient(u_tgt)

  def objective(self, network, x: jax.Array, y: jax.Array, t: jax.Array, r: jax.Array,
                noise: jax.Array, drop: jax.Array, rngs=None):
    """The loss for given draws (t, r, noise, condition-drop mask) -> ((B,), aux)."""
    self._check(network)
    z = self.interpolate(x, noise, t)
    v = noise - x
    v_g = self.guided_velocity(network, z, t, y, v)
    y_in = jnp.where(drop, network.num_classes, y)
    v_g = jnp.where(_col(drop, x.ndim), v, v_g)
    u, u_tgt = self.target(network, z, t, r, y_in, v_g, rngs=rngs)
    sq_error = _sum_flat((u - u_tgt) ** 2)
    weight = jax.lax.stop_gradient(1.0 / (sq_error + self.norm_eps) ** self.norm_power)
    return weight * sq_error, {'sq_error': jnp.mean(sq_error)}

  # ---------------------------------------------------------------------------- contract
  def loss(self, network, x: jax.Array, y: jax.Array, key: jax.Array, rngs=None):
    """Per-sample adaptively weighted MeanFlow loss. x: (B, H, W, C), y: (B,)."""
    time_key, noise_key, drop_key = jax.random.split(key, 3)
    t, r = self.sample_t_r(time_key, x.shape[0])
    noise = self.sample_noise(noise_key, x.shape)
    drop = self.sample_drop(drop_key, x.shape[0])
    return self.objective(network, x, y, t, r, noise, drop, rngs=rngs)

  def velocity(self, network, x_t: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    """Instantaneous velocity u(x_t, t, t) (dt = 0): Euler/Heun/EM sample MeanFlow as a flow."""
    return network(x_t, t, y, dt=jnp.zeros_like(t)).astype(jnp.float32)

  def average_velocity(self, network, x_t: jax.Array, t: jax.Array, r: jax.Array,
                       y: jax.Array) -> jax.Array:
    """u(x_t, t, r): x_r = x_t + (r - t) u (what `EulerJump` uses)."""
    self._check(network)
    return network(x_t, t, y, dt=t - r).astype(jnp.float32)
