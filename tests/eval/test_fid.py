"""FID / IS arithmetic, reference statistics files, and the FID action's schedule and
bookkeeping (with a fake run and a fake Inception network)."""

import json
import pickle

import numpy as np
import pytest
import scipy.linalg

from lib import errors
from lib.eval import actions, fid


def _features(seed, n=400, d=16, shift=0.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5 + shift


def test_streamed_statistics_match_numpy():
  x = _features(0)
  stats = fid.FeatureStats()
  for chunk in np.array_split(x, 7):
    stats.add(chunk.astype(np.float32))
  mu, sigma = stats.moments()
  np.testing.assert_allclose(mu, x.astype(np.float32).mean(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float32), rowvar=False), rtol=1e-5,
                             atol=1e-5)


def test_fid_of_a_set_against_itself_is_zero_and_matches_scipy():
  a, b = _features(1), _features(2, shift=0.3)
  sa, sb = fid.FeatureStats(), fid.FeatureStats()
  sa.add(a)
  sb.add(b)
  assert abs(fid.frechet_distance(*sa.moments(), *sa.moments())) < 1e-6
  mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
  mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
  direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
  got = fid.frechet_distance(*sa.moments(), *sb.moments())
  assert direct > 1.0
  assert abs(got - direct) < 1e-3
  # 1-d closed form: (m1 - m2)^2 + (s1 - s2)^2
  assert abs(fid.frechet_distance([0.0], [[4.0]], [1.0], [[1.0]]) - (1 + 1)) < 1e-9


def test_eigh_method_equals_sqrtm():
  a, b = _features(5, n=500, d=64), _features(6, n=500, d=64, shift=0.1)
  sa, sb = fid.FeatureStats(), fid.FeatureStats()
  sa.add(a)
  sb.add(b)
  want = fid.frechet_distance(*sa.moments(), *sb.moments())
  got = fid.frechet_distance(*sa.moments(), *sb.moments(), method='eigh')
  assert want > 1 and abs(got - want) < 1e-6 * want
  assert abs(fid.frechet_distance(*sa.moments(), *sa.moments(), method='eigh')) < 1e-6


def test_near_singular_covariances_stay_finite():
  a, b = _features(3, n=10, d=32), _features(4, n=10, d=32)  # rank 9 covariances
  sa, sb = fid.FeatureStats(), fid.FeatureStats()
  sa.add(a)
  sb.add(b)
  value = fid.frechet_distance(*sa.moments(), *sb.moments())
  assert np.isfinite(value) and value > 0
  assert abs(fid.frechet_distance(*sa.moments(), *sb.moments(), method='eigh') - value) < \
      1e-3 * value


def test_inception_score():
  rng = np.random.default_rng(0)
  # confident and uniformly spread over 10 classes -> IS = 10; constant prediction -> 1
  confident = np.full((1000, 10), -50.0)
  confident[np.arange(1000), np.arange(1000) % 10] = 50.0
  assert abs(fid.inception_score(confident) - 10.0) < 1e-6
  assert abs(fid.inception_score(np.zeros((100, 10))) - 1.0) < 1e-9
  # streamed in odd chunks over several splits == one pass with numpy, per split
  logits = rng.normal(size=(2500, 7)) * 3
  score = fid.InceptionScore(split_size=1000)
  for chunk in np.array_split(logits, 9):
    score.add(chunk)
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  want = np.mean([np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0))), 1)))
                  for part in (p[:1000], p[1000:2000], p[2000:])])
  assert abs(score.value() - want) < 1e-9


