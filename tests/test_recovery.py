"""Never lose a run: a wrong config, a missing iterator state, bad files, a full or read-only disk,
Ctrl-C and paths, each through the real command line on a finished smoke run."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shufflenet_jax import profiling
from shufflenet_jax import workdir as workdir_files
from tests import fake_data, processes

pytestmark = pytest.mark.slow  # subprocesses; they run in CI

ROOT = processes.ROOT
EXPERIMENT = '''
from configs.shufflenet_v1 import get_config  # noqa: F401


def sweep(add):
  add(row="a", col="x", family="f", groups=3, scale=0.25, shallow=True, proxy=True, smoke=True)
'''
V1 = "configs/shufflenet_v1.py:proxy=true,smoke=true,groups=3,shallow=true"  # half the units
STEPS = ("--config.batch_size=16", "--config.eval_batch_size=16", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=3", "--config.eval_every_steps=6",
         "--config.num_workers=0")


def _launch(*args, cwd=ROOT, env=None, timeout=180):
  return subprocess.run([sys.executable, str(ROOT / "launch.py"), *map(str, args)], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def _one_error_line(result, code=1) -> str:
  output = result.stdout + result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == code and len(errors) == 1, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  return errors[0]


def _snapshot(directory: Path) -> dict:
  """Every file under `directory` with its size and modification time."""
  return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """(data flags, sweep root, experiment file) of a finished 6-step smoke run (checkpoints 3, 6)
  of V1 0.25x, trained by `sweep --local` started from another directory with `--root=~/...`."""
  home = tmp_path_factory.mktemp("home")
  fashion = fake_data.write_fashion_mnist(home / "idx")
  data = (f"--config.data_dir={fashion}", f"--config.tfds_data_dir={home / 'tfds'}")
  experiment = home / "one_run.py"
  experiment.write_text(EXPERIMENT)
  result = _launch("sweep", f"--experiment={experiment}", "--root=~/runs", "--local",
                   "--config.total_steps=6", *STEPS, *data, cwd=home, env={"HOME": str(home)})
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  assert "sweep: 1/1 runs finished" in result.stdout
  assert not (home / "~").exists()  # `~` expanded, not a directory named "~"
  return data, home / "runs", experiment


@pytest.fixture
def run(finished, tmp_path):
  """A copy of the finished run for one test to damage."""
  data, root, experiment = finished
  copy = tmp_path / "runs"
  shutil.copytree(root, copy)
  (workdir,) = copy.iterdir()
  return data, workdir, experiment


def _train(data, workdir, *extra, config=f"{V1},scale=0.25", **kwargs):
  return _launch("train", f"--config={config}", f"--workdir={workdir}",
                 "--config.total_steps=6", *STEPS, *data, *extra, **kwargs)


def test_a_wrong_config_on_read_commands_is_one_line_and_moves_nothing(run, tmp_path):
  data, workdir, _ = run
  before = _snapshot(workdir)
  line = _one_error_line(_launch("eval", f"--config={V1},scale=0.5", f"--workdir={workdir}",
                                 *data))
  assert "checkpoint 6 in" in line and "does not match the config" in line
  assert re.search(r"is float32\[\d+\] in the checkpoint and float32\[\d+\] with this", line)
  image = tmp_path / "photo.png"
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
  line = _one_error_line(_launch("predict", f"--config={V1},scale=0.25,groups=8",
                                 f"--workdir={workdir}", image))
  assert "does not match the config" in line
  assert _snapshot(workdir) == before  # nothing moved, written or created
  result = _launch("eval", f"--workdir={workdir}")  # its own config.json: fine
  assert result.returncode == 0 and "step 6: top-1" in result.stdout, result.stderr[-3000:]
  missing = tmp_path / "never_trained"
  _one_error_line(_launch("eval", f"--config={V1}", f"--workdir={missing}", *data))
  assert not missing.exists()


def test_resume_force_with_another_model_is_refused_before_anything_is_written(run):
  data, workdir, _ = run
  before = _snapshot(workdir)
  line = _one_error_line(_train(data, workdir, "--config.resume=force",
                                config=f"{V1},scale=0.25,groups=8"))
  assert "does not match the config" in line
  after = _snapshot(workdir)
  after.pop(".lock")
  before.pop(".lock")
  assert after == before


def test_a_checkpoint_without_its_iterator_state_is_not_resumed_silently(run, tmp_path):
  data, workdir, _ = run
  reference = workdir_files.read_metrics(workdir)
  exact, anyway = tmp_path / "exact", tmp_path / "anyway"
  shutil.copytree(workdir, exact)
  shutil.copytree(workdir, anyway)
  for copy in (exact, anyway):
    shutil.rmtree(copy / "checkpoints" / "6" / "data")
    (copy / "result.json").unlink()
  result = _train(data, exact)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint 6 has no data-iterator state" in result.stdout
  assert "Resuming from checkpoint at step 3" in result.stdout
  assert list((exact / "unreadable_checkpoints").iterdir())[0].name.startswith("6_")
  # From step 3 with its iterator: the same steps 4-6 as the uninterrupted run.
  untimed = lambda lines: [{k: v for k, v in r.items() if k not in profiling.TIMING_KEYS}
                           for r in lines if "train/loss" in r][-3:]
  assert untimed(workdir_files.read_metrics(exact)) == untimed(reference)
  result = _train(data, anyway, "--config.resume=any_data_order")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming with a fresh data order" in result.stdout
  assert "Resuming from checkpoint at step 6" in result.stdout


def test_bad_files_name_themselves_and_nothing_stops_on_them(run, finished):
  data, workdir, experiment = run
  root = workdir.parent
  (workdir / "result.json").write_text('{"step": 6, "eval/to')
  report = _launch("report", f"--experiment={experiment}", f"--root={root}", *data)
  assert report.returncode == 0, report.stderr[-3000:]
  assert f"{workdir / 'result.json'} is not valid JSON" in report.stdout
  assert "1 unreadable of 1 runs" in report.stdout
  # sweep: the unreadable result.json is rewritten from the finished checkpoint
  sweep = _launch("sweep", f"--experiment={experiment}", f"--root={root}", "--local",
                  "--config.total_steps=6", *STEPS, *data)
  assert sweep.returncode == 0, sweep.stderr[-3000:]
  assert "running it again" in sweep.stdout and "already holds the finished run" in sweep.stdout
  assert workdir_files.read_result(workdir)["step"] == 6

  # A crash mid-write leaves a partial metrics line: readers skip it, a resumed run moves it aside.
  lines = (workdir / "metrics.jsonl").read_text()
  (workdir / "metrics.jsonl").write_text(lines + '{"step": 7, "train/lo')
  assert workdir_files.read_metrics(workdir)[-1]["step"] == 6
  resumed = _train(data, workdir, "--config.total_steps=7")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "ended in a partial line" in resumed.stdout
  original = [r["step"] for r in workdir_files.read_metrics(workdir)][:-2]
  assert original[-1] == 6  # every earlier line intact, then step 7's train and eval lines
  assert [r["step"] for r in workdir_files.read_metrics(workdir)][-2:] == [7, 7]
  assert list(workdir.glob("metrics.jsonl.partial.*"))[0].read_text() == '{"step": 7, "train/lo'

  (workdir / "metrics.jsonl").write_text(lines.replace("\n", "\nnot json\n", 1))
  (workdir / "result.json").unlink()  # an unfinished run: report reads its metrics
  report = _launch("report", f"--experiment={experiment}", f"--root={root}", *data)
  assert report.returncode == 0, report.stderr[-3000:]
  assert f"{workdir / 'metrics.jsonl'} line 2 is not valid JSON" in report.stdout
  assert "1 unreadable of 1 runs" in report.stdout
  (workdir / "config.json").write_text('{"model": "shufflenet_v1", "sca')
  for command in (["eval", f"--workdir={workdir}"],
                  ["predict", f"--workdir={workdir}", str(experiment)]):
    line = _one_error_line(_launch(*command))
    assert f"{workdir / 'config.json'} is not valid JSON" in line
  line = _one_error_line(_train(data, workdir, "--config.total_steps=8"))
  assert f"{workdir / 'config.json'} is not valid JSON" in line


def _mount_tmpfs(directory: Path, size: str) -> bool:
  directory.mkdir()
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                        capture_output=True).returncode == 0


def test_a_full_disk_ends_in_one_line_and_the_run_resumes_after_freeing_space(finished, tmp_path):
  data, root, _ = finished
  disk = tmp_path / "disk"
  # As root (CI): a real file system that is full after 2 checkpoints: 3x one checkpoint of
  # this model (the run's other files and a checkpoint being written need the rest).
  checkpoint = next(root.glob("*/checkpoints/6"))
  size = 3 * sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) // 1024
  if _mount_tmpfs(disk, f"{size}k"):
    try:
      workdir = disk / "run"
      result = _train(data, workdir, "--config.total_steps=30")
      line = _one_error_line(result)
      assert "no space left on the device (ENOSPC) writing " + str(workdir) in line, line
      kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
      assert kept and f"kept: checkpoints {kept} in {workdir / 'checkpoints'}" in line, line
      assert "free some space and rerun the same command" in line
      assert len((result.stdout + result.stderr).splitlines()) < 40  # no Orbax thread logs
      subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)  # space freed
      resumed = _train(data, workdir, "--config.total_steps=30")
      assert resumed.returncode == 0, resumed.stderr[-3000:]
      assert f"Resuming from checkpoint at step {kept[-1]}" in resumed.stdout
      assert "Done: step 30" in resumed.stdout
    finally:
      subprocess.run(["umount", "-l", str(disk)])
  else:  # an ordinary user: every write of metrics.jsonl fails with ENOSPC
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").symlink_to("/dev/full")
    line = _one_error_line(_train(data, workdir))
    assert "no space left on the device (ENOSPC)" in line


def test_a_storage_error_without_a_file_name_is_named_from_the_write_that_failed(tmp_path):
  # Orbax writes its metadata with Path.write_text: the OSError of f.write names no file (seen
  # under load in CI: "no space left on the device (ENOSPC); kept: ..." with no path).
  target = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp" / "_sharding"

  def write_text(self, data):
    raise OSError(28, "No space left on device")

  try:
    write_text(target, "{}")
  except OSError as e:
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = e
    found = workdir_files.storage_error(wrapped)
  assert (found.errno, found.filename) == (28, str(target))


LATE_TENSORSTORE_CALLBACK = """
import asyncio, sys, time
import numpy as np
import tensorstore as ts
from shufflenet_jax import cli

