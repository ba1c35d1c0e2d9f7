"""Runs in a bucket (against the local GCS of tests/gcs_emulator.py), the workdir lock on a
bucket, W&B tracking (offline), run.json, and bad input that fails before anything is left.

The launches use tests/test_train.py's tiny digits network; bucket runs turn TensorBoard off
(TensorFlow's GCS client cannot be pointed at the emulator; see tests/gcs_emulator.py)."""

import functools
import glob
import json
import os
import signal
import socket
import struct
import subprocess
import time

import numpy as np
import pytest

from lib import errors, hooks, paths, tracking
from lib.config import REPO_ROOT
from lib import workdir as workdirs
from tests import conftest
from tests.gcs_emulator import BUCKET
from tests.test_train import RUN as TINY

launch = functools.partial(conftest.launch, timeout=900)  # runs in a bucket are slower

NO_TENSORBOARD = '--fdl_set=writers.tensorboard=False'


def losses(folder) -> dict[int, float]:
  """step -> training loss of `folder/metrics.jsonl`; later records replace earlier ones."""
  out = {}
  for line in (paths.resolve(folder, 'folder') / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    if 'train/loss' in record:
      out[record['step']] = record['train/loss']
  return out


def objects(prefix: str) -> list[str]:
  """Names of the objects under gs://test-bucket/prefix."""
  from google.cloud import storage
  return sorted(b.name for b in storage.Client().list_blobs(BUCKET, prefix=prefix))


# ------------------------------------------------------------------------------- paths
def test_unknown_url_schemes_and_bucketless_urls_are_refused_naming_the_value():
  with pytest.raises(errors.UserError, match=r"--workdir='ftp://host/x': unsupported URL "
                                             r'scheme ftp://; expected a local path or gs://'):
    paths.resolve('ftp://host/x', '--workdir')
  with pytest.raises(errors.UserError, match='names no bucket'):
    paths.resolve('gs:///x', 'data.data_dir')
  assert paths.resolve('runs/x', '--workdir') == paths.Path(os.path.abspath('runs/x'))


def test_files_in_a_bucket_are_written_whole_and_logs_grow(gcs):
  folder = paths.resolve(f'gs://{BUCKET}/unit/files', '--workdir')
  paths.write_atomic(folder / 'config.json', '{"a": 1}')
  paths.write_atomic(folder / 'blob.bin', b'\x00\x01')
  assert (folder / 'config.json').read_text() == '{"a": 1}'
  assert (folder / 'blob.bin').read_bytes() == b'\x00\x01'
  log = paths.AppendLog(folder / 'metrics.jsonl')
  log.write('1\n')
  assert (folder / 'metrics.jsonl').read_text() == '1\n'  # readable as it grows
  log.write('2\n')
  log.close()
  reopened = paths.AppendLog(folder / 'metrics.jsonl')  # a resumed run keeps the rows
  reopened.write('3\n')
  reopened.close()
  assert (folder / 'metrics.jsonl').read_text() == '1\n2\n3\n'


def test_a_bucket_log_rewritten_by_another_writer_is_never_overwritten(gcs):
  """A stale writer (its workdir taken over) that writes again fails and leaves the new
  writer's rows as they were."""
  path = paths.resolve(f'gs://{BUCKET}/unit/fenced_log/metrics.jsonl', '--workdir')
  stale = paths.AppendLog(path)
  stale.write('{"step": 1}\n')
  new = paths.AppendLog(path)  # took the workdir over: reads the rows so far
  new.write('{"step": 2, "new": true}\n')
  with pytest.raises(errors.LockLost, match=f"{path}' was rewritten by another launch"):
    stale.write('{"step": 2}\n')
  new.write('{"step": 3, "new": true}\n')
  assert path.read_text() == '{"step": 1}\n{"step": 2, "new": true}\n{"step": 3, "new": true}\n'


def test_tensorboard_events_go_through_tensorflows_file_system(tmp_path, monkeypatch):
  """CLU's writer gets the workdir as a URL string; TensorFlow's own in-memory file system
  (`ram://`) stands in for its GCS client, which no emulator can reach."""
  from clu import metric_writers
  import tensorflow as tf

  seen = []
  monkeypatch.setattr(metric_writers, 'SummaryWriter',
                      lambda logdir: seen.append(logdir) or metric_writers.MultiWriter([]))
  hooks.Writers(jsonl=False, asynchronous=False).create('gs://b/runs/x', True).close()
  assert seen == ['gs://b/runs/x']
  monkeypatch.undo()
  writer = metric_writers.SummaryWriter('ram://tensorboard/run')
  writer.write_scalars(3, {'train/loss': 0.5})
  writer.close()
  events = tf.io.gfile.glob('ram://tensorboard/run/events.out.tfevents.*')
  assert events and tf.io.gfile.stat(events[0]).length > 0


def upload(local_root, url: str) -> None:
  """Copies a local folder tree to `url`."""
  target = paths.resolve(url, 'url')
  for root, _, names in os.walk(local_root):
    for name in names:
      relative = os.path.relpath(os.path.join(root, name), local_root)
      with open(os.path.join(root, name), 'rb') as f:
        (target / relative).write_bytes(f.read())


def test_data_weights_and_statistics_are_read_from_a_bucket(gcs, tmp_path):
  from lib.data import extract_latents
  from lib.data.images import ImageFolder
  from lib.data.latents import LatentFolder
  from lib.eval import fid
  from lib.weights import files as weight_files
  from tests.data.test_images import make_tree

  make_tree(tmp_path / 'images')
  upload(tmp_path / 'images', f'gs://{BUCKET}/data/images')
  local = ImageFolder(str(tmp_path / 'images'), image_size=16, batch_size=4, num_classes=3)
  remote = ImageFolder(f'gs://{BUCKET}/data/images', image_size=16, batch_size=4,
                       num_classes=3)
  remote.check()
  assert remote.classes == local.classes and remote.num_examples == local.num_examples
  for mine, theirs in zip(remote.batches(start_step=2), local.batches(start_step=2)):
    np.testing.assert_array_equal(mine['image'], theirs['image'])  # through tf.data
    np.testing.assert_array_equal(mine['label'], theirs['label'])
    break

  from lib.data.prepared import PreparedImages
  from tests.data.test_prepared import write_dataset
  for as_zip in (False, True):  # EDM2 datasets: a folder, or a .zip read member by member
    data_dir = write_dataset(tmp_path / f'prepared_{as_zip}', as_zip=as_zip)
    url = f'gs://{BUCKET}/data/prepared_{as_zip}'
    if as_zip:
      (paths.resolve(url, 'url') / 'data.zip').write_bytes(open(data_dir, 'rb').read())
      url += '/data.zip'
    else:
      upload(data_dir, url)
    local = PreparedImages(str(data_dir), image_size=8, batch_size=4, num_classes=3)
    remote = PreparedImages(url, image_size=8, batch_size=4, num_classes=3)
    remote.check()
    assert remote.is_zip == as_zip
    mine, theirs = next(remote.batches(start_step=1)), next(local.batches(start_step=1))
    np.testing.assert_array_equal(mine['image'], theirs['image'])
    np.testing.assert_array_equal(mine['label'], theirs['label'])

  latents = f'gs://{BUCKET}/data/latents'
  arrays = np.random.default_rng(0).normal(size=(3, 8, 4, 4)).astype(np.float32)
  for i, array in enumerate(arrays):
    extract_latents._save(latents, extract_latents.file_name(i), array)
  assert extract_latents._existing(latents) == {extract_latents.file_name(i) for i in range(3)}
  assert extract_latents.write_labels(latents, [[extract_latents.file_name(i), i % 2]
                                                for i in range(3)]).startswith('gs://')
  folder = LatentFolder(latents, image_size=32, batch_size=3, num_classes=2, num_eval=3)
  folder.check()
  batch = next(folder.eval_batches(3))
  np.testing.assert_array_equal(batch['image'], arrays.transpose(0, 2, 3, 1))
  assert batch['label'].tolist() == [0, 1, 0]

  np.savez(tmp_path / 'weights.npz', w=np.arange(6, dtype=np.float32).reshape(2, 3))
  upload(tmp_path, f'gs://{BUCKET}/files')
  state_dict = weight_files.read_state_dict(f'gs://{BUCKET}/files/weights.npz')
  np.testing.assert_array_equal(state_dict['w'], np.arange(6).reshape(2, 3))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    weight_files.read_state_dict(f'gs://{BUCKET}/files/missing.npz')

  fid.save_stats(f'gs://{BUCKET}/files/stats.npz', np.ones(3), np.eye(3), 10)
  mu, sigma = fid.load_reference(f'gs://{BUCKET}/files/stats.npz')
  np.testing.assert_array_equal(mu, np.ones(3))
  np.testing.assert_array_equal(sigma, np.eye(3))


def test_checkpoints_in_a_bucket_commit_atomically_and_fall_back(gcs):
  import jax.numpy as jnp
  from lib import checkpoint as ckpt

  workdir = f'gs://{BUCKET}/unit/checkpoints'
  folder = ckpt.directory(workdir)
  manager = ckpt.Checkpointing().manager(workdir)
  state = lambda step: {'step': jnp.int32(step), 'w': jnp.linspace(0.0, 1.0, 512) * step}
  for step in (50, 60):
    ckpt.save(manager, step, state(step), force=True)
  manager.wait_until_finished()
  manager.close()
  (folder / '70' / 'default' / '_METADATA').write_text('{}')  # a save killed before its commit
  assert ckpt.latest_step(workdir) == 60
  data = sorted((folder / '60' / 'default' / name for name in
                 paths.files_under(folder / '60' / 'default') if '/d/' in f'/{name}'),
                key=lambda p: len(p.read_bytes()))[-1]
  data.write_bytes(np.random.default_rng(0).bytes(len(data.read_bytes())))  # damaged
  manager = ckpt.Checkpointing().manager(workdir)
  step, restored = ckpt.restore(manager, ckpt.abstract(state(0)), may_set_aside=True)
  manager.close()
  assert step == 50
  np.testing.assert_array_equal(restored['w'], state(50)['w'])
  aside = paths.resolve(workdir, 'w') / ckpt.SET_ASIDE / '60'
  assert (aside / 'REASON.txt').read_text().strip() and not (folder / '60').exists()


# ------------------------------------------------------------------------------- workdir
def test_a_missing_bucket_is_refused_and_a_usable_one_left_as_it_was(gcs):
  with pytest.raises(errors.UserError, match=r"gs://no-such-bucket/x.*bucket "
                                             r'gs://no-such-bucket does not exist'):
    workdirs.check_usable('gs://no-such-bucket/x')
  workdirs.check_usable(f'gs://{BUCKET}/unit/usable')
  assert objects('unit/usable') == []


def test_bucket_runs_are_numbered_as_diffuse_nnx_numbers_them(gcs):
  first = workdirs.in_bucket(BUCKET, 'numbered', 'alpha')
  assert os.fspath(first) == f'gs://{BUCKET}/numbered/000_alpha'
  paths.write_atomic(first / 'config.json', '{}')
  assert workdirs.in_bucket(BUCKET, 'numbered', 'alpha') == first  # resumed
  second = workdirs.in_bucket(BUCKET, 'numbered', 'beta')
  assert os.fspath(second) == f'gs://{BUCKET}/numbered/001_beta'
  with pytest.raises(errors.UserError, match="--bucket='missing-bucket'"):
    workdirs.in_bucket('missing-bucket', 'numbered', 'alpha')


def test_a_bucket_workdir_is_locked_by_a_precondition_write(gcs, caplog):
  workdir = f'gs://{BUCKET}/unit/locked'
  lock = paths.resolve(workdir, '--workdir') / 'lock'
  with workdirs.WorkdirLock(workdir):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
    with pytest.raises(errors.WorkdirBusy, match=f'host {socket.gethostname()}, process '
                                                 f'{os.getpid()}'):
      workdirs.WorkdirLock(workdir).acquire()
  assert not lock.exists()  # released: deleted
  dead = int(subprocess.run(['sh', '-c', 'echo $$'], capture_output=True, text=True).stdout)
  for holder, reason in (({'host': socket.gethostname(), 'pid': dead}, 'its process has ended'),
                         ({'host': 'elsewhere', 'pid': 1, 'heartbeat': time.time() - 3600},
                          'no heartbeat for')):
    lock.write_text(json.dumps({'started': 't', 'heartbeat': time.time(), **holder}))
    taken = workdirs.WorkdirLock(workdir)
    taken.acquire()
    assert reason in caplog.text
    assert json.loads(lock.read_text())['pid'] == os.getpid()
    taken.release()
  lock.write_text(json.dumps({'host': 'elsewhere', 'pid': 1, 'started': 't',
                              'heartbeat': time.time()}))
  with pytest.raises(errors.WorkdirBusy, match='host elsewhere, process 1'):
    workdirs.WorkdirLock(workdir).acquire()  # a live holder on another host
  lock.unlink()


# ------------------------------------------------------------------------------- tracker
def test_an_online_tracker_without_a_key_is_refused(monkeypatch, tmp_path):
  for name in ('WANDB_API_KEY', 'WANDB_IDENTITY_TOKEN_FILE', 'WANDB_MODE'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('NETRC', str(tmp_path / 'netrc'))
  with pytest.raises(errors.UserError, match='writers.wandb=True needs a Weights & Biases API '
                                             'key: set WANDB_API_KEY'):
    hooks.Writers(wandb=True).check(None)
  (tmp_path / 'netrc').write_text('machine api.wandb.ai login user password k\n')
  hooks.Writers(wandb=True).check(None)
  monkeypatch.setenv('NETRC', str(tmp_path / 'none'))
  monkeypatch.setenv('WANDB_MODE', 'offline')
  hooks.Writers(wandb=True).check(None)
  assert tracking.run_id('003_x') == tracking.run_id('003_x') != tracking.run_id('003_y')


def wandb_records(run_dir: str) -> list:
  """The records of an offline W&B run (`run-ID.wandb`: a LevelDB-style log of protobuf
  `Record`s in 32 KiB blocks after a 7-byte `:W&B` header)."""
  from wandb.proto import wandb_internal_pb2

  data = open(glob.glob(os.path.join(run_dir, 'run-*.wandb'))[0], 'rb').read()
  assert data[:4] == b':W&B'
  position, records, chunk = 7, [], b''
  while position + 7 <= len(data):
    left = 32768 - position % 32768
    _, length, kind = struct.unpack('<IHB', data[position:position + 7]) if left >= 7 else \
        (0, 0, 0)
    if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
      position += left
      continue
    chunk += data[position + 7:position + 7 + length]
    position += 7 + length
    if kind in (1, 4):  # FULL or LAST
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunk)
      records.append(record)
      chunk = b''
  return records


# ------------------------------------------------------------------------------- end to end
def wait_for_checkpoint(workdir: str, step: int, process, timeout: float = 600) -> None:
  marker = paths.resolve(workdir, '--workdir') / 'checkpoints' / str(step) / \
      'commit_success.txt'
  deadline = time.time() + timeout
  while not marker.exists():
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.5)


