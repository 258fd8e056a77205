"""A real 2-process cluster on 127.0.0.1 (jax.distributed, gloo collectives), 2 CPU devices each,
started exactly as the README tells cluster users: `launch.py train|eval|sweep --local` with
--coordinator_address, --num_processes and --process_id on every process."""

import shutil
import signal
import socket
import sys
import time

import jax
import numpy as np
import pytest

from shufflenet_jax import parallel, train
from shufflenet_jax import workdir as workdir_files
from tests import fake_data, processes
from tests import float64_truth as f64

pytestmark = pytest.mark.slow  # subprocesses; minutes in all, and they run in CI

ROOT = processes.ROOT
SMOKE = "configs/default.py:smoke,scale=0.25"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost_data")
  return fake_data.write_fashion_mnist(root / "idx"), root / "tfds"


def _config_flags(data, **overrides) -> list[str]:
  idx, tfds_dir = data
  values = dict(data_dir=idx, tfds_data_dir=tfds_dir, batch_size=16, eval_batch_size=16,
                total_steps=6, eval_every_steps=3, checkpoint_every_steps=3, log_every_steps=1)
  values.update(overrides)
  return [f"--config.{k}={v}" for k, v in values.items()]


def _process(args, log_dir, *, port, process_id, num_processes, devices=2, timeout_seconds=60):
  """One process of a job: the job's `launch.py` command line with this process's id."""
  cluster = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
              f"--process_id={process_id}", "--heartbeat_timeout_seconds=10",
              f"--initialization_timeout_seconds={timeout_seconds}"] if num_processes > 1 else [])
  return processes.start([sys.executable, "launch.py", *args, *cluster], log_dir,
                         env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})


def _launch(args, log_dir, num_processes=2, devices=2):
  """Every process of a job: the same command line, each with its own --process_id."""
  port = _free_port()
  return [_process(args, log_dir, port=port, process_id=i, num_processes=num_processes,
                   devices=devices) for i in range(num_processes)]


