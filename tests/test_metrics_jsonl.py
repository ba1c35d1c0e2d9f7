"""`metrics.jsonl` is strict JSON (non-finite values as null), and a resumed run's rows are not
repeated: a training start drops the rows of later steps, evaluation drops nothing."""

import json
import math
import os
import signal
import time

import pytest

from lib import hooks, paths
from tests import conftest
from tests.gcs_emulator import BUCKET


def strict(line: str):
  """`line` parsed as strict JSON: NaN, Infinity and -Infinity raise."""
  def refuse(constant):
    raise ValueError(f'{constant} is not JSON')

  return json.loads(line, parse_constant=refuse)


def strict_rows(path) -> list[dict]:
  with open(path) as f:
    return [strict(line) for line in f]


def test_non_finite_values_are_written_as_null():
  row = hooks.jsonl_row({'step': 3, 'loss': math.nan, 'up': math.inf, 'down': -math.inf,
                         'lr': 0.5})
  assert strict(row) == {
      'step': 3, 'loss': None, 'up': None, 'down': None, 'lr': 0.5}
  assert row.endswith('\n') and 'NaN' not in row and 'Infinity' not in row


def test_a_training_start_drops_later_rows_and_keeps_the_rest_strict(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = ''.join(hooks.jsonl_row({'step': step, 'loss': 1 / step}) for step in range(1, 11))
  legacy = '{"step": 2, "grad_norm": NaN}\n'  # written before non-finite values were null
  path.write_text(rows + legacy + '{"step": 11, "lo')  # the last line cut by a kill
  hooks.drop_rows_after(path, 5)
  assert strict_rows(path) == [{'step': s, 'loss': 1 / s} for s in range(1, 6)] + [
      {'step': 2, 'grad_norm': None}]
  before = path.read_text()
  hooks.drop_rows_after(path, 5)
  assert path.read_text() == before
  hooks.drop_rows_after(tmp_path / 'absent.jsonl', 5)
  assert not (tmp_path / 'absent.jsonl').exists()


def test_only_a_training_start_truncates(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(hooks.jsonl_row({'step': step, 'loss': 1.0}) for step in (5, 10)))
  writers = hooks.Writers(tensorboard=False, asynchronous=False)
  evaluation = writers.create(str(tmp_path), True)  # lib/evaluate.py: rows at a checkpoint
  evaluation.write_scalars(5, {'eval/fid': 3.0})
  evaluation.close()
  assert [row['step'] for row in strict_rows(tmp_path / 'metrics.jsonl')] == [5, 10, 5]
  training = writers.create(str(tmp_path), True, start_step=5)  # lib/train.py's resume
  training.write_scalars(6, {'train/loss': math.nan})
  training.close()
  assert strict_rows(tmp_path / 'metrics.jsonl') == [
      {'step': 5, 'loss': 1.0}, {'step': 5, 'eval/fid': 3.0}, {'step': 6, 'train/loss': None}]


def test_rows_are_dropped_in_a_bucket(gcs):
  path = paths.resolve(f'gs://{BUCKET}/unit/resumed', '--workdir') / 'metrics.jsonl'
  path.write_text(''.join(hooks.jsonl_row({'step': step}) for step in range(1, 5)))
  hooks.drop_rows_after(path, 2)
  log = paths.AppendLog(path)  # what the resumed run's writer then appends to
  log.write(hooks.jsonl_row({'step': 3}))
  log.close()
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


@pytest.mark.slow
def test_kill_after_logged_steps_then_resume_logs_each_step_once(tmp_path):
  """Killed (SIGKILL) after a checkpoint and after later logged steps, then resumed to the
  end: every (step, metric) once, strict JSON."""
  run = (conftest.DIGITS, *conftest.TINY_FLAGS, '--fdl_set=total_steps=40',
         '--fdl_set=log_every_steps=1', '--fdl_set=checkpoint.save_interval_steps=5',
         f'--workdir={tmp_path}')
  process = conftest.launch(*run, wait=False)
  metrics, checkpoints = tmp_path / 'metrics.jsonl', tmp_path / 'checkpoints'

  def logged_past_a_checkpoint():
    saved = [int(n) for n in os.listdir(checkpoints) if n.isdigit()] \
        if checkpoints.is_dir() else []
    steps = [row['step'] for row in strict_rows(metrics)] if metrics.exists() else []
    return saved and steps and max(steps) > max(saved) + 1

  try:
    deadline = time.time() + 300
    while not logged_past_a_checkpoint() and time.time() < deadline:
      time.sleep(0.05)
    assert process.poll() is None, 'the run finished before it could be killed'
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  repeated = [row['step'] for row in strict_rows(metrics)]  # what the resume must not repeat
  result = conftest.launch(*run)
  assert result.returncode == 0, result.stderr[-3000:]
  pairs = [(row['step'], key) for row in strict_rows(metrics) for key in row if key != 'step']
  assert len(pairs) == len(set(pairs))
  assert sorted({step for step, key in pairs if key == 'train/loss'}) == list(range(1, 41))
  assert max(repeated) < 40