@pytest.mark.slow
def test_a_bucket_run_survives_sigkill_samples_relaunches_and_is_tracked(gcs, tmp_path):
  reference = tmp_path / 'local'
  common = [*TINY, '--fdl_set=checkpoint.save_interval_steps=4',
            '--fdl_set=evaluate[0].every_steps=4',
            '--fdl_set=visualize.every_steps=4']
  preset = '--fdl_config=experiments/dit.py:digits(total_steps=12)'
  result = launch(*common, preset, NO_TENSORBOARD, f'--workdir={reference}')
  assert result.returncode == 0, result.stderr[-3000:]

  workdir = f'gs://{BUCKET}/runs/x'
  tracked = {'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path / 'wandb_dir'),
             'WANDB_SILENT': 'true'}
  os.makedirs(tracked['WANDB_DIR'])
  bucket_run = [*common, preset, NO_TENSORBOARD, '--fdl_set=writers.wandb=True',
                f'--workdir={workdir}']
  first = launch(*bucket_run, wait=False, env=tracked)
  wait_for_checkpoint(workdir, 4, first)
  first.send_signal(signal.SIGKILL)
  first.wait()
  result = launch(*bucket_run, env=tracked)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resumed from the checkpoint of step' in result.stderr
  expected = losses(reference)
  assert sorted(expected) == list(range(1, 13))
  assert losses(workdir) == expected  # bitwise: the same floats
  names = objects('runs/x/')
  for name in ('config.json', 'config.txt', 'effective.json', 'metrics.jsonl', 'run.json',
               'samples/step_00000012_cfg1.png', 'checkpoints/12/commit_success.txt'):
    assert f'runs/x/{name}' in names, names
  assert not any(name.startswith('runs/x/lock') for name in names)  # released
  runs = json.loads((paths.resolve(workdir, '--workdir') / 'run.json').read_text())
  assert len(runs) == 2 and runs[1]['start_step'] >= 4
  revision = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT,
                            capture_output=True, text=True).stdout.strip()
  assert all(run['git_revision'] == revision and run['process_count'] == 1 and
             run['device_count'] >= 1 and '--workdir=' + workdir in run['command']
             for run in runs)

  # W&B: the killed launch and the resumed one wrote the same tracker run.
  run_dirs = sorted(glob.glob(os.path.join(tracked['WANDB_DIR'], 'wandb', 'offline-run-*')))
  run_id = tracking.run_id('x')
  assert len(run_dirs) == 2 and all(d.endswith('-' + run_id) for d in run_dirs)
  records = wandb_records(run_dirs[1])
  opened = [r.run for r in records if r.WhichOneof('record_type') == 'run'][0]
  assert opened.run_id == run_id and opened.display_name == 'x'
  config = {item.key: json.loads(item.value_json) for item in opened.config.update}
  assert config['total_steps'] == '12' and config['network.hidden_size'] == '32'
  rows = [{item.key or '/'.join(item.nested_key): json.loads(item.value_json)
           for item in r.history.item} for r in records
          if r.WhichOneof('record_type') == 'history']
  scalars = {(row['step'], key): value for row in rows for key, value in row.items()}
  assert scalars[(12, 'train/loss')] == pytest.approx(expected[12])
  assert (12, 'train/learning_rate') in scalars
  assert any(key.startswith('eval/') for _, key in scalars)
  images = glob.glob(os.path.join(run_dirs[1], 'files', 'media', 'images', 'samples', '*.png'))
  assert images

  # Sampling into the bucket, and a relaunch of the saved config from the bucket.
  result = launch(f'--workdir={workdir}', '--mode=sample', '--num_samples=4')
  assert result.returncode == 0, result.stderr[-3000:]
  import io
  with np.load(io.BytesIO((paths.resolve(workdir, 'w') / 'samples.npz').read_bytes())) as z:
    assert z['images'].shape == (4, 8, 8, 1) and z['labels'].tolist() == [0, 1, 2, 3]
  again = f'gs://{BUCKET}/runs/relaunched'
  result = launch(f'--fdl_config_file={workdir}/config.json',
                  '--fdl_set=total_steps=2', f'--workdir={again}', env=tracked)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'runs/relaunched/checkpoints/2/commit_success.txt' in objects('runs/relaunched/')


