"""Multi-process start-up: `jax.distributed.initialize` from the environment, before anything touches a device.

* Explicit (any cluster, and localhost tests): LONGCTX_COORDINATOR_ADDRESS (host:port of process 0),
  LONGCTX_NUM_PROCESSES, LONGCTX_PROCESS_ID, optionally LONGCTX_LOCAL_DEVICE_IDS (comma-separated).
* TPU pod slices, SLURM and Open MPI jobs: jax finds the coordinator, process count and id itself; we only call it
  when the environment says there are several processes (TPU_WORKER_HOSTNAMES with more than one host,
  SLURM_NTASKS > 1, OMPI_COMM_WORLD_SIZE > 1).
CPU processes exchange collectives over gloo.
"""
from __future__ import annotations

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
