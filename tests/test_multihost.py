"""A real 2-process cluster on 127.0.0.1 (jax.distributed, gloo collectives), 2 CPU devices each."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import fake_data

pytestmark = pytest.mark.slow  # subprocesses; minutes in all, and they run in CI

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost_data")
  return fake_data.write_fashion_mnist(root / "idx"), root / "tfds"


def _launch(mode, out, data, num_processes, devices, steps=6):
  idx, tfds_dir = data
  port = _free_port()
  env = {**os.environ, "STEPS": str(steps)}
  env.pop("XLA_FLAGS", None)
  processes = []
  for i in range(num_processes):
    log = open(out / f"{mode}_{num_processes}_{i}_{port}.log", "w")  # a file: a full pipe blocks
    process = subprocess.Popen(
        [sys.executable, str(WORKER), mode, str(i), str(num_processes), str(port), str(devices),
         str(out), str(idx), str(tfds_dir)], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT, text=True)
    process.log_path = Path(log.name)
    log.close()
    processes.append(process)
  return processes


def _finish(processes, timeout=300):
  """Waits for every process; on a failure or timeout, kills all and shows every output."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and any(p.poll() is None for p in processes):
    if any(p.poll() not in (None, 0) for p in processes):
      break  # one failed: the others may wait for it forever
    time.sleep(0.2)
  for p in processes:
    if p.poll() is None:
      p.kill()
    p.wait()
  outputs = [p.log_path.read_text() for p in processes]
  report = "\n".join(f"--- process {i} (exit {p.returncode}):\n{out[-3000:]}"
                     for i, (p, out) in enumerate(zip(processes, outputs)))
  assert all(p.returncode == 0 for p in processes), report
  return outputs


def _wait_until_training(processes, out, lines: int = 3, timeout: float = 180) -> None:
  metrics_file = out / "run" / "metrics.jsonl"
  deadline = time.monotonic() + timeout
  while not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= lines):
    assert time.monotonic() < deadline, f"no training after {timeout}s"
    assert all(p.poll() is None for p in processes), processes[0].log_path.read_text()[-3000:]
    time.sleep(0.2)


def test_two_processes_match_one_process_on_the_same_global_batches(data, tmp_path):
  _finish(_launch("steps", tmp_path, data, 2, 2))
  _finish(_launch("steps", tmp_path, data, 1, 4))
  reference = np.load(tmp_path / "params_1_0.npz")
  for process in (0, 1):
    params = np.load(tmp_path / f"params_2_{process}.npz")
    assert len(params.files) == len(reference.files)
    for key in reference.files:
      np.testing.assert_allclose(params[key], reference[key], rtol=1e-5, atol=1e-6)


def test_two_process_training_evaluates_exactly_and_checkpoints_both_iterators(data, tmp_path):
  outputs = _finish(_launch("train", tmp_path, data, 2, 2))
  results = [json.loads((tmp_path / f"result_train_2_{i}.json").read_text()) for i in (0, 1)]
  for result in results:
    assert result["process_count"] == 2
    assert result["eval/num_examples"] == 37  # every example once across both processes
  assert results[0]["eval/top1"] == results[1]["eval/top1"]
  run = tmp_path / "run"
  lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert len(lines) == 6 + 2  # one line per train step and per eval: process 0 alone writes
  assert "Done: step 6" in outputs[0] and "Done: step" not in outputs[1]
  data_files = sorted(p.name for p in (run / "checkpoints" / "6" / "data").glob("*.json"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
  # Both processes restore the same checkpoint (the finished run is re-evaluated).
  outputs = _finish(_launch("train", tmp_path, data, 2, 2))
  assert "already holds the finished run (step 6)" in outputs[0]


def test_a_dead_process_takes_the_job_down_quickly_with_a_message(data, tmp_path):
  processes = _launch("train", tmp_path, data, 2, 2, steps=100_000)
  _wait_until_training(processes, tmp_path)
  processes[1].kill()
  killed_at = time.monotonic()
  processes[0].wait(timeout=120)
  output = processes[0].log_path.read_text()
  assert time.monotonic() - killed_at < 60  # heartbeat timeout 10 s in the worker
  assert processes[0].returncode != 0
  assert "another task died" in output or "stopped sending heartbeats" in output


def test_sigterm_on_one_host_saves_on_every_host_at_the_same_step(data, tmp_path):
  processes = _launch("train", tmp_path, data, 2, 2, steps=100_000)
  _wait_until_training(processes, tmp_path)
  processes[0].send_signal(signal.SIGTERM)  # the notice reaches one host only
  outputs = _finish(processes, timeout=120)
  assert "SIGTERM: saved a checkpoint at step" in outputs[0]
  step = int(outputs[0].split("saved a checkpoint at step ")[1].split()[0])
  data_dir = tmp_path / "run" / "checkpoints" / str(step) / "data"
  assert sorted(p.name for p in data_dir.glob("*.json")) == ["process_0-of-2.json",
                                                              "process_1-of-2.json"]
