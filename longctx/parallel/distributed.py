"""Multi-process start-up: `jax.distributed.initialize` from the environment, before anything touches a device.

* Explicit (any cluster, and localhost tests): LONGCTX_COORDINATOR_ADDRESS (host:port of process 0),
  LONGCTX_NUM_PROCESSES, LONGCTX_PROCESS_ID, optionally LONGCTX_LOCAL_DEVICE_IDS (comma-separated).
* TPU pod slices, SLURM and Open MPI jobs: jax finds the coordinator, process count and id itself; we only call it
  when the environment says there are several processes (TPU_WORKER_HOSTNAMES with more than one host,
  SLURM_NTASKS > 1, OMPI_COMM_WORLD_SIZE > 1).
CPU processes exchange collectives over gloo, whose first collective gives up when another process is more than 30 s
behind; `barrier` lines the processes up (through the coordination service, with a long timeout) before the points
where their compile times can drift that far apart.
"""
from __future__ import annotations

import itertools
import os

import jax
from absl import logging


def _several(name: str) -> bool:
  try:
    return int(os.environ.get(name, '1')) > 1
  except ValueError:
    return False


def cluster_detected() -> bool:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1 or _several('SLURM_NTASKS') or _several('OMPI_COMM_WORLD_SIZE')


def initialize() -> bool:
  """Joins the job's other processes when there are any; returns whether it did."""
  env = os.environ
  explicit = env.get('LONGCTX_NUM_PROCESSES')
  if not explicit and not cluster_detected():
    return False
  if explicit and int(explicit) <= 1:
    return False
  if explicit:
    missing = [k for k in ('LONGCTX_COORDINATOR_ADDRESS', 'LONGCTX_PROCESS_ID') if not env.get(k)]
    if missing:
      raise ValueError(f'LONGCTX_NUM_PROCESSES={explicit} needs {" and ".join(missing)} set as well')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    local = env.get('LONGCTX_LOCAL_DEVICE_IDS')
    jax.distributed.initialize(
        coordinator_address=env['LONGCTX_COORDINATOR_ADDRESS'], num_processes=int(explicit),
        process_id=int(env['LONGCTX_PROCESS_ID']),
        local_device_ids=[int(i) for i in local.split(',')] if local else None)
  else:
    jax.distributed.initialize()
  logging.info('process %d of %d, %d local devices of %d', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


_barriers = itertools.count()


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process of the job reaches this point; nothing to do in a single process."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  if client is None:
    raise RuntimeError(f'barrier {name!r}: {jax.process_count()} processes but no jax.distributed client')
  client.wait_at_barrier(f'longctx/{name}/{next(_barriers)}', timeout_in_ms=timeout_s * 1000)


def compile_together(jitted, name: str, *args) -> None:
  """Compiles `jitted` for `args` and waits for every process to have done the same, so that no process enters the
  step's first collective while another is still compiling; nothing to do in a single process."""
  if jax.process_count() == 1:
    return
  jitted.lower(*args).compile()
  barrier(f'compiled {name}')
