"""Experiment sweeps: expansion, exact command lines, the report, and a resumable --local sweep."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from configs import common
from shufflenet_jax import report, sweeps
from shufflenet_jax import workdir as workdir_files
from shufflenet_jax.models import get_model
from tests import fake_data, processes

ROOT = processes.ROOT
EXPERIMENTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "experiments").glob("*.py"))


def test_the_paper_tables_each_have_an_experiment_file():
  names = {Path(p).stem for p in EXPERIMENTS}
  assert {"table2_groups", "table3_shuffle", "table4_structures", "table5_mobilenet",
          "v2_widths", "ablation_bn_mode", "ablation_recipe"} <= names


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_run_of_every_experiment_builds_its_model(experiment, monkeypatch):
  monkeypatch.chdir(ROOT)
  runs = sweeps.expand(experiment)
  assert runs and len({r.name for r in runs}) == len(runs)
  for run in runs:
    for spec in (run.config, f"{run.config},proxy"):
      config = common.load_config(spec)
      get_model(config.model, abstract=True, num_classes=config.num_classes,
                in_channels=config.in_channels, **config.model_kwargs)
  assert sweeps.expand(experiment) == runs  # deterministic


def test_table_sizes_and_paper_cells(monkeypatch):
  monkeypatch.chdir(ROOT)
  sizes = {"table2_groups": 15, "table3_shuffle": 12, "table4_structures": 13,
           "table5_mobilenet": 9, "v2_widths": 8}
  for name, size in sizes.items():
    runs = sweeps.expand(f"experiments/{name}.py")
    assert len(runs) == size
    assert all(r.paper is not None for r in runs)
  table3 = {r.name: r for r in sweeps.expand("experiments/table3_shuffle.py")}
  assert table3["groups-8_scale-1.0_shuffle-false"].paper == 37.6
  assert table3["groups-8_scale-1.0_shuffle-true"].paper == 32.4


def _launch(*args):
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


def test_dry_run_prints_the_exact_command_of_every_run():
  out = _launch("sweep", "--experiment=experiments/table3_shuffle.py:proxy", "--root=/runs/t3",
                "--dry_run", "--config.num_epochs=1")
  assert out.returncode == 0, out.stderr
  header, *lines = out.stdout.splitlines()
  assert header == f"# run these from {ROOT}: their paths are relative to it"
  assert len(lines) == 12
  assert lines[0] == ("python launch.py train "
                      "--config=experiments/table3_shuffle.py:groups=3,scale=1.0,shuffle=false,proxy"
                      " --workdir=/runs/t3/groups-3_scale-1.0_shuffle-false --config.num_epochs=1")
  assert lines[-1] == ("python launch.py train "
                       "--config=experiments/table3_shuffle.py:groups=8,scale=0.25,shuffle=true,"
                       "proxy --workdir=/runs/t3/groups-8_scale-0.25_shuffle-true "
                       "--config.num_epochs=1")


def test_tpu_lines_start_the_same_command_on_every_worker():
  out = _launch("sweep", "--experiment=experiments/table4_structures.py", "--root=/mnt/b/t4",
                "--tpu=my-v5e", "--zone=us-west4-a")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 13
  assert lines[0] == (
      "gcloud compute tpus tpu-vm ssh my-v5e --zone=us-west4-a --worker=all "
      "--command='cd shufflenet_jax && python launch.py train "
      "--config=experiments/table4_structures.py:model=vgg,mflops=140 "
      "--workdir=/mnt/b/t4/model-vgg_mflops-140'")


@pytest.mark.parametrize("args, message", [
    (["--dry_run", "--config.batch_sise=8"], "did you mean 'batch_size'"),
    (["--dry_run", "--local"], "exactly one of"),
    (["--tpu=x"], "--tpu needs --zone"),
])
def test_sweep_usage_errors_are_one_line(args, message):
  out = _launch("sweep", "--experiment=experiments/table3_shuffle.py", "--root=/tmp/x", *args)
  assert out.returncode != 0
  assert message in out.stderr
  assert "Traceback" not in out.stderr


def test_report_fills_finished_cells_and_marks_the_others(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  experiment = "experiments/table3_shuffle.py:proxy"
  runs = sweeps.expand(experiment)
  finished, unfinished = runs[0], runs[1]
  (tmp_path / finished.name).mkdir()
  workdir_files.write_result(tmp_path / finished.name, 936,
                             {"eval/top1": 0.8766, "eval/top5": 0.99})
  (tmp_path / unfinished.name).mkdir()
  (tmp_path / unfinished.name / "metrics.jsonl").write_text(json.dumps({"step": 50}) + "\n")

  paths = report.write_report(experiment, runs, str(tmp_path))
  text = paths[".md"].read_text()
  assert "CPU proxy on fashion_mnist" in text
  assert "| ShuffleNet 1x (g = 3) | 12.3 / 34.5 | unfinished (step 50) / 32.6 |" in text
  assert text.count("missing / ") == 10
  rows = list(csv.DictReader(paths[".csv"].open()))
  assert len(rows) == 12
  assert rows[0]["status"] == "finished" and float(rows[0]["top1_error"]) == pytest.approx(12.34)
  assert rows[1]["status"] == "unfinished" and rows[1]["top1_error"] == ""
  assert rows[2]["status"] == "missing" and rows[2]["paper_top1_error"] == "37.6"
  assert 130 < float(rows[0]["mflops"]) < 145  # counted at 224, although the run is a proxy
  assert paths[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TINY_EXPERIMENT = '''
from configs.default import get_config  # noqa: F401
TITLE = "two tiny runs"


def sweep(add):
  add(row="a", col="x", family="f", groups=3, smoke=True)
  add(row="b", col="x", family="f", groups=2, smoke=True)
'''


@pytest.mark.slow
def test_local_sweep_skips_finished_runs_and_resumes_an_interrupted_one(tmp_path):
  fashion = fake_data.write_fashion_mnist(tmp_path / "idx", num_train=320, num_test=37)
  experiment = tmp_path / "tiny.py"
  experiment.write_text(TINY_EXPERIMENT)
  root = tmp_path / "runs"
  command = [sys.executable, "launch.py", "sweep", f"--experiment={experiment}",
             f"--root={root}", "--local", f"--config.data_dir={fashion}",
             f"--config.tfds_data_dir={tmp_path / 'tfds'}", "--config.total_steps=16",
             "--config.log_every_steps=1", "--config.checkpoint_every_steps=4"]
  first, second = sweeps.expand(str(experiment))

  process = processes.start(command, tmp_path)
  processes.wait_for_step(root / second.name, 6, process, timeout=300)
  os.killpg(process.pid, signal.SIGTERM)  # a preemption reaches the sweep and its run
  assert process.wait(timeout=120) != 0
  assert f"sweep interrupted during {second.name}" in process.output()
  assert workdir_files.read_result(root / first.name) is not None
  assert workdir_files.read_result(root / second.name) is None

  rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert f"[1/2] {first.name}: finished (step 16" in rerun.stdout
  assert "Resuming from checkpoint at step" in rerun.stdout
  assert "sweep: 2/2 runs finished" in rerun.stdout
  assert workdir_files.read_result(root / second.name)["step"] == 16