def _finish(started, timeout=300):
  """Waits for every process; on a failure or timeout, kills all and shows every output."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and any(p.poll() is None for p in started):
    if any(p.poll() not in (None, 0) for p in started):
      break  # one failed: the others may wait for it forever
    time.sleep(0.2)
  for p in started:
    if p.poll() is None:
      p.kill()
    p.wait()
  outputs = [p.output() for p in started]
  report = "\n".join(f"--- process {i} (exit {p.returncode}):\n{out[-3000:]}"
                     for i, (p, out) in enumerate(zip(started, outputs)))
  assert all(p.returncode == 0 for p in started), report
  return outputs


def _trained_state(run):
  step, _, state = train.restore_train_state(workdir_files.load_config(run), str(run),
                                             parallel.make_mesh())
  return step, jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})


def _assert_same_training(run, reference):
  """Same final parameters and BN statistics up to float rounding (the all-reduces sum in
  another order), measured as the tests' scale-aware error (float64_truth.error: relative to
  max(1, max |x|), since a BN bias near 0 has no relative precision), and step by step the
  same losses: the same batches."""
  (step_a, a), (step_b, b) = _trained_state(run), _trained_state(reference)
  assert step_a == step_b
  leaves_a, leaves_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [path for path, _ in leaves_a] == [path for path, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    assert f64.error(x, y) <= 1e-5, (jax.tree_util.keystr(path), f64.error(x, y))
  losses = [[line["train/loss"] for line in workdir_files.read_metrics(str(r))
             if "train/loss" in line] for r in (run, reference)]
  assert len(losses[0]) == len(set(losses[0])) == step_a  # every step its own batch
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_two_launch_processes_are_one_job_stopped_on_one_host_resumed_on_both_and_equal_to_one(
    data, tmp_path):
  """`launch.py train` on 2 processes x 2 devices; a SIGTERM that reaches one host only makes
  both save at the same step; the same command (to 3 more steps) resumes on both, while
  1 process x 4 devices trains the same steps in one go: both end with the same parameters,
  since a global batch (examples and augmentations) does not depend on the process count. The
  lr is constant (no warmup), so the first launch's total_steps does not change it. Then
  `launch.py eval` of the result on both processes."""
  run, reference = tmp_path / "run", tmp_path / "one_process"
  # A small lr: float rounding differences (the all-reduce's summation order) stay rounding-sized
  # over the steps instead of growing (at the smoke config's lr they reach 2e-4 in 6 steps).
  flags = lambda total: _config_flags(data, total_steps=total, lr_schedule="constant",
                                      warmup_steps=0, lr=0.04)
  started = _launch(["train", f"--config={SMOKE}", f"--workdir={run}", *flags(100_000)],
                    tmp_path)
  processes.wait_for_step(run, 3, started[0])
  started[0].send_signal(signal.SIGTERM)  # the notice reaches one host only
  outputs = _finish(started, timeout=120)
  for i, output in enumerate(outputs):
    assert f"process {i} of 2: 2 local device(s), 4 global device(s) (cpu)" in output
  assert "in 2 process(es)" in outputs[0]
  stopped = int(outputs[0].split("SIGTERM: saved a checkpoint at step ")[1].split()[0])
  assert "saved a checkpoint" not in outputs[1]  # process 0 alone reports and writes
  data_files = sorted(p.name for p in (run / "checkpoints" / str(stopped) / "data").glob("*.json"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]  # both hosts saved there

  total = stopped + 3
  train_args = lambda workdir, *extra: ["train", f"--config={SMOKE}", f"--workdir={workdir}",
                                        *flags(total), *extra]
  # The same checkpoint also resumes on one host with a grain worker: another process count
  # and another worker count read the same batches on.
  one_host = tmp_path / "resumed_on_one_host"
  shutil.copytree(run, one_host)
  resumed = _launch(train_args(run), tmp_path)
  one = _launch(train_args(reference), tmp_path, num_processes=1, devices=4)
  moved = _launch(train_args(one_host, "--config.num_workers=1"), tmp_path, num_processes=1,
                  devices=4)
  outputs = _finish(resumed)
  _finish(one)
  assert f"Resuming from checkpoint at step {stopped}" in _finish(moved)[0]
  _assert_same_training(one_host, reference)
  assert f"Resuming from checkpoint at step {stopped}" in outputs[0]
  assert f"Done: step {total}" in outputs[0] and "Done: step" not in outputs[1]
  lines = workdir_files.read_metrics(str(run))
  assert [line["step"] for line in lines if "train/loss" in line] == list(range(1, total + 1))
  evals = [line for line in lines if "eval/top1" in line]
  # one line per step, not one per process: every 3 steps, and at the end
  assert [line["step"] for line in evals] == sorted({*range(3, total + 1, 3), total})
  assert all(line["eval/num_examples"] == 37 for line in evals)  # every example once
  _assert_same_training(run, reference)

  outputs = _finish(_launch(["eval", f"--workdir={run}"], tmp_path))
  assert f"step {total}: top-1 {evals[-1]['eval/top1']:.4f}" in outputs[0]
  assert "on 37 examples" in outputs[0]
  assert "process 1 of 2" in outputs[1] and f"step {total}: top-1" not in outputs[1]


ONE_RUN_SWEEP = '''
from configs.default import get_config  # noqa: F401


def sweep(add):
  add(row="a", col="x", family="f", groups=3, smoke=True)
'''


def test_sweep_local_runs_each_run_as_one_two_process_job(data, tmp_path):
  """(tests/test_experiments.py runs a sweep of several runs; here it is the cluster flags that
  reach each run, so one run suffices.)"""
  experiment = tmp_path / "tiny.py"
  experiment.write_text(ONE_RUN_SWEEP)
  root = tmp_path / "runs"
  outputs = _finish(_launch(["sweep", f"--experiment={experiment}", f"--root={root}", "--local",
                             *_config_flags(data, total_steps=2, eval_every_steps=2)], tmp_path),
                    timeout=400)
  for i, output in enumerate(outputs):
    assert output.count(f"process {i} of 2: 2 local device(s), 4 global device(s)") == 1
    assert "sweep: 1/1 runs finished" in output
  (run,) = root.iterdir()
  assert workdir_files.read_result(run)["step"] == 2
  assert sorted(p.name for p in (run / "checkpoints" / "2" / "data").glob("*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


def test_a_dead_process_takes_the_job_down_quickly_with_a_message(data, tmp_path):
  started = _launch(["train", f"--config={SMOKE}", f"--workdir={tmp_path / 'run'}",
                     *_config_flags(data, total_steps=100_000)], tmp_path)
  processes.wait_for_step(tmp_path / "run", 3, started[0])
  started[1].kill()
  killed_at = time.monotonic()
  started[0].wait(timeout=120)
  output = started[0].output()
  assert time.monotonic() - killed_at < 60  # --heartbeat_timeout_seconds=10
  assert started[0].returncode != 0
  assert "another task died" in output or "stopped sending heartbeats" in output


def _one_error_line(process, timeout: float) -> str:
  process.wait(timeout=timeout)
  output = process.output().strip()
  errors = [line for line in output.splitlines() if line.startswith("error:")]
  assert process.returncode == 1 and len(errors) == 1, output[-3000:]
  assert "Traceback" not in output and "Check failure" not in output, output[-3000:]
  return errors[0]


def test_a_wrong_cluster_ends_in_one_line_on_every_process_within_the_timeout(data, tmp_path):
  args = ["train", f"--config={SMOKE}", f"--workdir={tmp_path / 'run'}", *_config_flags(data)]
  start = time.monotonic()
  out_of_range = _process(args, tmp_path, port=_free_port(), process_id=2, num_processes=2)
  unreachable = _process(args, tmp_path, port=_free_port(), process_id=1, num_processes=2,
                         timeout_seconds=5)  # no process 0 anywhere
  port = _free_port()
  counts = [_process(args, tmp_path, port=port, process_id=i, num_processes=n)
            for i, n in ((0, 2), (1, 3))]
  missing = _process(args, tmp_path, port=_free_port(), process_id=0, num_processes=3,
                     timeout_seconds=5)  # processes 1 and 2 never start
  assert "--process_id=2 is not in [0, 2)" in _one_error_line(out_of_range, 60)
  assert "could not reach the coordinator" in _one_error_line(unreachable, 60)
  for process in counts:
    assert "started with --num_processes=3, process 0 with 2" in _one_error_line(process, 60)
  assert "only 1 of 3 processes joined within 5 s; missing --process_id [1, 2]" in (
      _one_error_line(missing, 60))
  assert time.monotonic() - start < 90
  assert not (tmp_path / "run").exists()  # nothing was written


def test_cluster_flags_go_together(data, tmp_path):
  result = processes.run([sys.executable, "launch.py", "train", f"--config={SMOKE}",
                          f"--workdir={tmp_path / 'run'}", "--num_processes=2"])
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "error: a multi-host job needs --coordinator_address, --num_processes and --process_id "
      "together; missing ['--coordinator_address', '--process_id']"]