@pytest.mark.slow
def test_bucket_prefix_launches_number_and_resume_runs_and_bad_input_leaves_nothing(gcs,
                                                                                     tmp_path):
  preset = '--fdl_config=experiments/dit.py:digits(total_steps=2)'
  flags = [*TINY, preset, NO_TENSORBOARD, f'--bucket={BUCKET}', '--prefix=sweep']
  paths.write_atomic(paths.resolve(f'gs://{BUCKET}/sweep/000_other/config.json', 'w'), '{}')
  result = launch(*flags, '--workdir=mine')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'sweep/001_mine/checkpoints/2/commit_success.txt' in objects('sweep/001_mine/')
  result = launch(*[f for f in flags if 'total_steps' not in f],
                  '--fdl_config=experiments/dit.py:digits(total_steps=4)', '--workdir=mine',
                  '--accept_config_change')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resumed from the checkpoint of step 2' in result.stderr
  assert {name.split('/')[1] for name in objects('sweep/')} == {'000_other', '001_mine'}

  bad = {
      'ftp://host/x': "--workdir='ftp://host/x': unsupported URL scheme ftp://",
      'gs://no-such-bucket/x': 'bucket gs://no-such-bucket does not exist',
  }
  for workdir, message in bad.items():
    result = launch(*TINY, preset, NO_TENSORBOARD, f'--workdir={workdir}')
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
  no_key = {'WANDB_MODE': 'online', 'WANDB_API_KEY': '', 'NETRC': str(tmp_path / 'none')}
  for args, message, env in (  # /proc/self is not writable, even by root
      (['--workdir=/proc/self/fiddlediff/x'],
       "cannot be created: '/proc/self' is not a writable directory", None),
      ([f'--workdir={tmp_path / "tracked"}', '--fdl_set=writers.wandb=True'],
       'writers.wandb=True needs a Weights & Biases API key', no_key)):
    result = launch(*TINY, preset, *args, env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / 'tracked').exists()


