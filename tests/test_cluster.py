"""Sweeps, run comparison and Slurm submission (lib/config/sweeps.py, lib/cluster/), the
submissions on a real local Slurm cluster (tests/slurm_cluster.py)."""

import json
import os
import subprocess
import time

import numpy as np
import pytest

from lib import errors, paths
from lib.cluster import compare, slurm
from lib.config import sweeps
from tests.conftest import DIGITS, TINY_FLAGS, launch, tiny_digits

# The tiny digits run as a preset with FSDP (every array split over the processes' devices).
PRESET = '''
from experiments import common
from lib.config import overrides, presets
from tests.conftest import TINY

def tiny(total_steps: int = 6, save_every_steps: int = 1000):
  config = presets.load_preset('experiments/dit.py:digits')
  for assignment in TINY:
    overrides.apply_override(config, assignment)
  config.total_steps = total_steps
  config.log_every_steps = 1
  config.checkpoint.save_interval_steps = save_every_steps
  config.checkpoint.max_to_keep = 2
  config.sharding = common.fsdp()
  config.sharding.rules[0][1].min_size_mb = 0.0
  return config
'''
SWEEP = ('--sweep=optimizer.learning_rate=1e-3,3e-3', '--sweep=seed=0,1')
SWEEP_FLAGS = (DIGITS, *TINY_FLAGS, '--fdl_set=total_steps=2', '--fdl_set=log_every_steps=1',
               '--fdl_set=evaluate[0].every_steps=2', *SWEEP)
STEPS = 200  # of the Slurm runs: long enough to be stopped midway
MEMBERS = ['000_optimizer.learning_rate=1e-3_seed=0', '001_optimizer.learning_rate=1e-3_seed=1',
           '002_optimizer.learning_rate=3e-3_seed=0', '003_optimizer.learning_rate=3e-3_seed=1']


def losses(workdir) -> dict[int, float]:
  return dict(compare.read_metrics(paths.resolve(workdir, 'test')).get('train/loss', []))


def wait_for_queue_empty(cluster, timeout: float = 900) -> None:
  deadline = time.time() + timeout
  while cluster.run('squeue', '-h').stdout.strip():
    assert time.time() < deadline, cluster.run('squeue').stdout
    time.sleep(1)


# ------------------------------------------------------------------------------- in-process
def test_sweep_values_split_outside_brackets_and_members_are_the_product():
  assert sweeps.split_values('1e-3, (1, 2),"a,b",[3]') == ['1e-3', '(1, 2)', '"a,b"', '[3]']
  members = sweeps.expand([sweeps.parse_axis('optimizer.learning_rate=1e-3,3e-3'),
                           sweeps.parse_axis('seed=0,1')])
  assert [member.name for member in members] == MEMBERS
  assert members[1].assignments == ('optimizer.learning_rate=1e-3', 'seed=1')
  assert sweeps.Member(7, ("evaluate[0].scales=(1.0, 'x/y')",)).name == \
      "007_evaluate-0-.scales=-1.0-x-y-"
  for spec in ('seed', 'seed=', 'seed=1,,2'):
    with pytest.raises(errors.UsageError, match='expected PATH=VALUE1,VALUE2'):
      sweeps.parse_axis(spec)
  with pytest.raises(errors.UsageError, match='swept twice'):
    sweeps.expand([sweeps.parse_axis('seed=0,1'), sweeps.parse_axis('seed=2')])


def test_a_bad_sweep_value_names_its_member():
  config = tiny_digits()
  members = sweeps.expand([sweeps.parse_axis("data.batch_size=8,'many'")])
  assert sweeps.member_config(config, members[0]).data.batch_size == 8
  assert config.data.batch_size == 16  # the base config is not changed
  with pytest.raises(errors.UsageError, match="member 001_data.batch_size=-many-: .*"
                                              "data.batch_size expects int"):
    sweeps.member_config(config, members[1])
  missing = sweeps.expand([sweeps.parse_axis('optimizer.learning_rat=1e-3')])[0]
  with pytest.raises(errors.UsageError, match="learning_rat' does not exist"):
    sweeps.member_config(config, missing)


