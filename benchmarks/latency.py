"""Batch-1, one-thread inference latency at 224x224, like the ShuffleNet paper's Table 8.

  python benchmarks/latency.py [--tflite_python=.venv-tflite/bin/python] [--runs=50]

Every (model, engine) pair runs in its own process pinned to one CPU core with single-threaded
XLA / TFLite, weights as constants and BN folded into the convs (the deployed form):
  jax-matmul, jax-xla   our model jitted with conv_impl=matmul / xla
  tflite                `launch.py export --format=tflite`'s conversion, TFLite interpreter with
                        XNNPACK, num_threads=1 (needs TensorFlow: make setup-tflite)
Writes benchmarks/latency_results.{md,json}; BENCHMARKS.md keeps the latest table beside the
paper's Snapdragon 820 figures (different hardware: compare ratios between models, not ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (model, kwargs, the paper's Table 8 latency in ms on a Snapdragon 820, or None)
MODELS = {
    "ShuffleNet v1 0.5x (g=3)": ("shufflenet_v1", dict(groups=3, scale=0.5), 15.2),
    "ShuffleNet v1 1x (g=3)": ("shufflenet_v1", dict(groups=3, scale=1.0), 37.8),
    "ShuffleNet v1 2x (g=3)": ("shufflenet_v1", dict(groups=3, scale=2.0), 108.8),
    "ShuffleNet v2 1x": ("shufflenet_v2", dict(scale=1.0), None),
    "MobileNet v1 1.0": ("mobilenet_v1", dict(width=1.0), 110.0),
}
ENGINES = ("jax-matmul", "jax-xla", "tflite")


def _single_thread() -> None:
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                             "false intra_op_parallelism_threads=1").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _median_ms(fn, runs: int) -> float:
  for _ in range(5):
    fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def measure(name: str, engine: str, runs: int) -> dict:
  """One (model, engine) latency, in this process (which the caller started pinned)."""
  _single_thread()
  sys.path.insert(0, str(ROOT))
  import jax
  import ml_collections
  import numpy as np

  from shufflenet_jax.interop import export, fold
  from shufflenet_jax.models import get_model

  model_name, kwargs, _ = MODELS[name]
  impl = "xla" if engine == "jax-xla" else "matmul"
  model = get_model(model_name, conv_impl=impl, **kwargs)
  image = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
  if engine == "tflite":
    config = ml_collections.ConfigDict({"input_size": 224, "in_channels": 3})
    with tempfile.TemporaryDirectory() as tmp:
      path = export.export_tflite(model, config, Path(tmp) / "model.tflite")
      interpreter = export.tflite_interpreter(path, threads=1)
      input_index = interpreter.get_input_details()[0]["index"]
      interpreter.set_tensor(input_index, image)
      ms = _median_ms(interpreter.invoke, runs)
  else:
    fold.fold_batch_norm(model)
    forward = jax.jit(lambda x: model(x, train=False))  # weights are constants of the program
    start = time.perf_counter()
    forward(image).block_until_ready()
    compile_s = time.perf_counter() - start
    ms = _median_ms(lambda: forward(image).block_until_ready(), runs)
    return {"model": name, "engine": engine, "ms": ms, "compile_s": compile_s}
  return {"model": name, "engine": engine, "ms": ms}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tflite_python", help="Python with TensorFlow (e.g. .venv-tflite/bin/"
                      "python) for the tflite rows; without it they are left out")
  parser.add_argument("--runs", type=int, default=50)
  parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # worker: "model|engine"
  args = parser.parse_args()
  if args.one:
    name, engine = args.one.split("|")
    print(json.dumps(measure(name, engine, args.runs)))
    return

  rows = []
  names = [n for n in args.models.split(",") if n]
  for name in names:
    for engine in ENGINES:
      python = args.tflite_python if engine == "tflite" else sys.executable
      if python is None:
        continue
      out = subprocess.run([python, __file__, f"--one={name}|{engine}", f"--runs={args.runs}"],
                           capture_output=True, text=True, cwd=ROOT)
      if out.returncode:
        raise SystemExit(f"{name} / {engine} failed:\n{out.stderr[-3000:]}")
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(f"{name:28} {engine:11} {rows[-1]['ms']:8.1f} ms", flush=True)

  engines = [e for e in ENGINES if any(r["engine"] == e for r in rows)]
  lines = ["| model | " + " | ".join(f"{e} (ms)" for e in engines)
           + " | paper, Snapdragon 820 (ms) |",
           "|---|" + "---|" * (len(engines) + 1)]
  for name in names:
    cells = [next((f"{r['ms']:.1f}" for r in rows if r["model"] == name and r["engine"] == e),
                  "-") for e in engines]
    paper = MODELS[name][2]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {paper if paper else '-'} |")
  import jax
  header = (f"Batch 1, 224x224, one thread (pinned to one core), median of {args.runs} runs; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax "
            f"{jax.__version__}; {time.strftime('%Y-%m-%d')}; command: python "
            f"benchmarks/latency.py" + (f" --tflite_python={args.tflite_python}"
                                        if args.tflite_python else ""))
  table = header + "\n\n" + "\n".join(lines) + "\n"
  (ROOT / "benchmarks/latency_results.md").write_text(table)
  (ROOT / "benchmarks/latency_results.json").write_text(json.dumps(rows, indent=2) + "\n")
  print(table)


if __name__ == "__main__":
  main()
