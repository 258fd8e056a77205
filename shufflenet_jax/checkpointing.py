"""Checkpoints: the only module that talks to Orbax.

One checkpoint = the train state (params, BN statistics, optimizer, step) + every process's grain
iterator state, so a resumed run reads exactly the batches an uninterrupted run would have.
Saves are asynchronous; Orbax writes to a temporary directory and renames it when complete, so a
crash mid-save leaves the previous checkpoint usable. The state is restored onto whatever mesh the
caller gives (replicated), so a run saved on 8 devices resumes on 4.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grain
import orbax.checkpoint as ocp


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
    """Starts an async save when `step` is on the interval (or `force`); True if it did."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator))), force=force)

  def restore(self, abstract_state, iterator=None, step: int | None = None):
    """(step, state) from the newest readable checkpoint (or `step`); older ones if the newest is
    corrupt. `abstract_state` carries the target shardings. None if there is no checkpoint."""
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    for candidate in steps:
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(iterator)
      try:
        restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
      except Exception as e:  # a truncated or corrupted checkpoint: report it and go back one
        if step is not None:
          raise
        logging.error("Checkpoint at step %d in %s is unreadable (%s: %s); trying an older one",
                      candidate, self.directory, type(e).__name__, e)
        print(f"WARNING: checkpoint {candidate} is unreadable ({type(e).__name__}); "
              "falling back to the previous one", flush=True)
        continue
      return candidate, restored["state"]
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