def running_past_checkpoint(run, workdir: str, step: int, log, env):
  """launch.py `run` in the bucket `workdir` (stderr to the file `log`), returned running
  once its checkpoint `step` is committed (read uncached: gcsfs caches listings)."""
  from google.cloud import storage

  with open(log, 'w') as stderr:
    process = launch(*run, f'--workdir={workdir}', env=env, wait=False, stderr=stderr)
  name = f'{workdir[len(f"gs://{BUCKET}/"):]}/checkpoints/{step}/commit_success.txt'
  commit = storage.Client().bucket(BUCKET).blob(name)
  deadline = time.time() + 600
  while not commit.exists():
    assert process.poll() is None and time.time() < deadline, open(log).read()
    time.sleep(0.02)
  return process


@pytest.mark.slow
def test_a_stopped_lock_holder_taken_over_writes_nothing_when_it_continues(gcs, tmp_path):
  run = [*TINY, '--fdl_config=experiments/dit.py:digits(total_steps=16)', NO_TENSORBOARD,
         '--fdl_set=checkpoint.save_interval_steps=8']
  reference = tmp_path / 'reference'
  result = launch(*run, f'--workdir={reference}')
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = f'gs://{BUCKET}/runs/fenced'
  periods = {'FIDDLEDIFF_LOCK_HEARTBEAT_SECS': '1', 'FIDDLEDIFF_LOCK_STALE_SECS': '4'}
  # logged with its checkpoints only: stopped between writes, since a write under way when a
  # holder is stopped still lands when it continues
  first = running_past_checkpoint([*run, '--fdl_set=log_every_steps=8'], workdir, 8,
                                  tmp_path / 'first.log', periods)
  first.send_signal(signal.SIGSTOP)  # alive, but its heartbeat stops
  try:
    time.sleep(5)  # the lock is stale: no heartbeat for longer than 4 s
    second = launch(*run, f'--workdir={workdir}', env=periods)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'Took over the lock' in second.stderr and 'no heartbeat for' in second.stderr
    assert 'Resumed from the checkpoint of step 8' in second.stderr
    assert {step: loss for step, loss in losses(workdir).items() if step > 8} == \
        {step: loss for step, loss in losses(reference).items() if step > 8}
    written = {name: (paths.resolve(f'gs://{BUCKET}/{name}', 'w').read_bytes())
               for name in objects('runs/fenced/')}
  finally:
    first.send_signal(signal.SIGCONT)
  assert first.wait(timeout=300) == 2
  stderr = (tmp_path / 'first.log').read_text()
  assert (f'error: this run lost the lock of {workdir} (another launch took it over and has '
          'released it since); it stopped without writing anything more') in stderr, stderr
  assert 'Traceback' not in stderr
  assert {name: (paths.resolve(f'gs://{BUCKET}/{name}', 'w').read_bytes())
          for name in objects('runs/fenced/')} == written


