"""Slurm jobs through submitit: what a job asks for (`Slurm`), submitting commands (one job, or
one job array for a sweep), what every task of a job runs (`Task`: launch.py, then a requeue
when the run stopped for preemption), and the queue's view of a job.

    launcher = Slurm(nodes=2, gpus_per_node=8, time_min=240, partition='gpu')
    jobs = submit(launcher, [command], cwd=os.getcwd(), folder='runs/x/slurm')
    jobs[0]  # {'job_id': '42', 'log': 'runs/x/slurm/42_0_log.out', 'parameters': {...}}
    queue_state('42')  # 'PENDING', 'RUNNING', ... or None once Slurm has forgotten the job

One JAX process per GPU: a job runs `nodes * tasks_per_node` copies of the command (tasks per
node = GPUs per node unless set), and `lib.distributed.initialize` joins them from the
`SLURM_*` variables each task inherits. The job asks for `--signal=USR2@signal_delay_s`; the
signal reaches every process of the tasks, launch.py stops every process at one step, saves
it and exits with `errors.PREEMPTED_STATUS`, and task 0 then requeues the job (`scontrol
requeue`), which starts again with `SLURM_RESTART_COUNT` one higher and resumes from the
workdir. A run that ends, or fails, is not requeued.
"""

import glob
import json
import os
import signal
import shutil
import subprocess
import time

from lib import errors, paths
from lib.config import REPO_ROOT

RECORD = 'slurm.json'  # in the workdir: what was submitted for it, newest last
# Slurm's states of a job that is still to run or running (squeue --states=...).
ACTIVE_STATES = ('PENDING', 'CONFIGURING', 'RUNNING', 'COMPLETING', 'REQUEUED', 'REQUEUE_HOLD',
                 'REQUEUE_FED', 'RESIZING', 'SUSPENDED', 'STOPPED', 'SIGNALING')
