"""Compiling for a TPU topology on this CPU machine (libtpu, installed by `make test` into
.venv/libtpu so that it never touches training runs), through the real command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import processes

pytestmark = pytest.mark.slow  # XLA:TPU compiles: tens of seconds

LIBTPU = Path(sys.prefix) / "libtpu"
TINY = "--config=configs/default.py:smoke"


def _launch(*args, timeout=600, env=None):
  assert (LIBTPU / "libtpu").is_dir(), (
      f"libtpu is not installed in {LIBTPU}; `make test` installs it (see Makefile)")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}  # finds .venv/libtpu itself
  return subprocess.run([sys.executable, "launch.py", *args], cwd=processes.ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_tiny_config_compiles_for_a_tpu_slice_with_consistent_memory_and_flops(tmp_path):
  kept = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}  # compiles here, for real
  out = _launch("compile", TINY, "--topology=v5e:2x2", "--json", env=kept)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert not result["train"]["analysis_cached"] and not result["eval"]["analysis_cached"]
  # The same command again reuses both analyses (JAX cannot reload TPU executables here).
  again = _launch("compile", TINY, "--topology=v5e:2x2", env=kept)
  assert again.returncode == 0, again.stderr[-3000:]
  times = next(line for line in again.stdout.splitlines() if line.startswith("compile time"))
  assert times.count("(reused)") == 2, times
  assert len(list((tmp_path / "cache" / "tpu_analyses").glob("*.json"))) == 2
  assert result["devices"] == 4 and result["chip"]["name"] == "TPU v5e"
  # compute_dtype=auto (the default) and conv_impl=auto resolve for the target, not this CPU.
  assert result["compute_dtype"] == "bfloat16" and result["conv_impl"] == "xla"
  for step in ("train", "eval"):
    memory = result[step]["memory"]
    assert memory["arguments"] > 0 and memory["temporaries"] > 0 and memory["total"] > 0
    assert result[step]["fits"] and result[step]["step_s"] > 0
  # XLA's FLOPs of a train step vs 6 x counted MACs x batch (forward 2, backward 4 per MAC).
  train = result["train"]
  ratio = train["flops_per_device"] * result["devices"] / (6 * result["macs_per_image"] *
                                                           train["batch"])
  assert 0.5 < ratio < 3, ratio
  eval_ratio = result["eval"]["flops_per_device"] * result["devices"] / (
      2 * result["macs_per_image"] * result["eval"]["batch"])
  assert 0.5 < eval_ratio < 3, eval_ratio
  assert "est. img/s per chip" in out.stdout and "compile time" in out.stdout
  # What a host must feed its chips, in cores of the train transform timed here.
  host = result["host"]
  assert host["img_per_s"] == pytest.approx(train["img_per_s_per_chip"] * host["chips_per_host"])
  assert host["per_core_img_per_s"] > 0
  assert host["cores"] == pytest.approx(host["img_per_s"] / host["per_core_img_per_s"])
  assert host["host_vcpus"] == 28 * host["chips_per_host"]  # v5e VMs: 112 vCPUs per 4 chips
  assert "host input:" in out.stdout and "img/s per core on this machine" in out.stdout


def test_a_batch_the_devices_do_not_divide_is_a_one_line_error():
  out = _launch("compile", TINY, "--config.batch_size=18", "--topology=v5e:2x2")
  assert out.returncode == 1
  assert ("error: batch_size=18 is not divisible by the topology's 4 devices; use a multiple of "
          "4 (e.g. 16 or 20)") in out.stderr
  assert "Traceback" not in out.stderr


def test_an_unknown_topology_names_the_valid_chips():
  out = _launch("compile", TINY, "--topology=v9:2x2")
  assert out.returncode == 1
  assert "is not CHIP:AxB[xC] with CHIP one of ['v4', 'v5e', 'v5p', 'v6e']" in out.stderr


def test_sweep_plan_estimates_every_run(tmp_path):
  experiment = tmp_path / "tiny.py"
  experiment.write_text("from configs.default import get_config  # noqa: F401\n\n\n"
                        "def sweep(add):\n"
                        "  add(row='a', col='x', family='f', smoke=True)\n"
                        "  add(row='b', col='x', family='f', smoke=True, batch_size=64)\n")
  out = _launch("sweep", f"--experiment={experiment}", "--root=/unused", "--plan",
                "--topology=v5e:2x2", "--config.total_steps=1000")
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [line for line in out.stdout.splitlines() if line.startswith("| smoke-true")]
  assert len(lines) == 2
  cells = [c.strip() for c in lines[0].strip("|").split("|")]
  assert cells[1:3] == ["16", "4"] and cells[5] == "1000" and cells[9] == "yes"
  assert float(cells[7]) > 0  # chip-hours
  assert float(cells[10]) > 0 and float(cells[11].split()[0]) > 0  # host img/s, decode cores
  assert "decode cores/host" in out.stdout
  assert "all 2 runs" in out.stdout
  # The same model, batch and shapes compile once (smoke fixes the batch at 16 for both).
  assert out.stdout.count("compiling") == 1, out.stdout


def test_a_compiled_programs_analysis_is_kept_and_reused_only_for_the_same_program(
    tmp_path, monkeypatch):
  """JAX cannot reload an executable compiled for a topology without its chips, so pod_check
  keeps the analysis itself (sweep --plan reruns compile only what changed)."""
  import jax
  import jax.numpy as jnp

  from shufflenet_jax import pod_check
  pod_check._import_libtpu()
  monkeypatch.setattr(pod_check, "analysis_cache_dir", lambda: tmp_path / "kept")
  x = jnp.ones((64, 64))
  square = jax.jit(lambda a: a @ a).lower(x)
  first = pod_check._analysis(square, "v5e:2x2", 1)
  again = pod_check._analysis(square, "v5e:2x2", 1)
  assert not first["cached"] and again["cached"]
  assert again["memory"] == first["memory"] and again["cost"] == first["cost"]
  assert first["cost"]["flops"] == pytest.approx(2 * 64**3, rel=0.01)
  assert not pod_check._analysis(square, "v5e:4x4", 1)["cached"]  # another topology
  cube = jax.jit(lambda a: a @ a @ a).lower(x)
  assert not pod_check._analysis(cube, "v5e:2x2", 1)["cached"]  # another program
  for entry in (tmp_path / "kept").iterdir():
    entry.write_text("{not json")  # a damaged entry is compiled again, not trusted
  assert not pod_check._analysis(square, "v5e:2x2", 1)["cached"]
  assert pod_check._analysis(square, "v5e:2x2", 1)["cached"]
