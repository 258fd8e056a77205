"""Background `launch.py` processes for the command-line tests."""

import os
import subprocess
import time
from pathlib import Path

from shufflenet_jax import workdir as workdir_files

ROOT = Path(__file__).resolve().parents[1]


def start(cmd, log_dir: Path, env: dict | None = None):
  """A background process in its own session (so a test can signal its whole group); its output
  goes to a file, since a pipe nobody reads would block it. `env` adds to (and replaces in) the
  test's environment."""
  log_path = Path(log_dir) / f"run_{time.monotonic_ns()}.log"
  with open(log_path, "w") as log:
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, **(env or {})})
  process.output = lambda: log_path.read_text()
  return process


def wait_for_step(workdir: Path, step: int, process, timeout=180) -> None:
  """Returns once workdir/metrics.jsonl has logged `step`; fails if the process ends first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    lines = workdir_files.read_metrics(str(workdir)) if (workdir / "metrics.jsonl").exists() else []
    if any(line["step"] >= step for line in lines):
      return
    if process.poll() is not None:
      raise AssertionError(f"run ended early:\n{process.output()[-3000:]}")
    time.sleep(0.2)
  raise AssertionError(f"no step {step} within {timeout}s")


def run(cmd, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
  """A command run to its end from the repository root, its output captured as text."""
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)