def test_slurm_options_become_sbatch_parameters():
  launcher = slurm.Slurm(nodes=2, gpus_per_node=8, partition='gpu', time_min=60,
                         additional_parameters={'exclusive': True})
  parameters = launcher.parameters('/work')
  assert parameters['ntasks_per_node'] == 8 and parameters['gpus_per_node'] == 8
  assert parameters['nodes'] == 2 and parameters['partition'] == 'gpu'
  assert parameters['additional_parameters'] == {'chdir': '/work', 'exclusive': True}
  assert 'account' not in parameters and 'gpus_per_node' not in slurm.Slurm().parameters('/')
  with pytest.raises(ValueError, match='not below the time limit'):
    slurm.Slurm(time_min=2, signal_delay_s=120)
  with pytest.raises(ValueError, match='nodes=0'):
    slurm.Slurm(nodes=0)
  assert slurm._slurm_message('Command failed\nsbatch: error: invalid partition specified: x\n'
                              'sbatch: error: Batch job submission failed') == \
      'sbatch: error: invalid partition specified: x'


def _fake_run(folder: str, lr: str, losses_: list[float], accuracy: float):
  """A run folder (local or gs://) with the effective values and metrics a run writes."""
  folder = paths.resolve(folder, 'test')
  folder.mkdir(parents=True)
  effective = {'optimizer.learning_rate': {'value': lr}, 'seed': {'value': '0'},
               'total_steps': {'value': str(len(losses_))}}
  (folder / 'effective.json').write_text(json.dumps(effective))
  lines = [json.dumps({'step': step, 'train/loss': loss}) for step, loss in enumerate(losses_, 1)]
  lines.append(json.dumps({'step': len(losses_), 'eval/digits_accuracy (cfg=1.0)': accuracy}))
  (folder / 'metrics.jsonl').write_text('\n'.join(lines) + '\n')


@pytest.mark.parametrize('where', ['local', 'bucket'])
def test_compare_reports_differences_metrics_and_plots(where, tmp_path, request):
  from PIL import Image

  base = f'gs://test-bucket/compare_{tmp_path.name}' if where == 'bucket' else str(tmp_path)
  if where == 'bucket':
    request.getfixturevalue('gcs')
  _fake_run(f'{base}/a', '0.001', [2.0, 1.0, 1.5], 0.5)
  _fake_run(f'{base}/b', '0.003', [3.0, 2.5, 2.0], 0.75)
  runs = compare.collect([f'{base}/a', f'{base}/b'])
  text = compare.report(runs)
  assert 'values that differ: optimizer.learning_rate' in text and 'seed' not in text
  assert 'a: stopped, step - of 3' not in text and 'a: not started, step - of 3' in text
  assert 'train/loss: final 1.5 (step 3), best 1 (step 2)' in text
  assert 'eval/digits_accuracy (cfg=1.0): final 0.75 (step 3), best 0.75' in text
  assert compare.label(runs[1], ['optimizer.learning_rate']) == 'optimizer.learning_rate=0.003'
  compare.plot(runs, f'{base}/plot.png')
  with paths.resolve(f'{base}/plot.png', 'test').open('rb') as f:
    image = np.asarray(Image.open(f).convert('L'))
  assert image.shape == (400, 1000)  # two panels of 5 x 4 inches at 100 dpi
  assert image.std() > 10  # curves, not a blank canvas


# ------------------------------------------------------------------------------- launch.py
@pytest.mark.slow
def test_bad_launcher_and_sweep_input_is_refused_before_anything_starts(tmp_path):
  workdir = tmp_path / 'sweep'
  no_slurm = launch(DIGITS, *TINY_FLAGS, f'--workdir={workdir}', '--launcher=slurm',
                    env={'PATH': '/nonexistent'})
  assert no_slurm.returncode == 2 and 'sbatch is not on PATH' in no_slurm.stderr
  wrong_type = launch(DIGITS, *TINY_FLAGS, f'--workdir={workdir}', "--sweep=seed=0,'x'")
  assert wrong_type.returncode == 2
  assert "error: --sweep member 001_seed=-x-: --fdl_set: seed expects int" in wrong_type.stderr
  no_path = launch(DIGITS, *TINY_FLAGS, f'--workdir={workdir}', '--sweep=sed=0,1')
  assert no_path.returncode == 2 and "'sed' does not exist" in no_path.stderr
  bad_option = launch(DIGITS, f'--workdir={workdir}', '--launcher=slurm',
                      '--launcher_set=nodes=0')
  assert bad_option.returncode == 2 and 'error: --launcher_set: nodes=0' in bad_option.stderr
  assert not workdir.exists()


# ------------------------------------------------------------------------------- Slurm
@pytest.fixture(scope='module')
def preset(tmp_path_factory):
  """`launch` of the FSDP tiny preset (PRESET; `call`: its arguments), its folder importable
  (saved configs load)."""
  folder = tmp_path_factory.mktemp('preset')
  (folder / 'cluster_presets.py').write_text(PRESET)
  return lambda *args, call='': launch(f'--fdl_config={folder}/cluster_presets.py:tiny{call}',
                                       *args, env={'PYTHONPATH': str(folder)})


