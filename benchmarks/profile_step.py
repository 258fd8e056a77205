"""Where a jitted step's time goes: XLA's own per-op timings (jax.profiler), grouped by kind.

  python benchmarks/profile_step.py                         # V1 1x g3 train step, matmul
  python benchmarks/profile_step.py --model=v2_1x --mode=infer --impl=xla

Runs the same step as benchmark.py (batch 32, 224x224, the project's XLA options) a few times
under the profiler and sums the duration of every XLA op (thunk) per step, grouped into: matrix
multiplies, the stem's 3x3 conv, reductions (BN statistics, weight gradients), transposes and
copies, and fused elementwise work (BN, ReLU, residual adds, depthwise windows, pooling, the
shuffle). The profiler's own overhead makes the step somewhat slower than in benchmark.py.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import MODELS, build  # noqa: E402

KINDS = ("matrix multiplies", "stem 3x3 conv", "reductions", "transposes and copies",
         "elementwise (fused)", "other")


def _kind(name: str, hlo_ops: list[str]) -> str:
  """One op's kind, from its name and the HLO instructions it fuses."""
  ops = set(hlo_ops)
  if "dot" in ops or name.startswith("dot"):
    return "matrix multiplies"
  if "convolution" in ops or name.startswith("convolution"):
    return "stem 3x3 conv"
  if "reduce" in ops or "reduce-window" in name:
    return "reductions"
  if ops and ops <= {"transpose", "copy", "slice", "pad", "concatenate", "bitcast"}:
    return "transposes and copies"
  if ops:
    return "elementwise (fused)"
  return "other"


def _fused_ops(hlo_text: str) -> dict[str, list[str]]:
  """Instruction name -> the HLO ops of the computation it calls (empty if not a fusion)."""
  bodies = {}
  for match in re.finditer(r"^%([\w.\-]+) .*?\n}\n", hlo_text, re.M | re.S):
    bodies[match.group(1)] = re.findall(r"= \S+ ([a-z][\w-]*)\(", match.group(0))
  ops = {}
  for match in re.finditer(r"^\s+(?:ROOT )?%([\w.\-]+) = .*?calls=%([\w.\-]+)", hlo_text, re.M):
    ops[match.group(1)] = [o for o in bodies.get(match.group(2), [])
                           if o not in ("parameter", "constant")]
  return ops


def profile(name: str, impl: str, mode: str, batch: int, steps: int) -> dict:
  train_step, forward, state, x, y = build(name, impl, batch)
  if mode == "train":
    compiled = train_step.lower(*state, x, y).compile()
    advance = lambda state: train_step(*state, x, y)[:3]
  else:
    compiled = forward.lower(*state[:2], x).compile()
    advance = lambda state: (*state[:2], forward(*state[:2], x))
  fused = _fused_ops(compiled.as_text())
  for _ in range(2):
    state = advance(state)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state = advance(state)
  jax.block_until_ready(state)
  step_ms = 1000 * (time.perf_counter() - start) / steps
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
      state = advance(state)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    trace = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(trace))["traceEvents"]
  per_kind = collections.Counter()
  for event in events:
    op = event.get("name", "")
    if event.get("ph") != "X" or op.startswith(("$", "Thunk", "Pjit", "Common")):
      continue
    if op in fused or op.startswith(("dot", "convolution", "copy", "transpose")):
      per_kind[_kind(op, fused.get(op, []))] += event["dur"] / 1000 / steps
  return {"model": name, "impl": impl, "mode": mode, "batch": batch, "step_ms": step_ms,
          "ops_ms": dict(per_kind)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="v1_g3_1x", choices=sorted(MODELS))
  parser.add_argument("--impl", default="matmul")
  parser.add_argument("--mode", default="train", choices=("train", "infer"))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  result = profile(args.model, args.impl, args.mode, args.batch, args.steps)
  total = sum(result["ops_ms"].values())
  print(f"{args.model} {args.mode} step, jax {args.impl}, batch {args.batch}: "
        f"{result['step_ms']:.0f} ms without the profiler; XLA ops {total:.0f} ms per step\n")
  print("| kind of XLA op | ms per step | share |\n| --- | --- | --- |")
  for kind in KINDS:
    if kind in result["ops_ms"]:
      ms = result["ops_ms"][kind]
      print(f"| {kind} | {ms:.0f} | {100 * ms / total:.0f}% |")


if __name__ == "__main__":
  main()
