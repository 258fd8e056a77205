"""The benchmark scripts' own logic (their figures live in BENCHMARKS.md, never in tests)."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import benchmark  # noqa: E402
import profile_step  # noqa: E402

from tests import processes  # noqa: E402


def test_median_of_repeated_runs_keeps_labels():
  runs = [{"model": "m", "train_img_per_s": v, "infer_img_per_s": 2 * v} for v in (3.0, 1.0, 2.0)]
  merged = benchmark._median(runs)
  assert merged == {"model": "m", "train_img_per_s": 2.0, "infer_img_per_s": 4.0, "runs": 3}


def test_fused_ops_are_read_from_compiled_hlo_and_classified():
  compiled = jax.jit(lambda a, b: jnp.maximum(a @ b, 0).sum(0)).lower(
      jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
  fused = profile_step._fused_ops(compiled.as_text())
  assert fused and all(isinstance(ops, list) for ops in fused.values())
  assert profile_step._kind("fusion.1", ["dot", "add"]) == "matrix multiplies"
  assert profile_step._kind("fusion.2", ["transpose", "copy"]) == "transposes and copies"
  assert profile_step._kind("fusion.3", ["multiply", "reduce"]) == "reductions"
  assert profile_step._kind("fusion.4", ["multiply", "add", "maximum"]) == "elementwise (fused)"


def test_profile_of_a_real_inference_step_accounts_for_its_time():
  result = profile_step.profile("v1_g3_0.5x", "matmul", "infer", batch=2, steps=1)
  assert result["step_ms"] > 0
  assert result["ops_ms"].get("matrix multiplies", 0) > 0
  assert set(result["ops_ms"]) <= set(profile_step.KINDS)


def test_the_accelerator_run_measures_every_part_on_a_cpu_in_quick_mode(tmp_path):
  """benchmarks/accelerator.py is prepared for a GPU machine; here its CPU smoke runs each part
  for real: both conv implementations in bfloat16, the input pipeline with 0 and 1 workers, and
  a launch.py training run on generated JPEGs decoded by a grain worker."""
  result = processes.run([sys.executable, "benchmarks/accelerator.py", "--quick",
                          f"--out={tmp_path}", "--workers=1"], timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads((tmp_path / "accelerator.json").read_text())
  assert all(part["status"] == "ok" for part in report["parts"].values()), report["parts"]
  rows = {(r["model"], r["conv_impl"]): r for r in report["models"]}
  assert set(rows) == {("v2_1x", "xla"), ("v2_1x", "matmul")}
  assert all(r["dtype"] == "bfloat16" and r["train_img_per_s"] > 0 for r in rows.values())
  assert set(report["input"]["per_host"]) == {"0 workers", "1 workers"}
  train = report["train"]
  assert 0 <= train["data_wait_fraction"] <= 1 and train["step_seconds"] > 0
  assert train["lines"] >= 2
  table = (tmp_path / "accelerator.md").read_text()
  assert "| v2_1x bfloat16 | matmul | cpu |" in table and "data_wait_fraction" in table
