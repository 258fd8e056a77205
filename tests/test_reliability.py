"""Preemption, crashes, a busy workdir and bad input, through the real command line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from shufflenet_jax import checkpointing, parallel, predict, train
from shufflenet_jax import workdir as workdir_files
from shufflenet_jax.interop import export
from tests import fake_data, processes

pytestmark = pytest.mark.slow  # subprocesses; minutes in all, and they run in CI

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("reliability")
  fashion = fake_data.write_fashion_mnist(root / "idx", num_train=320, num_test=37)
  return fashion, root / "tfds"


def _command(workdir, data_dirs, *extra, command="train"):
  fashion, tfds_dir = data_dirs
  return [sys.executable, "launch.py", command, "--config=configs/default.py:smoke,scale=0.25",
          f"--config.data_dir={fashion}", f"--config.tfds_data_dir={tfds_dir}",
          "--config.batch_size=16", "--config.eval_batch_size=16", "--config.total_steps=20",
          "--config.eval_every_steps=20", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=4", "--config.num_workers=0",
          f"--config.ema_decay={EMA_DECAY}", f"--workdir={workdir}", *extra]


# Every run keeps an EMA of its weights: the interrupted runs must resume it exactly too.
EMA_DECAY = 0.8


def _run(cmd, timeout=240):
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _start(cmd):
  workdir = next(a.removeprefix("--workdir=") for a in cmd if a.startswith("--workdir="))
  return processes.start(cmd, Path(workdir).parent)


_wait_for_step = processes.wait_for_step


def _params(workdir: Path):
  """(step, every array of the saved state: params, BN statistics, optimizer state, EMA)."""
  step, _, restored = train.restore_train_state(_tiny_config_like_cli(), str(workdir),
                                                parallel.make_mesh())
  assert "ema" in restored
  return step, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(restored))]


def _tiny_config_like_cli():
  from configs import common
  config = common.load_config("configs/default.py:smoke,scale=0.25")
  config.batch_size = 16
  config.ema_decay = EMA_DECAY
  return config


@pytest.fixture(scope="module")
def uninterrupted_run(data_dirs, tmp_path_factory):
  """The run the interrupted ones must reproduce; it also profiles steps 3-4 and decodes with
  num_workers=auto (one grain worker on CPU): both resumable changes, the data order is the same."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = _run(_command(workdir, data_dirs, "--config.profile_steps=3:4",
                         "--config.num_workers=auto"))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
  return _params(uninterrupted_run[0])


