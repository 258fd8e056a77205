"""The benchmark scripts' own logic (their figures live in BENCHMARKS.md, never in tests)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import benchmark  # noqa: E402
import profile_step  # noqa: E402


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
