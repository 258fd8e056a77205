"""Devices, mesh and shardings: data parallelism as one jit over one mesh of every device.

Params, optimizer and BN state are replicated (`P()`); batches are split on the `data` axis over
every device of every process. Each process feeds only its own slice of the global batch.
"""

from __future__ import annotations

import json
import logging
import socket
import time

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


class ClusterError(RuntimeError):
  """The processes of a multi-host job could not form one cluster."""


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           heartbeat_timeout_seconds: int = 100,
                           initialization_timeout_seconds: int = 300) -> None:
  """Joins the processes of a multi-host job, before any other JAX call; a no-op for one process.

  On TPU pods and SLURM/GKE/Open MPI clusters JAX finds its peers itself (call with no
  arguments); other clusters pass the coordinator's host:port, the process count and this
  process's id. A process that dies is detected by the others within
  `heartbeat_timeout_seconds`, which then abort with an error naming the missing task instead of
  hanging in a collective. A cluster that has not formed within
  `initialization_timeout_seconds` (a wrong count or id, an unreachable coordinator) raises
  ClusterError with what to check.
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if all(v is None for v in given.values()):
    if jax.distributed.is_initialized():
      return
    try:  # auto-detect: TPU pod, SLURM, Open MPI, GKE
      jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                                 initialization_timeout=initialization_timeout_seconds)
    except ValueError as e:  # no cluster environment found
      logging.info("Single-process run (no cluster detected: %s)", e)
    return
  missing = [f"--{k}" for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f"a multi-host job needs --coordinator_address, --num_processes and "
                     f"--process_id together; missing {missing}")
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} is not in [0, {num_processes}) for "
                     f"--num_processes={num_processes}")
  if num_processes == 1:
    return
  # JAX's client aborts the whole process (a C++ fatal error and a stack trace) when a cluster
  # does not form; our own rendezvous on the coordinator's port first turns every such case into
  # one ClusterError on every process that can be told.
  _rendezvous(coordinator_address, num_processes, process_id, initialization_timeout_seconds)
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                               initialization_timeout=initialization_timeout_seconds)
  except Exception as e:  # noqa: BLE001  XLA's runtime errors have no narrower public type
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ClusterError(
        f"process {process_id} of {num_processes} could not join the cluster at "
        f"{coordinator_address} within {initialization_timeout_seconds} s ({reason[:300]}); "
        "check that the coordinator's host:port is reachable from this host, that process 0 "
        "runs there, and that every process has the same --num_processes and its own "
        "--process_id") from None


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--coordinator_address={address!r} is not host:port")
  return host.strip("[]"), int(port)


def _rendezvous(address: str, num_processes: int, process_id: int, timeout: float) -> None:
  """Every process reports (process_id, num_processes) to process 0 over the coordinator's port
  before JAX takes it: duplicate or out-of-range ids, disagreeing counts, missing processes and
  an unreachable coordinator end in a ClusterError within `timeout` seconds."""
  host, port = _split_address(address)
  deadline = time.monotonic() + timeout
  if process_id == 0:
    _rendezvous_chief(port, num_processes, deadline, timeout)
  else:
    _rendezvous_member(host, port, num_processes, process_id, deadline, timeout)


def _rendezvous_chief(port: int, num_processes: int, deadline: float, timeout: float) -> None:
  try:
    server = socket.create_server(("", port))
  except OSError as e:
    raise ClusterError(f"process 0 cannot listen on port {port} ({e.strerror}): another process "
                       "0 of this job is running here, or the port is taken") from None
  members: dict[int, socket.socket] = {}
  try:
    while len(members) < num_processes - 1:
      server.settimeout(max(0.01, deadline - time.monotonic()))
      try:
        connection, _ = server.accept()
        connection.settimeout(max(0.01, deadline - time.monotonic()))
        hello = json.loads(connection.makefile().readline() or "{}")
      except (TimeoutError, OSError, ValueError):
        if time.monotonic() < deadline:
          continue  # a connection that said nothing useful
        missing = sorted(set(range(1, num_processes)) - set(members))
        raise ClusterError(f"only {len(members) + 1} of {num_processes} processes joined within "
                           f"{timeout:g} s; missing --process_id {missing} (check that every "
                           "host runs the same command with its own --process_id)") from None
      if not hello:  # closed without a word (e.g. a port probe): not one of ours
        connection.close()
        continue
      error = None
      if hello.get("num_processes") != num_processes:
        error = (f"process {hello.get('process_id')} was started with --num_processes="
                 f"{hello.get('num_processes')}, process 0 with {num_processes}")
      elif hello.get("process_id") in members:
        error = f"two processes were started with --process_id={hello['process_id']}"
      if error:
        for member in (connection, *members.values()):
          _send(member, {"error": error})
        raise ClusterError(error)
      members[hello["process_id"]] = connection
    for member in members.values():
      _send(member, {"ok": True})
  finally:
    for member in members.values():
      member.close()
    server.close()


def _rendezvous_member(host: str, port: int, num_processes: int, process_id: int,
                       deadline: float, timeout: float) -> None:
  while True:
    try:
      connection = socket.create_connection((host, port), timeout=1)
      break
    except OSError:
      if time.monotonic() >= deadline:
        raise ClusterError(f"process {process_id} could not reach the coordinator at {host}:"
                           f"{port} within {timeout:g} s; check that process 0 runs there and "
                           "that the port is open to this host") from None
      time.sleep(0.2)
  with connection:
    connection.settimeout(max(0.01, deadline - time.monotonic()))
    try:
      _send(connection, {"process_id": process_id, "num_processes": num_processes})
      reply = json.loads(connection.makefile().readline() or "{}")
    except (TimeoutError, OSError, ValueError):
      raise ClusterError(f"process {process_id}: the cluster at {host}:{port} did not form "
                         f"within {timeout:g} s (process 0 is waiting for other processes; "
                         "check --num_processes and every host's --process_id)") from None
  if "error" in reply or not reply.get("ok"):
    raise ClusterError(reply.get("error", f"the coordinator at {host}:{port} closed the "
                                 "rendezvous without an answer"))


def _send(connection: socket.socket, message: dict) -> None:
  try:
    connection.sendall((json.dumps(message) + "\n").encode())
  except OSError:
    pass  # that process is gone; it learns nothing, the others still do


def describe_processes() -> str:
  """The one line every process logs at start: which process it is and what it sees."""
  return (f"process {jax.process_index()} of {jax.process_count()}: "
          f"{jax.local_device_count()} local device(s), {jax.device_count()} global device(s) "
          f"({jax.default_backend()})")


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


_barriers = 0


def barrier(name: str, timeout_seconds: int = 600) -> None:
  """Every process waits here for all the others (the coordination service's barrier: no device
  collective, so no collective timeout); a no-op for one process."""
  global _barriers
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the client jax.distributed.initialize made
  _barriers += 1  # a barrier name is used once
  distributed.global_state.client.wait_at_barrier(f"{name}_{_barriers}", timeout_seconds * 1000)


class CompiledTogether:
  """A jitted step that, on several processes, every process compiles before any runs it: a CPU
  cluster's first collective (gloo) waits only 30 s for its peers, less than a loaded host can
  take to compile a train step, and hosts compile at different speeds everywhere."""

  def __init__(self, jitted, name: str):
    self.jitted, self.name, self.compiled = jitted, name, None

  def __call__(self, *args):
    if jax.process_count() == 1:
      return self.jitted(*args)
    if self.compiled is None:
      self.compiled = self.jitted.lower(*args).compile()
      barrier(f"{self.name} compiled")
    return self.compiled(*args)


def is_chief() -> bool:
  """Process 0 alone writes logs, metrics and config files."""
  return jax.process_index() == 0
