"""Metrics: top-k with masks, JSONL + TensorBoard writers (process 0), console progress."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from shufflenet_jax import workdir as workdir_files


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k largest logits, per example."""
  topk = jax.lax.top_k(logits, k)[1]
  return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


class MetricWriter:
  """Appends one JSON object per line to workdir/metrics.jsonl and mirrors scalars to
  TensorBoard event files (tensorboardX: no TensorFlow). Only the chief process writes. A
  partial last line (a crash mid-write) is mended first, so appends start on a line of their
  own."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = Path(workdir) / workdir_files.METRICS_FILE
    self._tb = None
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      repaired = workdir_files.repair_metrics(self.path.parent)
      if repaired is not None:
        print(f"WARNING: {self.path} ended in a partial line (a crash mid-write); moved it to "
              f"{repaired}", flush=True)
      try:
        from tensorboardX import SummaryWriter  # optional: metrics.jsonl is the record
        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
      except ImportError:
        self._tb = None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """One console line with step, throughput and ETA, rewritten in place on a terminal."""

  def __init__(self, total_steps: int, first_step: int, enabled: bool = True, stream=sys.stderr):
    self.total, self.first = total_steps, first_step
    self.enabled, self.stream = enabled, stream
    self.start = time.monotonic()
    self.tty = hasattr(stream, "isatty") and stream.isatty()

  def update(self, step: int, message: str = "") -> None:
    if not self.enabled:
      return
    elapsed = time.monotonic() - self.start
    done = step - self.first
    rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else math.inf
    width = 24
    filled = int(width * step / max(1, self.total))
    line = (f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} "
            f"{rate:.2f} step/s ETA {_format_seconds(eta)} {message}")
    if self.tty:
      self.stream.write("\r" + line[:160].ljust(160))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "--:--"
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
