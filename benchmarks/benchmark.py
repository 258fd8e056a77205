"""Speed of our ShuffleNets on this machine, optionally beside PyTorch in the same run.

  python benchmarks/benchmark.py                       # JAX: both conv implementations
  python benchmarks/benchmark.py --torch=/path/to/venv-with-torch/bin/python
  python benchmarks/benchmark.py --quick               # fewer steps (a smoke run)
  python benchmarks/benchmark.py --repeat=3 --torch=...  # medians of 3 interleaved runs

For V1 1x g3, V1 0.5x g3 and V2 1x at 224x224: train step img/s (SGD, batch 32 on CPU), inference
img/s (batch 32), latency (batch 1, median), compile time of the train step, peak host memory
(each measurement in its own process), the cost of the channel shuffle (V1 1x g3 with shuffle
off), V1 1x g3 matmul once more without the project's XLA options (`+xla_defaults`), and the
input pipeline (JPEG decode + random resized crop + flip, img/s on one core).
Writes benchmarks/results.json and benchmarks/results.md; copy the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {  # name -> (get_model name, kwargs)
    "v1_g3_1x": ("shufflenet_v1", dict(groups=3, scale=1.0)),
    "v1_g3_0.5x": ("shufflenet_v1", dict(groups=3, scale=0.5)),
    "v2_1x": ("shufflenet_v2", dict(scale=1.0)),
    "v1_g3_1x_noshuffle": ("shufflenet_v1", dict(groups=3, scale=1.0, shuffle=False)),
}


def build(name: str, impl: str, batch: int, dtype: str = "float32", size: int = 224):
  """One model's jitted train step (SGD) and forward pass on random data, with the project's
  XLA options unless `impl` ends in `+xla_defaults`, computing in `dtype` (float32 params).
  Returns (train_step, forward, state, x, y):
  train_step(*state, x, y) -> (*state, loss); forward(params, batch_stats, x) -> logits."""
  sys.path.insert(0, str(HERE.parent))
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from shufflenet_jax import parallel
  from shufflenet_jax.models import get_model

  model_name, kwargs = MODELS[name]
  conv_impl, _, variant = impl.partition("+")
  options = {} if variant == "xla_defaults" else parallel.compiler_options()
  model = get_model(model_name, conv_impl=conv_impl,
                    dtype=None if dtype == "float32" else jnp.dtype(dtype), **kwargs)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = optax.sgd(0.01, momentum=0.9)

  def train_step(params, stats, opt_state, x, y):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, stats, copy=True)
      logits = m(x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), nnx.state(
          m, nnx.BatchStat)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  def forward(params, stats, x):
    return nnx.merge(graphdef, params, stats)(x, train=False)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, 3)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32))
  return (jax.jit(train_step, donate_argnums=(0, 1, 2), compiler_options=options),
          jax.jit(forward, compiler_options=options), (params, stats, tx.init(params)), x, y)


def measure_jax(name: str, impl: str, batch: int, steps: int, dtype: str = "float32",
                size: int = 224) -> dict:
  """One model, one conv implementation, in this (fresh) process. `impl` may end in
  `+xla_defaults`: then without the project's XLA options (parallel.compiler_options)."""
  import jax

  train_step, infer, (params, stats, opt_state), x, y = build(name, impl, batch, dtype, size)
  start = time.perf_counter()
  step = train_step.lower(params, stats, opt_state, x, y).compile()
  compile_s = time.perf_counter() - start
  params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for _ in range(steps):
    params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
  jax.block_until_ready(loss)
  train_ips = batch * steps / (time.perf_counter() - start)

  jax.block_until_ready(infer(params, stats, x))
  infer_steps = 4 * steps  # an inference step is ~5x shorter than a train step: time as many
  start = time.perf_counter()
  for _ in range(infer_steps):
    out = infer(params, stats, x)
  jax.block_until_ready(out)
  infer_ips = batch * infer_steps / (time.perf_counter() - start)
  one = x[:1]
  jax.block_until_ready(infer(params, stats, one))
  latencies = []
  for _ in range(max(10, steps)):
    start = time.perf_counter()
    jax.block_until_ready(infer(params, stats, one))
    latencies.append(time.perf_counter() - start)
  latencies.sort()
  return {"framework": "jax", "jax": jax.__version__, "model": name, "conv_impl": impl,
          "backend": jax.default_backend(), "dtype": dtype, "batch": batch, "size": size,
          "train_img_per_s": train_ips,
          "infer_img_per_s": infer_ips, "latency_ms": 1000 * latencies[len(latencies) // 2],
          "compile_s": compile_s,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_input_pipeline(seconds: float = 5.0) -> dict:
  """JPEG decode + random resized crop (0.08-1) + flip on ImageNet-sized JPEGs, one core."""
  sys.path.insert(0, str(HERE.parent))
  import numpy as np
  from PIL import Image

  from shufflenet_jax.data import preprocess

  rng = np.random.default_rng(0)
  jpegs = []
  for _ in range(16):  # smooth images compress like photos do (about 100 KB at 500x375)
    base = rng.integers(0, 255, (24, 32, 3), np.uint8)
    img = Image.fromarray(base).resize((500, 375), Image.BICUBIC)
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90)
    jpegs.append(buffer.getvalue())
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    image = preprocess.decode(jpegs[count % len(jpegs)])
    image = preprocess.random_resized_crop(image, rng, 224)
    preprocess.normalize(image, "rgb_normalized", preprocess.IMAGENET_MEAN_RGB,
                         preprocess.IMAGENET_STD_RGB)
    count += 1
  return {"input_img_per_s_per_core": count / (time.perf_counter() - start),
          "jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1024}


def _median(results: list[dict]) -> dict:
  """Per-key median of repeated measurements (the first result's non-numeric fields)."""
  merged = dict(results[0])
  for key, value in merged.items():
    if isinstance(value, float):
      merged[key] = statistics.median(r[key] for r in results)
  merged["runs"] = len(results)
  return merged


def _subprocess_json(cmd: list[str], env=None) -> dict:
  out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
  return json.loads(out.strip().splitlines()[-1])


def _table(rows: list[dict], torch_rows: dict, pipeline: dict) -> str:
  lines = ["| model | framework / conv | train img/s (b32) | infer img/s (b32) | latency b1 (ms) "
           "| compile (s) | peak RSS (MB) | JAX/PyTorch train | JAX/PyTorch infer |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    t = torch_rows.get(r["model"])
    ratio = (f"{r['train_img_per_s'] / t['train_img_per_s']:.2f} | "
             f"{r['infer_img_per_s'] / t['infer_img_per_s']:.2f}") if t else "- | -"
    lines.append(f"| {r['model']} | jax {r['conv_impl']} | {r['train_img_per_s']:.1f} | "
                 f"{r['infer_img_per_s']:.1f} | {r['latency_ms']:.1f} | {r['compile_s']:.1f} | "
                 f"{r['peak_rss_mb']:.0f} | {ratio} |")
  for name, t in torch_rows.items():
    lines.append(f"| {name} | pytorch {t['torch']} channels_last | {t['train_img_per_s']:.1f} | "
                 f"{t['infer_img_per_s']:.1f} | {t['latency_ms']:.1f} | - | "
                 f"{t['peak_rss_mb']:.0f} | | |")
  shuffle = {r["conv_impl"]: r for r in rows if r["model"] == "v1_g3_1x"}
  no_shuffle = {r["conv_impl"]: r for r in rows if r["model"] == "v1_g3_1x_noshuffle"}
  lines.append("")
  for impl in sorted(set(shuffle) & set(no_shuffle)):
    cost = no_shuffle[impl]["train_img_per_s"] / shuffle[impl]["train_img_per_s"] - 1
    lines.append(f"Channel shuffle cost (v1 1x g3, jax {impl}): train step time "
                 f"{100 * cost:+.1f}% with shuffle vs without.")
  if pipeline:
    lines.append(f"Input pipeline: {pipeline['input_img_per_s_per_core']:.0f} img/s per core "
                 f"(JPEG decode of ~{pipeline['jpeg_kb']:.0f} KB 500x375 images + random resized "
                 "crop 224 + flip + normalise).")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--torch", help="python of an environment with torch, for side-by-side")
  parser.add_argument("--impls", default="xla,matmul")
  parser.add_argument("--models", default="v1_g3_1x,v1_g3_0.5x,v2_1x,v1_g3_1x_noshuffle")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeat", type=int, default=1,
                      help="runs per row, interleaved; the table shows each figure's median")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype of the JAX rows (parameters stay float32)")
  parser.add_argument("--size", type=int, default=224, help="input height and width")
  parser.add_argument("--no-variants", action="store_true",
                      help="no extra matmul+xla_defaults row for v1_g3_1x")
  parser.add_argument("--pipeline-seconds", type=float, default=5.0,
                      help="time of the one-core input pipeline figure (0: skip it)")
  parser.add_argument("--quick", action="store_true", help="2 steps, fewer models")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "model:impl" in this process
  parser.add_argument("--out", default=str(HERE / "results"))
  args = parser.parse_args()
  if args.one:
    name, impl = args.one.split(":")
    print(json.dumps(measure_jax(name, impl, args.batch, args.steps, args.dtype, args.size)))
    return
  if args.quick:
    args.steps, args.models = 2, "v1_g3_0.5x"
  rows, torch_rows = [], {}
  for name in args.models.split(","):
    impls = args.impls.split(",")
    if name == "v1_g3_1x" and "matmul" in impls and not args.no_variants:
      # what the project's XLA options buy
      impls.append("matmul+xla_defaults")
    runs = {impl: [] for impl in impls}
    if args.torch:
      runs["torch"] = []
    for repeat in range(args.repeat):  # interleaved, so a noisy spell hits every row alike
      for impl in runs:
        print(f"{name} {impl} (run {repeat + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
        command = ([args.torch, str(HERE / "torch_shufflenet.py"), name, str(args.batch),
                    str(args.steps)] if impl == "torch" else
                   [sys.executable, __file__, f"--one={name}:{impl}", f"--batch={args.batch}",
                    f"--steps={args.steps}", f"--dtype={args.dtype}", f"--size={args.size}"])
        runs[impl].append(_subprocess_json(command))
    for impl, results in runs.items():
      if impl == "torch":
        torch_rows[name] = _median(results)
      else:
        rows.append(_median(results))
  pipeline = measure_input_pipeline(args.pipeline_seconds) if args.pipeline_seconds else {}
  header = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"date {datetime.date.today()}; command: python benchmarks/benchmark.py "
            f"{' '.join(sys.argv[1:])}")
  table = header + "\n\n" + _table(rows, torch_rows, pipeline)
  Path(args.out + ".json").write_text(json.dumps(
      {"rows": rows, "torch": torch_rows, "pipeline": pipeline, "header": header}, indent=2))
  Path(args.out + ".md").write_text(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