@pytest.mark.slow
def test_bad_submissions_are_refused_with_slurms_message(slurm_clean, tmp_path, preset):
  workdir = tmp_path / 'run'
  refused = preset(f'--workdir={workdir}', '--launcher=slurm',
                   "--launcher_set=partition='nope'")
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines()[-1] == \
      'error: Slurm refused the job: sbatch: error: invalid partition specified: nope'
  assert not workdir.exists()
  held = preset(f'--workdir={workdir}', '--launcher=slurm',
                "--launcher_set=additional_parameters={'hold': True}")
  assert held.returncode == 0, held.stderr[-3000:]
  job_id = json.loads((workdir / 'slurm.json').read_text())[-1]['job_id']
  assert f'job {job_id}: log {workdir}/slurm/{job_id}_0_log.out' in held.stdout
  assert f'tail -f {workdir}/slurm/{job_id}_0_log.out; squeue -j {job_id}' in held.stdout
  listing = sorted(os.listdir(workdir / 'slurm'))
  twice = preset(f'--workdir={workdir}', '--launcher=slurm')
  assert twice.returncode == 2
  assert f'already has Slurm job {job_id} (PENDING)' in twice.stderr
  assert sorted(os.listdir(workdir / 'slurm')) == listing  # nothing more was queued
  assert slurm_clean.run('squeue', '-h', '-o', '%i').stdout.split() == [job_id]


@pytest.fixture(scope='module')
def reference(preset, tmp_path_factory):
  """The losses of the FSDP tiny preset run to STEPS in one process, uninterrupted."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  result = preset(f'--workdir={workdir}', call=f'(total_steps={STEPS})')
  assert result.returncode == 0, result.stderr[-3000:]
  return losses(workdir)


def submitted_job(preset, workdir, *options) -> str:
  """Submits the tiny preset run to STEPS in `workdir`; its job id."""
  result = preset(f'--workdir={workdir}', '--launcher=slurm',
                  *(f'--launcher_set={option}' for option in options),
                  call=f'(total_steps={STEPS})')
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads((workdir / 'slurm.json').read_text())[-1]['job_id']


def job_log(workdir, tail: int = 3000) -> str:
  """The end of each task's log of the jobs submitted for `workdir` (`tail=None`: all)."""
  return '\n'.join(log.read_text()[-tail if tail else 0:]
                   for log in sorted((workdir / 'slurm').glob('*_log.out')))


def wait_for_steps(cluster, workdir, count: int) -> None:
  """Until the submitted run in `workdir` has logged `count` training losses."""
  deadline = time.time() + 600
  while not (workdir / 'metrics.jsonl').exists() or len(losses(workdir)) < count:
    assert time.time() < deadline and cluster.run('squeue', '-h').stdout, job_log(workdir)
    time.sleep(0.2)


def restarts(cluster, job_id: str) -> int:
  text = cluster.run('scontrol', 'show', 'job', job_id).stdout
  return int(text.split('Restarts=')[1].split()[0]) if 'Restarts=' in text else -1


@pytest.mark.slow
def test_two_task_job_matches_one_process(slurm_clean, tmp_path, preset, reference):
  pair = tmp_path / 'pair'
  submitted_job(preset, pair, 'tasks_per_node=2', 'time_min=30')
  wait_for_queue_empty(slurm_clean)
  both = losses(pair)
  assert sorted(both) == sorted(reference) == list(range(1, STEPS + 1)), job_log(pair)
  np.testing.assert_allclose([both[s] for s in reference], list(reference.values()), rtol=1e-5)
  launched = json.loads((pair / 'run.json').read_text())[-1]
  assert launched['process_count'] == 2 and launched['slurm']['restart_count'] == 0


def assert_resumed_exactly(workdir, reference: dict) -> None:
  """The run was requeued once or more, resumed from its checkpoint and ended with the
  uninterrupted run's losses."""
  launches = json.loads((workdir / 'run.json').read_text())
  counts = [entry['slurm']['restart_count'] for entry in launches]
  assert counts[0] == 0 and counts[-1] >= 1 and counts == sorted(counts), (counts, job_log(workdir))
  assert launches[-1]['start_step'] > 0  # resumed, not restarted from scratch
  resumed = losses(workdir)
  assert sorted(resumed) == sorted(reference), job_log(workdir)
  assert [resumed[s] for s in reference] == list(reference.values())


