"""Background `launch.py` processes for the command-line tests."""

import subprocess
import time
from pathlib import Path

from shufflenet_jax import metrics

ROOT = Path(__file__).resolve().parents[1]


def start(cmd, log_dir: Path):
  """A background process in its own session (so a test can signal its whole group); its output
  goes to a file, since a pipe nobody reads would block it."""
  log_path = Path(log_dir) / f"run_{time.monotonic_ns()}.log"
  with open(log_path, "w") as log:
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
  process.output = lambda: log_path.read_text()
  return process


def wait_for_step(workdir: Path, step: int, process, timeout=180) -> None:
  """Returns once workdir/metrics.jsonl has logged `step`; fails if the process ends first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    lines = metrics.read_metrics(str(workdir)) if (workdir / "metrics.jsonl").exists() else []
    if any(line["step"] >= step for line in lines):
      return
    if process.poll() is not None:
      raise AssertionError(f"run ended early:\n{process.output()[-3000:]}")
    time.sleep(0.2)
  raise AssertionError(f"no step {step} within {timeout}s")