WAITING_STATES = ('PENDING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'CONFIGURING')
EXIT_WAIT_SECS = 120.0  # how long task 0 waits for the other tasks' runs to end


class Slurm:
  """What a Slurm job asks for (sbatch's options of the same names), set with
  `--launcher_set=FIELD=VALUE`.

  Attributes:
    nodes: hosts of the job.
    gpus_per_node: GPUs of each host (0: a CPU job).
    tasks_per_node: processes of each host; None: one per GPU (one on a CPU node).
    cpus_per_task: CPU cores of each process (None: Slurm's default).
    mem_gb: memory of each host in GB (None: Slurm's default).
    time_min: the time limit, in minutes; the run is requeued after it and resumes.
    partition, account, qos, constraint: sbatch's options (None: not given).
    signal_delay_s: USR2 this many seconds before the time limit (Slurm may send it up to a
      minute early); the run needs this long to save a checkpoint.
    array_parallelism: a sweep's members that run at once.
    job_name: the job's name in the queue.
    log_folder: where submitit writes the job's logs and files; None: `WORKDIR/slurm` (a sweep:
      `SWEEP/slurm`). It must be on a file system the nodes share.
    additional_parameters: more sbatch options, {'option-name': 'value'}.
  """

  def __init__(self, nodes: int = 1, gpus_per_node: int = 0, tasks_per_node: int | None = None,
               cpus_per_task: int | None = None, mem_gb: float | None = None,
               time_min: int = 24 * 60, partition: str | None = None,
               account: str | None = None, qos: str | None = None,
               constraint: str | None = None, signal_delay_s: int = 180,
               array_parallelism: int = 8, job_name: str = 'fiddlediff',
               log_folder: str | None = None,
               additional_parameters: dict[str, str] | None = None):
    errors.check_positive(nodes=nodes, tasks_per_node=tasks_per_node,
                          cpus_per_task=cpus_per_task, mem_gb=mem_gb, time_min=time_min,
                          signal_delay_s=signal_delay_s, array_parallelism=array_parallelism)
    if signal_delay_s >= time_min * 60:
      raise ValueError(f'signal_delay_s={signal_delay_s} is not below the time limit '
                       f'(time_min={time_min}: {time_min * 60} s); the warning would come first')
    if gpus_per_node < 0:
      raise ValueError(f'gpus_per_node={gpus_per_node}; expected 0 (a CPU job) or more')
    self.nodes, self.gpus_per_node = nodes, gpus_per_node
    self.tasks_per_node = tasks_per_node or max(gpus_per_node, 1)
    self.cpus_per_task, self.mem_gb, self.time_min = cpus_per_task, mem_gb, time_min
    self.partition, self.account, self.qos, self.constraint = partition, account, qos, constraint
    self.signal_delay_s, self.array_parallelism = signal_delay_s, array_parallelism
    self.job_name, self.log_folder = job_name, log_folder
    self.additional_parameters = dict(additional_parameters or {})

  def parameters(self, cwd: str) -> dict:
    """submitit's `SlurmExecutor` parameters (sbatch's options, None left out)."""
    chosen = dict(nodes=self.nodes, ntasks_per_node=self.tasks_per_node,
                  gpus_per_node=self.gpus_per_node or None, cpus_per_task=self.cpus_per_task,
                  mem=self.mem_gb, time=self.time_min, partition=self.partition,
                  account=self.account, qos=self.qos, constraint=self.constraint,
                  signal_delay_s=self.signal_delay_s, array_parallelism=self.array_parallelism,
                  job_name=self.job_name, stderr_to_stdout=True,
                  additional_parameters={'chdir': cwd, **self.additional_parameters},
                  # the job's interpreter imports `Task` from this code
                  setup=[f'export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}'])
    return {name: value for name, value in chosen.items() if value is not None}


def require_sbatch() -> None:
  """UserError unless Slurm's commands are on PATH (run this on the cluster's login node)."""
  if shutil.which('sbatch') is None or shutil.which('squeue') is None:
    raise errors.UsageError('--launcher=slurm: sbatch is not on PATH; submit from a Slurm login '
                            'node (or load its module), or run without --launcher')


def queue_state(job_id: str) -> str | None:
  """The job's state in the queue (`squeue -j`), or None when the queue no longer lists it
  (or there is no squeue here)."""
  if shutil.which('squeue') is None:
    return None
  result = subprocess.run(['squeue', '-h', '-j', str(job_id), '-o', '%T'], capture_output=True,
                          text=True, timeout=60)
  states = result.stdout.split()
  return states[0] if result.returncode == 0 and states else None


def last_record(workdir) -> dict | None:
  """The newest submission recorded in `workdir/slurm.json`, or None."""
  file = paths.resolve(workdir, '--workdir') / RECORD
  return json.loads(file.read_text())[-1] if file.exists() else None


def check_not_queued(workdir) -> None:
  """WorkdirBusy when the newest job submitted for `workdir` is still queued or running."""
  record = last_record(workdir)
  state = queue_state(record['job_id']) if record is not None else None
  if state in ACTIVE_STATES:
    raise errors.WorkdirBusy(f'{workdir} already has Slurm job {record["job_id"]} ({state}); '
                             f'wait for it to end or cancel it (scancel {record["job_id"]}), or '
                             'use another --workdir')


def record_submission(workdir, job: dict) -> None:
  """Appends a submission to `workdir/slurm.json`."""
  file = paths.resolve(workdir, '--workdir') / RECORD
  file.parent.mkdir(parents=True, exist_ok=True)
  entries = json.loads(file.read_text()) if file.exists() else []
  paths.write_atomic(file, json.dumps([*entries, job], indent=1) + '\n')


def submit(launcher: Slurm, commands: list[list[str]], cwd: str, folder: str) -> list[dict]:
  """Queues `commands` as one job (one command) or one job array (several), the files of
  submitit in `folder`; returns per command {'job_id', 'log', 'parameters', 'command'}.
  A submission Slurm refuses raises UsageError with sbatch's message and leaves nothing in
  `folder`."""
  import submitit
  from submitit.core import utils

  existed = set(os.listdir(folder)) if os.path.isdir(folder) else None
  parameters = launcher.parameters(cwd)
  executor = submitit.SlurmExecutor(folder=folder)
  executor.update_parameters(**parameters)
  try:
    if len(commands) == 1:
      jobs = [executor.submit(Task(commands[0], cwd))]
    else:
      with executor.batch():  # one job array
        jobs = [executor.submit(Task(command, cwd)) for command in commands]
  except (utils.FailedJobError, utils.FailedSubmissionError, subprocess.SubprocessError) as e:
    _remove_new_files(folder, existed)
    raise errors.UsageError(f'Slurm refused the job: {_slurm_message(str(e))}') from None
  return [{'job_id': job.job_id, 'log': os.fspath(job.paths.stdout), 'parameters': parameters,
           'command': command} for job, command in zip(jobs, commands)]


def _slurm_message(text: str) -> str:
  """sbatch's first `error:` line (or the text's first line)."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  errors_ = [line for line in lines if 'error:' in line]
  return (errors_ or lines or ['no message'])[0]


def _remove_new_files(folder: str, existed: set | None) -> None:
  if existed is None:
    shutil.rmtree(folder, ignore_errors=True)
    return
  for name in set(os.listdir(folder)) - existed:
    path = os.path.join(folder, name)
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


class Task:
  """What every task of a submitted job runs: `command` (launch.py) in `cwd`, with the
  task's `SLURM_*` environment. Then, in task 0 once every task's run has ended: a requeue
  of the job when the run exited with `errors.PREEMPTED_STATUS`; an exception (a failed job,
  not requeued, the reason in the log above) when it failed."""

  def __init__(self, command: list[str], cwd: str):
    self.command, self.cwd = list(command), cwd

  def __call__(self) -> int:
    # The warning signal reaches launch.py directly (Slurm signals every process of a task);
    # submitit's own handler here would requeue the job before the run has saved. Ignored
    # here, so also by launch.py until its training loop takes it.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    status = subprocess.run(self.command, cwd=self.cwd).returncode
    job, rank = os.environ.get('SLURM_JOB_ID', ''), int(os.environ.get('SLURM_PROCID', '0'))
    restart = os.environ.get('SLURM_RESTART_COUNT', '0')
    folder = os.environ.get('SUBMITIT_FOLDER', self.cwd)
    marker = os.path.join(folder, f'.exit_{job}_{restart}_')
    with open(f'{marker}{rank}', 'w') as f:
      f.write(str(status))
    if rank == 0:
      self._wait_for_tasks(marker, int(os.environ.get('SLURM_NTASKS', '1')))
    if status == errors.PREEMPTED_STATUS:
      if rank == 0:
        print(f'fiddlediff: the run stopped for preemption (exit {status}); requeueing job '
              f'{job}', flush=True)
        subprocess.run(['scontrol', 'requeue', job], check=True, timeout=60)
      return status
    if status != 0:
      raise RuntimeError(f'launch.py exited with status {status} (its error is above); the '
                         'job is not requeued')
    return status

  @staticmethod
  def _wait_for_tasks(marker: str, count: int) -> None:
    """Until every task has written its run's exit status (or EXIT_WAIT_SECS pass)."""
    deadline = time.time() + EXIT_WAIT_SECS
    while len(glob.glob(glob.escape(marker) + '*')) < count and time.time() < deadline:
      time.sleep(0.5)
    for file in glob.glob(glob.escape(marker) + '*'):
      os.remove(file)


def follow_hint(job: dict) -> str:
  """How to follow a submitted job."""
  return (f'job {job["job_id"]}: log {job["log"]}\n  follow it: tail -f {job["log"]}; '
          f'squeue -j {job["job_id"]}')

