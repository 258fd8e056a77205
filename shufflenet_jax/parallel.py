"""Devices, mesh and shardings: data parallelism as one jit over one mesh of every device.

Params, optimizer and BN state are replicated (`P()`); batches are split on the `data` axis over
every device of every process. Each process feeds only its own slice of the global batch.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


# XLA:CPU runs independent ops of a step concurrently by default. The models' ops are bound by
# memory traffic, and two at once evict each other's data from the cache; the memory-optimised
# scheduler runs them one after another (each op still uses every core): the V1 1x g3 train step
# is 1.20x faster with it on the 2-core CI machine (BENCHMARKS.md, "matmul+xla_defaults" row).
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(backend: str | None = None) -> dict[str, str]:
  """XLA options for jit on `backend` (default: JAX's default backend), each one measured."""
  return dict(CPU_COMPILER_OPTIONS) if (backend or jax.default_backend()) == "cpu" else {}


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           heartbeat_timeout_seconds: int = 100) -> None:
  """Joins the processes of a multi-host job; a no-op for a single process.

  On TPU pods and SLURM/GKE clusters JAX finds its peers itself (call with no arguments); other
  clusters pass the coordinator's host:port, the process count and this process's id. A process
  that dies is detected by the others within `heartbeat_timeout_seconds`, which then abort with
  an error naming the missing task instead of hanging in a collective.
  """
  if coordinator_address is None and num_processes is None:
    if jax.distributed.is_initialized():
      return
    try:  # auto-detect: TPU pod, SLURM, Open MPI, GKE
      jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    except (ValueError, RuntimeError) as e:
      logging.info("Single-process run (no cluster detected: %s)", e)
    return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """The one mesh of this project: every device of every process on the `data` axis.

  `devices` (a subset) exists for tests and tools that compare device counts in one process.
  """
  devices = list(devices) if devices is not None else jax.devices()
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh, what: str = "batch_size") -> int:
  """Per-process batch size; errors if the global batch does not split evenly over the devices."""
  devices = mesh.devices.size
  if global_batch <= 0 or global_batch % devices:
    raise ValueError(f"{what}={global_batch} is not divisible by the {devices} devices "
                     f"({jax.process_count()} process(es)); use a multiple of {devices}")
  return global_batch // jax.process_count()


def global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
  """This process's slice of the batch -> global arrays sharded on `data` over all processes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def replicate(tree, mesh: jax.sharding.Mesh):
  """Places a host/device pytree replicated on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def is_chief() -> bool:
  """Process 0 alone writes logs, metrics and config files."""
  return jax.process_index() == 0