def test_reference_files(tmp_path):
  mu, sigma = np.arange(3.0), np.eye(3) * 2
  np.savez(tmp_path / 'adm.npz', mu=mu, sigma=sigma, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
  for got, want in zip(fid.load_reference(str(tmp_path / 'adm.npz')), (mu, sigma)):
    np.testing.assert_array_equal(got, want)
  fid.save_stats(str(tmp_path / 'ours.npz'), mu, sigma, 10)
  np.testing.assert_array_equal(fid.load_reference(str(tmp_path / 'ours.npz'))[1], sigma)
  with open(tmp_path / 'edm2.pkl', 'wb') as f:
    pickle.dump({'fid': {'mu': mu, 'sigma': sigma}}, f)
  np.testing.assert_array_equal(fid.load_reference(str(tmp_path / 'edm2.pkl'))[0], mu)
  with open(tmp_path / 'evil.pkl', 'wb') as f:
    pickle.dump({'fid': {'mu': mu, 'sigma': sigma, 'x': pickle.Pickler}}, f)
  with pytest.raises(pickle.UnpicklingError, match='not allowed'):
    fid.load_reference(str(tmp_path / 'evil.pkl'))
  np.savez(tmp_path / 'bad.npz', mean=mu)
  with pytest.raises(ValueError, match='expected `mu` and `sigma`'):
    fid.load_reference(str(tmp_path / 'bad.npz'))
  with pytest.raises(FileNotFoundError, match='stats_from'):
    fid.load_reference(str(tmp_path / 'none.npz'))


# ----------------------------------------------------------------------------- the action
class FakeRun:
  """`run.generate` returns images whose pixel values encode (label, noise seed)."""
  num_classes = 10

  def __init__(self):
    self.calls = []
    self.written = {}
    self.writer = self

  def generate(self, labels, guidance_scale, seed=0, params=None, batch_size=256):
    self.calls.append((len(labels), guidance_scale, seed))
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(labels), 4, 4, 3)).astype(np.uint8)
    images[:, 0, 0, 0] = labels
    return images

  def write_scalars(self, step, scalars):
    self.written.setdefault(step, {}).update(scalars)


def _fake_detector(images):
  x = images.reshape(len(images), -1).astype(np.float64)
  return x[:, :8] / 255.0, x[:, :6]


def test_schedule_alignment_and_due_sizes():
  action = actions.FIDEvaluation()
  assert action.every_steps == 25_000
  assert action.due(25_000) == [(1.0, (10_000,))]
  assert action.due(100_000) == [(1.0, (10_000, 50_000)), (1.5, (50_000,))]
  assert action.due(30_000) == []
  with pytest.raises(ValueError, match='one entry per guidance scale'):
    actions.FIDEvaluation(all_guidance_scales=(1.0,))
  with pytest.raises(ValueError, match=r'eval_every_steps\[0\]=\(100,\) must align'):
    actions.FIDEvaluation(all_guidance_scales=(1.0,), all_eval_samples_nums=((10, 20),),
                          eval_every_steps=((100,),))


def test_labels_are_class_balanced_by_default():
  labels = actions.eval_labels(50_000, 1000)
  assert np.bincount(labels).tolist() == [50] * 1000
  assert np.bincount(labels[:10_000]).tolist() == [10] * 1000
  uniform = actions.eval_labels(5000, 10, 'uniform', seed=1)
  np.testing.assert_array_equal(uniform, actions.eval_labels(5000, 10, 'uniform', seed=1))
  assert len(set(np.bincount(uniform).tolist())) > 1


def test_fid_action_prefixes_names_and_writes(tmp_path):
  run = FakeRun()
  action = actions.FIDEvaluation(
      all_guidance_scales=(1.0, 2.0), all_eval_samples_nums=((30, 70), (40,)),
      eval_every_steps=((10, 20), (20,)), samples_per_call=25, seed=3)
  action._detector = _fake_detector
  ref = fid.FeatureStats()
  ref.add(_fake_detector(FakeRun().generate(np.arange(200) % 10, 1.0, seed=99))[0])
  action._reference = ref.moments()
  scalars = action.evaluate(run, 20, action.due(20))
  assert sorted(scalars) == ['FID-0.03K (cfg=1.0)', 'FID-0.04K (cfg=2.0)', 'FID-0.07K (cfg=1.0)',
                             'IS-0.03K (cfg=1.0)', 'IS-0.04K (cfg=2.0)', 'IS-0.07K (cfg=1.0)']
  assert run.written[20] == scalars
  # 70 samples in calls of 25 for cfg 1, then 40 for cfg 2, with the same noise seeds
  assert run.calls == [(25, 1.0, 3_000_009), (25, 1.0, 3_000_010), (20, 1.0, 3_000_011),
                       (25, 2.0, 3_000_009), (15, 2.0, 3_000_010)]
  # FID-30 is the FID of the first 30 of the 70 samples
  first = np.concatenate([FakeRun().generate(actions.eval_labels(70, 10)[s:s + 25], 1.0,
                                             seed=3_000_009 + k)
                          for k, s in enumerate(range(0, 70, 25))])[:30]
  stats = fid.FeatureStats()
  stats.add(_fake_detector(first)[0])
  assert abs(scalars['FID-0.03K (cfg=1.0)'] - fid.frechet_distance(*stats.moments(),
                                                                 *action._reference)) < 1e-9
  assert action.evaluate(run, 10, action.due(10)).keys() == {'FID-0.03K (cfg=1.0)',
                                                             'IS-0.03K (cfg=1.0)'}


