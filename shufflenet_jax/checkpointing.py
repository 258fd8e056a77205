"""Checkpoints: the only module that talks to Orbax.

One checkpoint = the train state (params, BN statistics, optimizer, step) + every process's grain
iterator state, so a resumed run reads exactly the batches an uninterrupted run would have.
Saves are asynchronous; Orbax writes to a temporary directory and renames it when complete, so a
crash mid-save leaves the previous checkpoint usable. The state is restored onto whatever mesh the
caller gives (replicated), so a run saved on 8 devices resumes on 4, and the data position onto
any number of processes and grain workers (pipeline.TrainIterator).

A restore tells two failures apart. A *mismatch* (the checkpoint's parameter names or shapes are
not the config's model, or its data iterator reads another stream) means the config is wrong,
never the checkpoint: it raises CheckpointMismatchError (pipeline.DataStreamMismatchError) and
touches nothing. *Corruption* (unreadable bytes, missing files, a
missing data-iterator state) means that checkpoint cannot be resumed: a training run moves it to
WORKDIR/unreadable_checkpoints/ and falls back to the previous one; a read-only checkpointer
(eval, predict, export) skips it and moves nothing.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from shufflenet_jax.data import pipeline

# Replica-parallel saving splits every replicated array across its replicas, which compiles one
# slice program per array shape before the first save (measured: 72 programs, 2.6 s on a 2-core
# CPU for the smoke model's 206 arrays). It pays only for large arrays; a ShuffleNet's are small.
REPLICA_PARALLEL_MIN_BYTES = 4 << 20


def _register_array_handler() -> None:
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns about every override
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True)
  finally:
    absl_logging.set_verbosity(verbosity)


_register_array_handler()


class CheckpointMismatchError(ValueError):
  """The checkpoint holds another model than the config describes (the config is wrong)."""


class _DataHandler(grain.checkpoint.CheckpointHandler):
  """grain's handler (one process_{i}-of-{n}.json per process), restoring a run saved by
  another number of processes too: every process reads the same step of one stream, so any
  process's state positions this one (pipeline.TrainIterator translates it)."""

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    own = Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = [own] if own.exists() else sorted(Path(directory).glob("process_*-of-*.json"))
    if not saved:
      raise ValueError(f"{directory} holds no data-iterator state")
    item.set_state(saved[0].read_bytes())
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  item: object


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  item: object


class _IteratorSnapshot:
  """The iterator state as of `save()`; the async write must not see later batches."""

  def __init__(self, iterator):
    self._state = iterator.get_state()

  def get_state(self) -> bytes:
    return self._state


def _leaf_name(path) -> str:
  """'params/stages/0/1/conv/kernel' for a tree path (nnx Variables end in '/value')."""
  name = jax.tree_util.keystr(path, simple=True, separator="/")
  return name.removesuffix("/value")


def _shapes(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_leaf_name(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def first_difference(saved: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
  """The first parameter whose presence, shape or dtype differs, in words; None if none does."""
  for name in sorted(set(saved) | set(expected), key=lambda n: (not n.startswith("params/"), n)):
    if name not in saved:
      return f"{name} is not in the checkpoint"
    if name not in expected:
      return f"the checkpoint has {name}, which this config's model does not"
    if saved[name] != expected[name]:
      (shape, dtype), (want_shape, want_dtype) = saved[name], expected[name]
      return (f"{name} is {dtype}{list(shape)} in the checkpoint and {want_dtype}"
              f"{list(want_shape)} with this config")
  return None


class Checkpointer:
  """`read_only=True` (eval, predict, export): never creates, moves or deletes anything."""

  def __init__(self, workdir: str, *, keep: int = 3, every_steps: int = 1000,
               read_only: bool = False):
    self.directory = Path(workdir).expanduser().absolute() / "checkpoints"
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=0 if read_only else max(1, every_steps),
        create=not read_only, read_only=read_only, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": _DataHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, iterator, *, force: bool = False) -> bool:
    """Starts an async save when `step` is on the interval (or `force`); True if it did.
    `iterator=None` (imported weights) saves the state alone."""
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
      items["data"] = _DataSave(_IteratorSnapshot(iterator))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def check_matches(self, step: int, abstract_state) -> None:
    """Raises CheckpointMismatchError if checkpoint `step` holds another model than
    `abstract_state`; OSError/ValueError from Orbax if its metadata is unreadable."""
    saved = _shapes(self.manager.item_metadata(step)["state"])
    difference = first_difference(saved, _shapes(abstract_state))
    if difference is not None:
      raise CheckpointMismatchError(
          f"checkpoint {step} in {self.directory} does not match the config: {difference}. The "
          "config is wrong, not the checkpoint (nothing was moved): pass the run's own config, "
          "or leave out --config to use the workdir's config.json")

  def restore(self, abstract_state, iterator=None, step: int | None = None,
              any_data_order: bool = False):
    """(step, state) from the newest usable checkpoint (or `step`); older ones if the newest is
    corrupt. `abstract_state` carries the target shardings. None if there is no checkpoint.

    With `iterator`, a checkpoint after step 0 must hold the iterator state (else the resumed
    run would read other batches): one without it counts as incomplete, unless
    `any_data_order`, which resumes it with a fresh iterator and says so."""
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    for candidate in steps:
      try:
        self.check_matches(candidate, abstract_state)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # metadata unreadable: corrupt
        if step is not None:
          raise
        self._unusable(candidate, f"is unreadable ({type(e).__name__}: {e})")
        continue
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      has_data = (self.directory / str(candidate) / "data").is_dir()
      if iterator is not None and has_data:
        items["data"] = _DataRestore(iterator)
      elif iterator is not None and candidate > 0:
        if not any_data_order:
          self._unusable(candidate, "has no data-iterator state (checkpoints/"
                         f"{candidate}/data is missing), so resuming it would read other batches "
                         "(--config.resume=any_data_order resumes it anyway)")
          continue
        print(f"WARNING: checkpoint {candidate} has no data-iterator state; resuming with a "
              "fresh data order (resume=any_data_order): this run no longer reads the batches "
              "an uninterrupted run would", flush=True)
      try:
        restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
      except pipeline.DataStreamMismatchError:
        raise
      except Exception as e:  # a truncated or corrupted checkpoint: set it aside, go back one
        if step is not None:
          raise
        self._unusable(candidate, f"is unreadable ({type(e).__name__}: {e})")
        continue
      return candidate, restored["state"]
    return None

  def _unusable(self, step: int, reason: str) -> None:
    if self.read_only:
      print(f"WARNING: checkpoint {step} {reason}; using the previous one (nothing was moved)",
            flush=True)
      return
    kept = self._set_aside(step)
    print(f"WARNING: checkpoint {step} {reason}; moved to {kept}; falling back to the previous "
          "one", flush=True)

  def _set_aside(self, step: int) -> Path:
    """Moves an unusable checkpoint out of the manager's way, keeping its files."""
    target = self.directory.parent / "unreadable_checkpoints" / f"{step}_{int(time.time())}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self.manager.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
