"""The digits classifier metric: committed weights, scores of real and noise images, and the
standalone `--mode=eval` on a tiny trained digits run."""

import json
import os
import types

import numpy as np
import pytest

from lib.data.digits import Digits
from lib.eval import actions, digits_classifier
from tests.conftest import DIGITS, TINY_FLAGS, launch


class DigitsRun:
  """A fake run whose `generate` returns given images."""
  num_classes = 10

  def __init__(self, images):
    self.images = images
    self.experiment = types.SimpleNamespace(data=Digits())
    self.written = {}
    self.writer = self

  def generate(self, labels, guidance_scale, seed=0, **kwargs):
    return self.images[:len(labels)]

  def write_scalars(self, step, scalars):
    self.written[step] = scalars


@pytest.fixture(scope='module')
def quality():
  action = actions.DigitsQuality(num_samples=300)
  action.prepare(DigitsRun(None))
  return action


def test_committed_weights_are_small_and_accurate():
  assert os.path.getsize(digits_classifier.DEFAULT_WEIGHTS) < 200_000
  (_, _), (images, labels) = digits_classifier.splits()
  logits = digits_classifier.load()(images)[1]
  assert np.mean(np.argmax(logits, -1) == labels) > 0.95


def test_real_digits_score_high_and_noise_low(quality):
  (train_images, train_labels), (held_out, held_labels) = digits_classifier.splits()
  distance, accuracy = quality.scores(held_out, held_labels)
  assert accuracy > 0.9 and abs(distance) < 1e-6
  real_distance, real_accuracy = quality.scores(train_images[:300], train_labels[:300])
  assert real_accuracy > 0.9 and real_distance < 80
  noise = np.random.default_rng(0).integers(0, 256, (300, 8, 8, 1)).astype(np.uint8)
  noise_distance, noise_accuracy = quality.scores(noise, np.arange(300) % 10)
  assert noise_accuracy < 0.3 and noise_distance > 4 * real_distance
  # larger digits are resized to 8x8 first
  big = np.repeat(np.repeat(held_out, 2, 1), 2, 2)
  assert quality.scores(big, held_labels)[1] > 0.8


def test_evaluate_generates_balanced_labels_and_writes(quality):
  (train_images, train_labels), _ = digits_classifier.splits()
  order = np.argsort(train_labels, kind='stable')
  by_class = [train_images[order][train_labels[order] == c] for c in range(10)]
  images = np.stack([by_class[k % 10][k // 10] for k in range(300)])  # label k % 10
  run = DigitsRun(images)
  scalars = quality.evaluate(run, 7)
  assert run.written[7] == scalars
  assert scalars['eval/digits_accuracy (cfg=1.0)'] > 0.9
  assert scalars['eval/digits_fd (cfg=1.0)'] < 80


def test_rejects_other_data():
  run = DigitsRun(None)
  run.experiment = types.SimpleNamespace(data=types.SimpleNamespace(num_classes=1000, channels=3))
  with pytest.raises(ValueError, match='10-class greyscale digits'):
    actions.DigitsQuality().prepare(run)


# The tiny digits run for 3 steps, its DigitsQuality (20 samples, cfg 1) only at the end.
TINY = [DIGITS, *TINY_FLAGS, '--fdl_set=total_steps=3', '--fdl_set=evaluate[1].every_steps=1000',
        '--fdl_set=evaluate[1].num_samples=20', '--fdl_set=evaluate[1].guidance_scales=(1.0,)',
        '--fdl_set=report.every_steps=1000']


@pytest.mark.slow
def test_standalone_eval_mode(tmp_path):
  result = launch(*TINY, f'--workdir={tmp_path}', '--mode=eval')
  assert result.returncode == 2 and 'no checkpoint' in result.stderr
  result = launch(*TINY, f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  result = launch(f'--workdir={tmp_path}', '--mode=eval')  # the saved config
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  evaluated = [r for r in records if 'eval/digits_accuracy (cfg=1.0)' in r]
  assert len(evaluated) == 1 and evaluated[0]['step'] == 3
  assert 'eval/digits_fd (cfg=1.0)' in evaluated[0]
  assert [r['step'] for r in records if 'eval/loss_ema' in r] == [3]  # ValidationLoss too