def test_fid_action_fails_at_start_without_its_files(tmp_path):
  run = FakeRun()
  with pytest.raises(ValueError, match='inception_weights is not set'):
    actions.FIDEvaluation().action(run)
  with pytest.raises(errors.UserError, match=r'FIDEvaluation.inception_weights=.*nope.pth.*'
                     'does not exist.*pt_inception-2015-12-05'):
    actions.FIDEvaluation(inception_weights=str(tmp_path / 'nope.pth')).action(run)
  (tmp_path / 'w.pth').write_bytes(b'')
  with pytest.raises(ValueError, match='reference_stats is not set'):
    actions.FIDEvaluation(inception_weights=str(tmp_path / 'w.pth')).action(run)
  with pytest.raises(errors.UserError, match='missing.npz'):
    actions.FIDEvaluation(inception_weights=str(tmp_path / 'w.pth'),
                          reference_stats=str(tmp_path / 'missing.npz')).action(run)


def test_fid_action_in_a_training_run(tmp_path):
  """A 2-step digits run with a random-weight Inception reports FID and IS at step 2 (the
  standalone `--mode=eval` is tested on the digits metric in test_digits_quality.py)."""
  import fiddle as fdl
  from flax import nnx

  from lib import train
  from lib.config import overrides, presets
  from lib.data.digits import Digits
  from lib.eval import inception

  weights = str(tmp_path / 'inception.npz')  # pytorch-fid keys, random weights
  rng = np.random.default_rng(0)
  random_state = nnx.from_flat_state([
      (path, variable.replace(
          rng.normal(size=variable.shape).astype(np.float32) * (2 / np.prod(variable.shape[:-1]))
          ** 0.5 if path[-1] == 'kernel' else
          np.ones(variable.shape, np.float32) if path[-1] in ('scale', 'var') else
          np.zeros(variable.shape, np.float32)))
      for path, variable in nnx.to_flat_state(inception.abstract()[1])])
  np.savez(weights, **inception.to_torch_state_dict(random_state))
  real = np.concatenate([b['image'] for b in Digits().eval_batches(256)])[:10]
  pool, _ = inception.Detector(weights, batch_size=10)(real)
  stats = fid.FeatureStats()
  stats.add(pool)
  fid.save_stats(str(tmp_path / 'ref.npz'), *stats.moments(), len(pool))

  config = presets.load_preset('experiments/dit.py:digits')
  for assignment in ('network.hidden_size=32', 'network.depth=1', 'network.num_heads=2',
                     'data.batch_size=8', 'total_steps=2', 'sampler.num_steps=2',
                     'visualize=None', 'report.every_steps=1000'):
    overrides.apply_override(config, assignment)
  config.evaluate = [fdl.Config(
      actions.FIDEvaluation, inception_weights=weights, reference_stats=str(tmp_path / 'ref.npz'),
      all_guidance_scales=(1.0,), all_eval_samples_nums=((10,),), eval_every_steps=((2,),),
      samples_per_call=10, inception_batch_size=10, fid_method='eigh')]
  workdir = str(tmp_path / 'run')
  assert train.train(fdl.build(config), workdir) == 2
  records = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  during = [r for r in records if 'FID-0.01K (cfg=1.0)' in r]
  assert len(during) == 1 and during[0]['step'] == 2 and during[0]['FID-0.01K (cfg=1.0)'] > 0
  assert during[0]['IS-0.01K (cfg=1.0)'] >= 1.0