cli._quiet_background_errors()
store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": sys.argv[1]}},
                create=True, dtype=ts.float32, shape=[2000, 2000]).result()
loop = asyncio.new_event_loop()


async def start_write():
  task = asyncio.ensure_future(store.write(np.ones((2000, 2000), np.float32)))
  await asyncio.sleep(0)
  return task


loop.run_until_complete(start_write())
loop.close()  # what Orbax does after a failed save, while its other writes are in flight
time.sleep(2)


class Other:
  def __del__(self):
    raise ValueError("other")


Other()
"""


def test_late_write_callbacks_after_a_failed_save_print_nothing_but_other_errors_still_show(
    tmp_path):
  # Under load a full disk printed dozens of "Event loop is closed" tracebacks from TensorStore's
  # completion callbacks around the one error line (CI, 2026-12-02).
  result = subprocess.run([sys.executable, "-c", LATE_TENSORSTORE_CALLBACK, str(tmp_path / "a")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Event loop is closed" not in result.stderr, result.stderr[-3000:]
  assert "ValueError: other" in result.stderr  # anything else still reaches the console


def test_a_read_only_workdir_ends_in_one_line_and_read_commands_still_work(run, tmp_path):
  data, workdir, experiment = run
  disk = tmp_path / "ro"
  mounted = _mount_tmpfs(disk, "20m")
  try:
    target = (disk if mounted else tmp_path / "plain") / "run"
    shutil.copytree(workdir, target)
    (target / "result.json").unlink()
    if mounted:  # as root: a read-only file system
      subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
      expected = "read-only file system (EROFS)"
    else:  # an ordinary user: no write permission
      for path in [target.parent, target, *target.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
      expected = "permission denied (EACCES)"
    line = _one_error_line(_train(data, target, "--config.total_steps=9"))
    assert expected in line and "use a writable --workdir" in line, line
    line = _one_error_line(_launch("export", f"--workdir={target}"))  # into W/export
    assert expected in line and str(target / "export") in line, line
    line = _one_error_line(_launch("report", f"--experiment={experiment}",  # into ROOT/report.*
                                   f"--root={target.parent}"))
    assert expected in line and str(target.parent / "report") in line, line
    result = _launch("eval", f"--workdir={target}")
    assert result.returncode == 0 and "step 6: top-1" in result.stdout, result.stderr[-3000:]
  finally:
    if mounted:
      subprocess.run(["umount", "-l", str(disk)])


def test_ctrl_c_saves_like_sigterm_and_a_second_one_exits_at_once(finished, tmp_path):
  data, _, _ = finished
  workdir = tmp_path / "run"
  command = [sys.executable, "launch.py", "train", f"--config={V1},scale=0.25",
             f"--workdir={workdir}",
             "--config.total_steps=2000", *STEPS, *data]
  process = processes.start(command, tmp_path)
  processes.wait_for_step(workdir, 2, process)
  process.send_signal(signal.SIGINT)
  assert process.wait(timeout=120) == 0, process.output()[-3000:]
  output = process.output()
  assert "SIGINT: saved a checkpoint at step" in output
  assert "Traceback" not in output and "KeyboardInterrupt" not in output
  saved = int(output.split("saved a checkpoint at step ")[1].split()[0])

  process = processes.start(command, tmp_path)
  processes.wait_for_step(workdir, saved + 2, process)
  process.send_signal(signal.SIGINT)
  deadline = time.monotonic() + 30
  while "Interrupt: saving a checkpoint" not in process.output() and time.monotonic() < deadline:
    time.sleep(0.01)  # two signals before the handler runs would count as one
  process.send_signal(signal.SIGINT)  # while it saves
  assert process.wait(timeout=30) == 130
  assert "Second interrupt: exiting now" in process.output()
  result = _launch("eval", f"--workdir={workdir}")  # what was saved is intact
  assert result.returncode == 0 and "top-1" in result.stdout, result.stderr[-3000:]


def test_config_file_mistakes_are_one_line(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  cases = {("configs/default.py", tmp_path): "does not exist (relative to the current directory",
           (str(tmp_path / "missing.py"), ROOT): "does not exist",
           (str(broken), ROOT): "line 1: invalid syntax"}
  for (config, cwd), message in cases.items():
    line = _one_error_line(_launch("summary", f"--config={config}", cwd=cwd), code=2)
    assert message in line, line


STUCK_THREAD = '''
import sys, threading
from shufflenet_jax import cli, train

def fail(config, workdir):  # as a failed async save leaves Orbax's signalling thread waiting
  threading.Thread(target=threading.Event().wait, name="waits-forever").start()
  raise {error}

train.train_and_evaluate = fail
sys.argv = ["launch.py", "train", "--config=configs/shufflenet_v1.py:smoke=true",
            "--workdir={workdir}"]
cli.run()
'''


@pytest.mark.parametrize("error, expected", [
    ("ValueError('bad value')", "error: bad value"),
    ("RuntimeError('unexpected')", "RuntimeError: unexpected"),
])
def test_an_error_exits_even_when_a_background_thread_would_never_end(error, expected, tmp_path):
  script = STUCK_THREAD.format(error=error, workdir=tmp_path / "run")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 1, result.stderr[-3000:]
  assert expected in result.stderr, result.stderr[-3000:]
  assert ("Traceback" in result.stderr) == error.startswith("RuntimeError"), result.stderr[-3000:]
