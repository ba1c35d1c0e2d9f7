"""Multi-host start-up: `jax.distributed.initialize` from flags or the cluster environment.

Every process runs the same `launch.py` command. With `--coordinator_address`,
`--num_processes` and `--process_id` the processes meet at the coordinator; without them,
JAX's own cluster detection is used when the environment names a multi-process job
(`JAX_COORDINATOR_ADDRESS`, SLURM with several tasks, Open MPI, a Cloud TPU VM, whose pod
hosts JAX reads from the metadata server, or GKE's TPU variables); otherwise the run is
single-process. So a pod runs the same command on every host with no flag
(`gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...`). On CPU the processes exchange data through gloo collectives.
"""

import os

import jax
from absl import logging

_CLUSTER_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES')


def _on_tpu_vm() -> bool:
  """TPU chips on this host's PCI bus (JAX's own test for a Cloud TPU VM)."""
  from jax._src import hardware_utils
  return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def _in_cluster() -> bool:
  if any(os.environ.get(name) for name in _CLUSTER_VARIABLES) or _on_tpu_vm():
    return True
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the job's processes (once, before any other JAX call that touches devices)."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in explicit):
    if not all(value is not None for value in explicit):
      raise ValueError('--coordinator_address, --num_processes and --process_id go together; '
                       f'got {coordinator_address!r}, {num_processes!r}, {process_id!r}')
  elif not _in_cluster():
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  # Open the collectives' communicator now, while the processes leave `initialize` together:
  # gloo waits only 30 s for its peers, and the first collective otherwise comes after start-up
  # work that takes longer on process 0 (writing the config, first imports).
  barrier('start')
  logging.info('Process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'fiddlediff:{name}')
