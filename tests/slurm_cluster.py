"""A real single-node Slurm cluster for the tests: Debian's munged, slurmctld and slurmd (installed
by `.ci/run`), all in the foreground as children of the `slurm` fixture (session-scoped), with
a private munge key and socket, private ports, state, spool, pid and log files in a temporary
folder, and `SLURM_CONF` in this process's environment (launched subprocesses and the Slurm
commands inherit it).

The node is this host (`NodeAddr=127.0.0.1`, its CPUs and memory), in one default partition
`debug`; `cred_expire=10` makes a requeued job start again after ~15 s instead of ~2 min.
Stopping cancels every job, waits until `squeue` is empty and no step daemon (slurmstepd,
which outlives slurmd) holds a socket in the spool folder, then stops slurmd, slurmctld and
munged by PID.

Without the binaries the fixture skips, except under CI (`CI` set), where it fails: CI runs
every test.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

DAEMONS = ('munged', 'slurmctld', 'slurmd')
PARTITION = 'debug'


def _binary(name: str) -> str | None:
  return shutil.which(name) or next(
      (path for path in (f'/usr/sbin/{name}', f'/sbin/{name}') if os.path.exists(path)), None)


def _config(folder: str, munge_socket: str) -> str:
  host = socket.gethostname()
  cpus = os.cpu_count()
  memory_mb = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**20 - 1024
  return f"""\
ClusterName=fiddlediff-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=10
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=10
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
  """The running daemons; `environment` is what a Slurm client needs (`SLURM_CONF`)."""

  def __init__(self, folder: str):
    self.folder = folder
    self.processes: list[subprocess.Popen] = []
    munge_socket = f'{folder}/munge/socket'
    os.makedirs(f'{folder}/munge', mode=0o700)
    for name in ('state', 'spool'):
      os.makedirs(f'{folder}/{name}')
    key = f'{folder}/munge/munge.key'
    with open(key, 'wb') as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    self.conf = f'{folder}/slurm.conf'
    with open(self.conf, 'w') as f:
      f.write(_config(folder, munge_socket))
    self.environment = {'SLURM_CONF': self.conf}
    self._start([_binary('munged'), '-F', f'--key-file={key}', f'--socket={munge_socket}',
                 f'--pid-file={folder}/munge/munged.pid', f'--log-file={folder}/munge/munged.log',
                 f'--seed-file={folder}/munge/munged.seed', '--force'])
    self._wait(lambda: os.path.exists(munge_socket), 'munged did not open its socket')
    self._start([_binary('slurmctld'), '-D', '-i', '-f', self.conf])
    self._start([_binary('slurmd'), '-D', '-f', self.conf])
    self._wait(lambda: self.run('sinfo', '-h', '-o', '%T').stdout.strip() == 'idle',
               'the node did not become idle')

  def _start(self, command: list[str]) -> None:
    log = open(f'{self.folder}/{os.path.basename(command[0])}.out', 'w')
    self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, 'SLURM_CONF': self.conf}))

  def _wait(self, ready, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not ready():
      ended = [p.args[0] for p in self.processes if p.poll() is not None]
      if ended or time.time() > deadline:
        logs = '\n'.join(f'{name}: ' + open(f'{self.folder}/{name}.out').read()[-1500:]
                         for name in DAEMONS if os.path.exists(f'{self.folder}/{name}.out'))
        self.stop()
        raise RuntimeError(f'Slurm test cluster: {what} (ended: {ended})\n{logs}')
      time.sleep(0.2)

  def run(self, *command: str) -> subprocess.CompletedProcess:
    """A Slurm client command against this cluster."""
    return subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **self.environment})

  def cancel_all(self) -> None:
    """Cancels every job and waits until none is left and no step daemon runs."""
    self.run('scancel', '--full', '--user=root')
    deadline = time.time() + 60
    while time.time() < deadline:
      queued = self.run('squeue', '-h', '-o', '%i').stdout.strip()
      steps = [name for name in os.listdir(f'{self.folder}/spool')  # HOST_JOB.STEP, jobNNNNN
               if name.startswith((f'{socket.gethostname()}_', 'job'))]
      if not queued and not steps:
        return
      time.sleep(0.3)

  def stop(self) -> None:
    if any(p.poll() is None for p in self.processes[1:]):
      self.cancel_all()
    for process in reversed(self.processes):  # slurmd, slurmctld, munged
      process.terminate()
      try:
        process.wait(timeout=20)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope='session')
def slurm():
  """The cluster, with this process's environment pointing at it; both undone afterwards."""
  missing = [name for name in DAEMONS + ('sbatch',) if _binary(name) is None]
  if missing:
    message = (f'Slurm test cluster: {", ".join(missing)} not installed (apt-get install '
               'slurmctld slurmd slurm-client munge, as .ci/run does)')
    if os.environ.get('CI'):
      pytest.fail(message)
    pytest.skip(message)
  folder = tempfile.mkdtemp(prefix='slurm-')
  cluster = Cluster(folder)
  saved = dict(os.environ)
  os.environ.update(cluster.environment)
  try:
    yield cluster
  finally:
    os.environ.clear()
    os.environ.update(saved)
    cluster.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def slurm_clean(slurm):
  """The cluster, every job cancelled after the test."""
  yield slurm
  slurm.cancel_all()
