"""Where training time goes: per-window input wait and device step time, and jax.profiler traces.

`StepTimes` splits a log window into time spent waiting for the next batch and the rest, and
times one step synchronously per window (`step_seconds`). `StepProfiler` writes a jax.profiler
trace of `--config.profile_steps=START:STOP` into WORKDIR/profile, which TensorBoard's profile
plugin reads (`tensorboard --logdir WORKDIR/profile`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import jax

# The progress line flags a window in which more than this share of the time waited for data.
INPUT_BOUND_FRACTION = 0.1
PROFILE_DIR = "profile"
# The keys of a train line that measure time, not training (they differ between identical runs).
TIMING_KEYS = ("img_per_sec", "data_wait_fraction", "step_seconds")


def parse_profile_steps(value: str) -> tuple[int, int] | None:
  """'' -> None (off); 'START:STOP' -> (START, STOP), the steps traced, both included."""
  if value in ("", None):
    return None
  try:
    start, stop = (int(part) for part in str(value).split(":"))
  except ValueError:
    raise ValueError(f"profile_steps={value!r} is not 'START:STOP' (e.g. '100:110')") from None
  if not 1 <= start <= stop:
    raise ValueError(f"profile_steps={value!r}: need 1 <= START <= STOP")
  return start, stop


class StepTimes:
  """Time of one log window: how much of it waited for input, and one step's device time.

  `step_seconds` is measured on the window's last step: the host first waits for the steps
  already queued, then times that step from dispatch to its result (the host waits for it
  anyway to log). So it is the device's time per step when fed, and one step per window runs
  without overlap with the host.
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.start = time.monotonic()
    self.data_wait = 0.0
    self.step_seconds: float | None = None

  @contextlib.contextmanager
  def waiting_for_data(self):
    start = time.monotonic()
    try:
      yield
    finally:
      self.data_wait += time.monotonic() - start

  def exclude(self, seconds: float) -> None:
    """Time that belongs to neither (evaluation, a checkpoint): not part of the window."""
    self.start += seconds

  def timed_step(self, step_fn, state, *args):
    """Runs one step synchronously and records its time."""
    jax.block_until_ready(state)
    start = time.monotonic()
    state, step_metrics = step_fn(state, *args)
    jax.block_until_ready(state)
    self.step_seconds = time.monotonic() - start
    return state, step_metrics

  def elapsed(self) -> float:
    return max(time.monotonic() - self.start, 1e-9)

  def summary(self) -> dict[str, float]:
    values = {"data_wait_fraction": min(1.0, self.data_wait / self.elapsed())}
    if self.step_seconds is not None:
      values["step_seconds"] = self.step_seconds
    return values


def describe(values: dict[str, float]) -> str:
  """The progress line's note: empty unless the window was input-bound."""
  fraction = values.get("data_wait_fraction", 0.0)
  if fraction > INPUT_BOUND_FRACTION:
    return f" input-bound ({fraction:.0%} waiting for data)"
  return ""


class StepProfiler:
  """A jax.profiler trace of steps START..STOP (every process; a run resumed inside the window
  traces the rest of it). Files: WORKDIR/profile/plugins/profile/RUN/HOST.xplane.pb, one
  folder per process when there are several."""

  def __init__(self, profile_steps: str, workdir: Path, first_step: int):
    steps = parse_profile_steps(profile_steps)
    self.active = False
    self.start = self.stop = None
    if steps is not None and first_step < steps[1]:
      self.start, self.stop = max(steps[0], first_step + 1), steps[1]
    self.log_dir = Path(workdir) / PROFILE_DIR
    if jax.process_count() > 1:  # processes on one host would write the same file name
      self.log_dir = self.log_dir / f"process_{jax.process_index()}"

  def before_step(self, step: int) -> None:
    if step == self.start:
      self.log_dir.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.log_dir))
      self.active = True

  def after_step(self, step: int, state) -> None:
    if self.active and step == self.stop:
      jax.block_until_ready(state)
      self.close()
      if jax.process_index() == 0:
        print(f"Profile of steps {self.start}-{self.stop} written to {self.log_dir} "
              f"(tensorboard --logdir {self.log_dir})", flush=True)

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