@pytest.mark.slow
def test_a_preempted_job_saves_requeues_and_resumes_exactly(slurm_clean, tmp_path, preset,
                                                            reference):
  workdir = tmp_path / 'preempted'
  job_id = submitted_job(preset, workdir, 'time_min=30')
  wait_for_steps(slurm_clean, workdir, 3)
  slurm_clean.run('scancel', '--signal=USR2', job_id)  # the preemption notice
  wait_for_queue_empty(slurm_clean)
  assert restarts(slurm_clean, job_id) in (-1, 1)
  assert 'the run stopped for preemption (exit 75); requeueing job' in job_log(workdir, None)
  assert_resumed_exactly(workdir, reference)


@pytest.mark.slow
def test_a_job_at_its_time_limit_saves_requeues_and_resumes_exactly(slurm_clean, tmp_path,
                                                                    preset, reference):
  """Once the run trains, its time limit is cut to 1-2 minutes from now, inside the warning
  time (100 s): Slurm sends the warning at its next limit check (every 30 s), while the run
  still trains (it saves every step, which slows it). Once requeued, the job gets its long
  limit back so that it ends."""
  workdir = tmp_path / 'timed'
  result = preset(f'--workdir={workdir}', '--launcher=slurm', '--launcher_set=time_min=30',
                  '--launcher_set=signal_delay_s=100',
                  call=f'(total_steps={STEPS}, save_every_steps=1)')
  assert result.returncode == 0, result.stderr[-3000:]
  job_id = json.loads((workdir / 'slurm.json').read_text())[-1]['job_id']
  wait_for_steps(slurm_clean, workdir, 3)
  elapsed = slurm_clean.run('squeue', '-h', '-j', job_id, '-o', '%M').stdout.strip()
  minutes = int(elapsed.split(':')[-2]) if elapsed.count(':') else 0
  slurm_clean.run('scontrol', 'update', f'JobId={job_id}', f'TimeLimit={minutes + 2}')
  deadline = time.time() + 300
  while restarts(slurm_clean, job_id) < 1:
    assert time.time() < deadline and slurm_clean.run('squeue', '-h').stdout, job_log(workdir)
    time.sleep(0.5)
  slurm_clean.run('scontrol', 'update', f'JobId={job_id}', 'TimeLimit=30')
  wait_for_queue_empty(slurm_clean)
  assert_resumed_exactly(workdir, reference)


@pytest.mark.slow
def test_a_sweep_is_one_job_array_like_the_local_sweep_and_compares(slurm_clean, tmp_path):
  on_slurm = tmp_path / 'slurm_sweep'
  submitted = launch(*SWEEP_FLAGS, f'--workdir={on_slurm}', '--launcher=slurm',
                     '--launcher_set=time_min=30', '--launcher_set=array_parallelism=2')
  assert submitted.returncode == 0, submitted.stderr[-3000:]
  record = json.loads((on_slurm / 'sweep.json').read_text())
  job_ids = [member['job_ids'][-1] for member in record['members']]
  array = job_ids[0].split('_')[0]
  assert job_ids == [f'{array}_{index}' for index in range(4)]
  assert record['members'][1]['overrides'] == ['optimizer.learning_rate=1e-3', 'seed=1']
  wait_for_queue_empty(slurm_clean)
  assert sorted(name for name in os.listdir(on_slurm) if name[0].isdigit()) == MEMBERS
  again = launch(*SWEEP_FLAGS, f'--workdir={on_slurm}')  # locally: nothing left to run
  assert again.returncode == 0 and again.stdout.count('finished (step 2), left alone') == 4, \
      again.stdout + again.stderr[-2000:]
  local = tmp_path / 'local_sweep'
  result = launch(*SWEEP_FLAGS, f'--workdir={local}', '--sweep_parallel=2')
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(name for name in os.listdir(local) if name[0].isdigit()) == MEMBERS
  for name in MEMBERS:
    assert losses(on_slurm / name) == losses(local / name)
  shown = launch(f'--compare={on_slurm}')
  assert shown.returncode == 0, shown.stderr[-3000:]
  assert '# 4 runs; values that differ: optimizer.learning_rate, seed' in shown.stdout
  for name in MEMBERS:
    assert f'{name}: done, step 2 of 2' in shown.stdout
  assert shown.stdout.count('train/loss: final') == 4
  assert shown.stdout.count('eval/loss: final') == 4  # evaluate[0]: the held-out loss
  from PIL import Image
  image = np.asarray(Image.open(on_slurm / 'compare.png').convert('L'))
  assert image.shape[0] == 400 and image.shape[1] >= 1000 and image.std() > 10