def test_every_train_line_says_where_the_time_went_and_profile_steps_write_a_trace(
    uninterrupted_run):
  workdir, result = uninterrupted_run
  lines = [line for line in workdir_files.read_metrics(str(workdir)) if "train/loss" in line]
  assert [line["step"] for line in lines] == list(range(1, 21))
  assert all(0 <= line["data_wait_fraction"] <= 1 for line in lines)
  # Step 1 compiles, so it is not a device time; every later line times one step.
  assert "step_seconds" not in lines[0]
  assert all(0 < line["step_seconds"] < 60 for line in lines[1:])
  traces = list((workdir / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, list((workdir).rglob("*"))
  assert f"Profile of steps 3-4 written to {workdir / 'profile'}" in result.stdout
  assert json.loads((workdir / "config.json").read_text())["num_workers"] == -1  # the word auto


def test_the_ema_is_evaluated_at_every_eval_and_by_eval_predict_and_export(uninterrupted_run,
                                                                           tmp_path):
  workdir, result = uninterrupted_run
  final = [line for line in workdir_files.read_metrics(str(workdir)) if "eval/top1" in line][-1]
  assert final["step"] == 20 and final["eval_ema/num_examples"] == 37
  assert f"(EMA top1 {final['eval_ema/top1']:.4f}" in result.stdout
  evaluated = _run([sys.executable, "launch.py", "eval", f"--workdir={workdir}", "--ema"])
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert (f"step 20 (EMA weights): top-1 {final['eval_ema/top1']:.4f} top-5 "
          f"{final['eval_ema/top5']:.4f} loss {final['eval_ema/loss']:.4f}") in evaluated.stdout

  # predict --ema and export --ema give the EMA model's outputs, not the trained weights'.
  config = workdir_files.load_config(workdir)
  image = tmp_path / "item.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(image)
  x = predict.model_input(config, str(image))[None]
  ema_model, raw_model = (predict.load_model(config, str(workdir), ema)[1] for ema in (True, False))
  want, raw = (np.sort(np.asarray(jax.nn.softmax(m(x))[0]))[::-1][:5] for m in (ema_model,
                                                                             raw_model))
  assert not np.allclose(want, raw, atol=2e-3)  # the EMA lags the weights
  predicted = _run([sys.executable, "launch.py", "predict", f"--workdir={workdir}", "--ema",
                    str(image)])
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  (line,) = [line for line in predicted.stdout.splitlines() if line.startswith(f"{image}: ")]
  got = [float(item.split()[-1]) for item in line.split(": ", 1)[1].split(", ")]
  np.testing.assert_allclose(got, want, atol=6e-4)  # printed with 3 decimals
  artifact = tmp_path / "ema.stablehlo"
  exported = _run([sys.executable, "launch.py", "export", f"--workdir={workdir}", "--ema",
                   f"--output={artifact}"])
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert json.loads(artifact.with_suffix(".json").read_text())["ema_weights"] is True
  images = np.stack([x[0], -x[0]])
  np.testing.assert_allclose(np.asarray(export.load_stablehlo(artifact).call(images)),
                             np.asarray(ema_model(images)), rtol=1e-4, atol=1e-5)


def _assert_same(params_a, params_b):
  (step_a, a), (step_b, b) = params_a, params_b
  assert step_a == step_b == 20
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_sigterm_saves_exits_zero_and_resumes_to_the_same_result(data_dirs, tmp_path,
                                                                 uninterrupted):
  process = _start(_command(tmp_path, data_dirs))
  _wait_for_step(tmp_path, 6, process)
  process.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  process.send_signal(signal.SIGTERM)  # a repeated notice must not kill the save
  process.wait(timeout=120)
  output = process.output()
  assert process.returncode == 0, output[-3000:]
  assert "SIGTERM: saved a checkpoint at step" in output
  saved = int(output.split("saved a checkpoint at step ")[1].split()[0])
  assert checkpointing.Checkpointer(str(tmp_path)).latest_step() == saved < 20
  resumed = _run(_command(tmp_path, data_dirs))
  assert resumed.returncode == 0 and f"Resuming from checkpoint at step {saved}" in resumed.stdout
  _assert_same(uninterrupted, _params(tmp_path))


def test_sigkill_then_restart_resumes_from_the_last_complete_checkpoint(data_dirs, tmp_path,
                                                                        uninterrupted):
  process = _start(_command(tmp_path, data_dirs, "--config.checkpoint_every_steps=1"))
  _wait_for_step(tmp_path, 3 + int(np.random.default_rng().integers(0, 8)), process)
  os.killpg(process.pid, signal.SIGKILL)  # possibly in the middle of an async save
  process.wait(timeout=30)
  resumed = _run(_command(tmp_path, data_dirs))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from checkpoint at step" in resumed.stdout
  _assert_same(uninterrupted, _params(tmp_path))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(data_dirs, tmp_path,
                                                                  uninterrupted_run, uninterrupted):
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted_run[0], workdir)  # a finished run: checkpoints 12, 16, 20
  for path in (workdir / "checkpoints" / "20" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"\0garbage")  # every data and metadata file of the newest checkpoint
  result = _run(_command(workdir, data_dirs))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint 20 is unreadable" in result.stdout
  assert "Resuming from checkpoint at step 16" in result.stdout, result.stdout
  _assert_same(uninterrupted, _params(workdir))  # and it trains steps 17-20 again, exactly


def test_a_second_run_on_a_live_workdir_is_refused(data_dirs, tmp_path):
  process = _start(_command(tmp_path, data_dirs, "--config.total_steps=2000"))
  try:
    _wait_for_step(tmp_path, 2, process)
    before = (tmp_path / "metrics.jsonl").read_text()
    result = _run(_command(tmp_path, data_dirs))
    assert result.returncode == 1
    assert f"is in use by a live run (pid {process.pid})" in result.stderr
    assert result.stderr.count("\n") == 1  # one line
    assert (tmp_path / "metrics.jsonl").read_text().startswith(before)
  finally:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.parametrize("extra,message,code", [
    (["--config.model=shufflenet_v9"], "model='shufflenet_v9' is not one of", 1),
    (["--config.batch_size=12"], "batch_size=12 is not divisible by the 8 devices", 1),
    (["--config.bn_mode=sync"], "bn_mode='sync' is not one of", 1),
    (["--config.data_dir=/nonexistent"], "apt-get install dataset-fashion-mnist", 1),
    (["--config.colour_jitter=0.4"],
     "unknown config key ['colour_jitter']; did you mean ['color_jitter']?", 2),
])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(data_dirs, tmp_path, extra, message,
                                                         code):
  workdir = tmp_path / "run"
  result = _run(_command(workdir, data_dirs, *extra))
  assert result.returncode == code
  assert message in result.stderr
  assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
  assert not workdir.exists()


def test_bad_config_arg_and_eval_without_checkpoint(data_dirs, tmp_path):
  result = _run([sys.executable, "launch.py", "summary",
                 "--config=configs/shufflenet_v1.py:groups=5"])
  assert result.returncode == 2
  assert "groups=5 is not one of (1, 2, 3, 4, 8)" in result.stderr
  result = _run(_command(tmp_path, data_dirs, command="eval"))
  assert result.returncode == 1 and "no checkpoint in" in result.stderr


def test_empty_data_dir_says_how_to_get_the_data(data_dirs, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  result = _run(_command(tmp_path / "run", data_dirs, f"--config.data_dir={empty}"))
  assert result.returncode == 1
  assert "train-images-idx3-ubyte[.gz] not found" in result.stderr
  assert "dataset-fashion-mnist" in result.stderr
