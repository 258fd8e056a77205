"""Checkpoints: the only module that talks to Orbax.

One checkpoint = the train state (params, BN statistics, optimizer, step) + every process's grain
iterator state, so a resumed run reads exactly the batches an uninterrupted run would have.
Saves are asynchronous; Orbax writes to a temporary directory and renames it when complete, so a
crash mid-save leaves the previous checkpoint usable. The state is restored onto whatever mesh the
caller gives (replicated), so a run saved on 8 devices resumes on 4.
"""

from __future__ import annotations

import time
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class _IteratorSnapshot:
  """The iterator state as of `save()`; the async write must not see later batches."""

  def __init__(self, iterator):
    self._state = iterator.get_state()

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int = 3, every_steps: int = 1000):
    self.directory = Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, every_steps), create=True,
        enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, iterator, *, force: bool = False) -> bool:
    """Starts an async save when `step` is on the interval (or `force`); True if it did.
    `iterator=None` (imported weights) saves the state alone."""
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, iterator=None, step: int | None = None):
    """(step, state) from the newest readable checkpoint (or `step`); older ones if the newest is
    corrupt. `abstract_state` carries the target shardings. None if there is no checkpoint."""
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    for candidate in steps:
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if iterator is not None and (self.directory / str(candidate) / "data").exists():
        items["data"] = grain.checkpoint.CheckpointRestore(iterator)  # else: a fresh iterator
      try:
        restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
      except Exception as e:  # a truncated or corrupted checkpoint: set it aside, go back one
        if step is not None:
          raise
        kept = self._set_aside(candidate)
        print(f"WARNING: checkpoint {candidate} is unreadable ({type(e).__name__}: {e}); moved "
              f"to {kept}; falling back to the previous one", flush=True)
        continue
      return candidate, restored["state"]
    return None

  def _set_aside(self, step: int) -> Path:
    """Moves an unreadable checkpoint out of the manager's way, keeping its files."""
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
