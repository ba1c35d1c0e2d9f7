"""Launching checked runs elsewhere than in this process: one run or a sweep's members, as Slurm
jobs (one job, or one job array) or, for a sweep without a launcher, as local launch.py
processes one after another (or `parallel` at a time).

    plans = [Planned(workdir, ('optimizer.learning_rate=1e-3',), total_steps=1000), ...]
    launch(plans, base_command, launcher=Slurm(...), sweep_folder='runs/lr')

launch.py has resolved, built and checked every member before; here each workdir is checked
to be usable, not locked by a live run and not queued already, before anything starts; a
member whose newest checkpoint is at its last step is finished and left alone. A sweep's
folder gets `sweep.json`: the axes' members, their overrides and workdirs, and per launch
their job ids on Slurm.
"""

import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import time

from lib import checkpoint, errors, paths
from lib import workdir as workdirs
from lib.cluster import slurm

SWEEP_RECORD = 'sweep.json'
LOCAL_LOG = 'launch.log'  # a local sweep member's output, in its workdir


@dataclasses.dataclass(frozen=True)
class Planned:
  workdir: paths.Path
  assignments: tuple[str, ...]  # the member's --fdl_set values (none for a single run)
  total_steps: int
  name: str = ''  # the member's name in its sweep

  def command(self, base: list[str]) -> list[str]:
    return [*base, f'--workdir={os.fspath(self.workdir)}',
            *(f'--fdl_set={assignment}' for assignment in self.assignments)]


def finished(plan: Planned) -> bool:
  """The newest checkpoint of the member's workdir is at its last step."""
  step = checkpoint.latest_step(plan.workdir)
  return step is not None and step >= plan.total_steps


def check_free(workdir) -> None:
  """UserError unless `workdir` is usable, no live run holds its lock and no Slurm job of it
  is queued or running. Leaves the workdir as it was."""
  workdirs.check_usable(workdir)
  slurm.check_not_queued(workdir)
  if (paths.resolve(workdir, '--workdir') / 'lock').exists():
    lock = workdirs.WorkdirLock(workdir)
    lock.acquire()  # WorkdirBusy naming the holder
    lock.release()


def launch(plans: list[Planned], base_command: list[str], launcher: slurm.Slurm | None,
           sweep_folder=None, parallel: int = 1) -> int:
  """Starts the unfinished plans: on Slurm (`launcher`), else locally. Returns an exit status:
  0 when everything was queued or every local run ended, else the first failed run's."""
  for plan in plans:
    check_free(plan.workdir)
  todo = [plan for plan in plans if not finished(plan)]
  for plan in plans:
    if plan not in todo:
      print(f'{plan.name or plan.workdir}: finished (step {plan.total_steps}), left alone')
  jobs = _submit(launcher, todo, base_command, sweep_folder or plans[0].workdir) \
      if launcher and todo else []
  for plan, job in zip(todo, jobs):
    slurm.record_submission(plan.workdir, job)
    print(f'{plan.name or plan.workdir}: {slurm.follow_hint(job)}')
  if sweep_folder is not None:
    _record_sweep(sweep_folder, plans, base_command, {plan.name: job['job_id']
                                                      for plan, job in zip(todo, jobs)})
  if launcher or not todo:
    return 0
  return _run_locally(todo, base_command, parallel)


def _submit(launcher: slurm.Slurm, todo: list[Planned], base_command: list[str],
            workdir) -> list[dict]:
  """slurm.submit, the logs in the launcher's log folder; a refused submission leaves no
  folder it created behind."""
  folder = _log_folder(launcher, workdir)
  created = next((path for path in (os.fspath(workdir), folder) if not os.path.exists(path)),
                 None)
  try:
    return slurm.submit(launcher, [plan.command(base_command) for plan in todo], os.getcwd(),
                        folder)
  except errors.UserError:
    if created is not None:
      shutil.rmtree(created, ignore_errors=True)
    raise


def _log_folder(launcher: slurm.Slurm, workdir) -> str:
  if launcher.log_folder:
    return launcher.log_folder
  if paths.is_url(workdir):
    raise errors.UsageError(f'--launcher=slurm with --workdir={workdir}: Slurm writes its logs to '
                            'a shared file system; set --launcher_set=log_folder=DIR')
  return os.path.join(os.fspath(workdir), 'slurm')


def _record_sweep(folder, plans: list[Planned], base_command: list[str],
                  job_ids: dict[str, str]) -> None:
  """Writes `sweep.json`, keeping the job ids of earlier launches."""
  file = paths.resolve(folder, '--workdir') / SWEEP_RECORD
  earlier = {member['name']: member.get('job_ids', [])
             for member in (json.loads(file.read_text())['members'] if file.exists() else [])}
  members = [{'name': plan.name, 'workdir': os.fspath(plan.workdir),
              'overrides': list(plan.assignments),
              'job_ids': earlier.get(plan.name, []) + ([job_ids[plan.name]]
                                                       if plan.name in job_ids else [])}
             for plan in plans]
  file.parent.mkdir(parents=True, exist_ok=True)
  paths.write_atomic(file, json.dumps({
      'updated': datetime.datetime.now().isoformat(timespec='seconds'),
      'command': base_command, 'members': members}, indent=1) + '\n')


def _run_locally(todo: list[Planned], base_command: list[str], parallel: int) -> int:
  """Runs the members as launch.py processes, `parallel` at a time, each one's output in
  `WORKDIR/launch.log` (a bucket workdir's on this terminal); returns 0, or the first failed
  member's status."""
  waiting, running, statuses = list(todo), [], {}
  while waiting or running:
    while waiting and len(running) < parallel:
      plan = waiting.pop(0)
      plan.workdir.mkdir(parents=True, exist_ok=True)
      if paths.is_url(plan.workdir):  # the output stays on this terminal
        log = None
        print(f'{plan.name}: running', flush=True)
      else:
        log = open(os.fspath(plan.workdir / LOCAL_LOG), 'a')
        print(f'{plan.name}: running, log {plan.workdir / LOCAL_LOG}', flush=True)
      running.append((plan, log, subprocess.Popen(plan.command(base_command), stdout=log,
                                                  stderr=subprocess.STDOUT)))
    for entry in list(running):
      plan, log, process = entry
      if process.poll() is not None:
        if log is not None:
          log.close()
        running.remove(entry)
        statuses[plan.name] = process.returncode
        print(f'{plan.name}: exit status {process.returncode}'
              + ('' if process.returncode == 0 else f' (see {plan.workdir / LOCAL_LOG})'),
              flush=True)
    time.sleep(0.2)
  failed = [status for status in statuses.values() if status != 0]
  return failed[0] if failed else 0
