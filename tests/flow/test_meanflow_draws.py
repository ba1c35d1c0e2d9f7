"""MeanFlow's training draws: the preset's joint law of the r = t and dropped rows is
Gsunshine/meanflow's (both prefixes of the batch), and the other layouts are what they say."""

import math

import fiddle as fdl
import jax
import numpy as np
import pytest

from lib.config import presets

BATCH = 200_000


def preset_interface(**overrides):
  interface = presets.load_preset('experiments/meanflow.py:xl2').interface
  for name, value in overrides.items():
    setattr(interface, name, value)
  return fdl.build(interface)


def draw(interface, seed=0):
  time_key, drop_key = jax.random.split(jax.random.key(seed))
  t, r = interface.sample_t_r(time_key, BATCH)
  return np.asarray(t), np.asarray(r), np.asarray(interface.sample_drop(drop_key, BATCH))


def tolerance(p, n):
  return 5 * np.sqrt(p * (1 - p) / n)  # five standard errors of a frequency


def test_preset_drops_only_rows_with_r_equal_t_at_the_official_rates():
  t, r, drop = draw(preset_interface())
  equal = r == t
  assert np.all(r <= t)
  assert equal.sum() == int(0.75 * BATCH) and np.all(equal[:int(0.75 * BATCH)])
  assert not np.any(drop & ~equal)  # P(dropped | r != t) = 0
  assert drop.mean() == pytest.approx(0.1, abs=tolerance(0.1, BATCH))
  assert drop[equal].mean() == pytest.approx(0.1 / 0.75, abs=tolerance(0.1 / 0.75, equal.sum()))
  assert np.all(drop[:drop.sum()])  # a prefix


def test_independent_draws_drop_rows_regardless_of_r():
  t, r, drop = draw(preset_interface(draws='independent'), seed=1)
  different = r != t
  assert (r == t).sum() == int(0.75 * BATCH)
  assert drop[different].mean() == pytest.approx(0.1, abs=tolerance(0.1, different.sum()))
  assert drop[~different].mean() == pytest.approx(0.1, abs=tolerance(0.1, (~different).sum()))


def normal_cdf(x):
  return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.mark.parametrize('version', ['v0', 'v1'])
def test_py_meanflow_draws_two_logit_normals_and_counts_ratio_as_r_different(version):
  """py-meanflow's CIFAR recipe (`cifar10_v1.sh`): logits a ~ N(-0.6, 1.6^2) and
  b ~ N(-4, 1.6^2), --ratio 0.75 (rows kept with r != t) = fm_portion 0.25. v0: t = max,
  r = min, then the mask; v1: t = a, the mask, then r = min(t, r), so a kept row has r = t
  where b > a."""
  interface = preset_interface(draws=f'py_meanflow_{version}', fm_portion=0.25, t_mu=-0.6,
                               t_sigma=1.6, r_mu=-4.0, r_sigma=1.6)
  t, r, _ = draw(interface, seed=2)
  assert np.all(r <= t)
  gap, spread = -0.6 - -4.0, 1.6 * math.sqrt(2)  # logit a - logit b ~ N(gap, spread^2)
  a_larger = normal_cdf(gap / spread)
  logit_t = np.log(t / (1 - t))
  if version == 'v0':
    share_different = 0.75
    # E[max(a, b)] for two normals
    mean_logit_t = (-0.6 * a_larger + -4.0 * (1 - a_larger)
                    + spread * math.exp(-(gap / spread) ** 2 / 2) / math.sqrt(2 * math.pi))
  else:
    share_different = 0.75 * a_larger
    mean_logit_t = -0.6
  assert (r != t).mean() == pytest.approx(share_different,
                                          abs=tolerance(share_different, BATCH))
  assert logit_t.mean() == pytest.approx(mean_logit_t, abs=5 * 1.7 / np.sqrt(BATCH))