@pytest.mark.slow
def test_a_bucket_that_stops_answering_stops_the_run_with_one_line_and_it_resumes(gcs, tmp_path):
  """The emulator paused (SIGSTOP: connections accepted, nothing answered) after the first
  checkpoint: every client's request times out, the save is retried for
  FIDDLEDIFF_IO_RETRY_SECS, and the run stops (status 2) naming the newest checkpoint."""
  run = [*TINY, '--fdl_config=experiments/dit.py:digits(total_steps=12)', NO_TENSORBOARD,
         '--fdl_set=checkpoint.save_interval_steps=4']
  reference = tmp_path / 'reference'
  result = launch(*run, f'--workdir={reference}')
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = f'gs://{BUCKET}/runs/outage'
  short = {'FIDDLEDIFF_IO_RETRY_SECS': '10', 'FIDDLEDIFF_IO_TIMEOUT_SECS': '3'}
  first = running_past_checkpoint(run, workdir, 4, tmp_path / 'first.log', short)
  gcs.process.send_signal(signal.SIGSTOP)
  try:
    paused = time.time()
    status = first.wait(timeout=300)
    waited = time.time() - paused
  finally:
    gcs.process.send_signal(signal.SIGCONT)
  stderr = (tmp_path / 'first.log').read_text()
  lines = [line for line in stderr.splitlines() if 'error: ' in line]
  assert status == 2 and len(lines) == 1, stderr[-4000:]
  assert waited < 120, waited
  assert f'File "{REPO_ROOT}' not in stderr, stderr[-4000:]  # no traceback through this project
  newest = int(lines[0].split('the newest intact checkpoint is step ')[1].split()[0])
  assert f'cannot write to {workdir}' in lines[0] and 'the storage did not answer' in lines[0]
  assert f'in {workdir}/checkpoints' in lines[0] and newest >= 4
  result = launch(*run, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resumed from the checkpoint of step {newest}' in result.stderr
  assert losses(workdir) == losses(reference)
