"""The accelerator run (#16), prepared for a GPU (or TPU) machine: one command, under 8 minutes.

  python benchmarks/accelerator.py --out=DIR          # on the accelerator machine
  python benchmarks/accelerator.py --quick --out=DIR  # a CPU smoke of every part (the test)

Measures, each part in its own process so that one failure does not lose the others:
  1. train img/s of V1 1x g3 and V2 1x at batch 256, bfloat16 compute, both conv implementations
     (benchmarks/benchmark.py, which also gives inference img/s, latency and compile time);
  2. the ImageNet input pipeline's img/s with 0 workers and with every host core
     (benchmarks/input_pipeline.py);
  3. `data_wait_fraction` and `step_seconds` of a short real `launch.py train` on generated JPEGs
     (dataset=image_folder, ImageNet augmentation at 224, all host cores decoding).
Writes DIR/accelerator.json and DIR/accelerator.md (machine, date, command) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import input_pipeline  # noqa: E402  (benchmarks/: the CPU and ISA line)

FULL = dict(models="v1_g3_1x,v2_1x", batch=256, steps=20, seconds=10.0, train_steps=60,
            images_per_class=160, size=224)
# The CPU smoke: every part and both conv implementations, one model, tiny sizes.
QUICK = dict(models="v2_1x", batch=8, steps=1, seconds=0.5, train_steps=4, images_per_class=8,
             size=32)


def _run(name: str, command: list[str], log_dir: Path, timeout: float) -> dict:
  """One part in its own process: its exit status, time and the tail of its output."""
  start = time.monotonic()
  log = log_dir / f"{name}.log"
  try:
    with open(log, "w") as out:
      code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            timeout=timeout).returncode
  except subprocess.TimeoutExpired:
    code = "timeout"
  seconds = time.monotonic() - start
  status = "ok" if code == 0 else f"failed ({code})"
  print(f"{name}: {status} in {seconds:.0f} s (log: {log})", flush=True)
  return {"status": status, "seconds": round(seconds, 1),
          "tail": "" if code == 0 else log.read_text()[-2000:]}


def write_image_folder(root: Path, classes: int, per_class: int, size: int) -> None:
  """root/train/<class>/*.jpg and root/val/<class>/*.jpg of photo-like JPEGs (500x375 when the
  run trains at 224, as ImageNet's typical image; smaller for the quick smoke)."""
  from shufflenet_jax.data import throughput
  width, height = (500, 375) if size >= 224 else (4 * size, 3 * size)
  jpegs = throughput.photo_like_jpegs(width, height, count=16)
  for split, count in (("train", per_class), ("val", max(2, per_class // 8))):
    for c in range(classes):
      folder = root / split / f"class_{c}"
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(count):
        (folder / f"{i}.jpg").write_bytes(jpegs[(c * count + i) % len(jpegs)])


def training_run_summary(workdir: Path) -> dict:
  """Mean data_wait_fraction and step_seconds over the run's train lines after the first
  (which includes compiling), and the last line's img/s."""
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [line for line in lines if "data_wait_fraction" in line]
  steady = train[1:] or train
  mean = lambda key: sum(line[key] for line in steady if key in line) / max(
      1, sum(key in line for line in steady))
  return {"data_wait_fraction": mean("data_wait_fraction"), "step_seconds": mean("step_seconds"),
          "img_per_sec": steady[-1].get("img_per_sec"), "lines": len(train)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=str(HERE / "accelerator_results"))
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke of each part")
  parser.add_argument("--workers", type=int, default=os.cpu_count(),
                      help="grain workers for parts 2 and 3 (default: every core)")
  args = parser.parse_args()
  sizes = QUICK if args.quick else FULL
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  python = sys.executable
  parts, limit = {}, 60 if args.quick else 240

  parts["models"] = _run("models", [
      python, str(HERE / "benchmark.py"), f"--models={sizes['models']}", "--impls=xla,matmul",
      f"--batch={sizes['batch']}", f"--steps={sizes['steps']}", "--dtype=bfloat16",
      f"--size={sizes['size']}", "--no-variants", "--pipeline-seconds=0",
      f"--out={out / 'models'}"], out, timeout=limit)

  parts["input"] = _run("input", [
      python, str(HERE / "input_pipeline.py"), f"--seconds={sizes['seconds']}",
      f"--workers=0,{args.workers}", f"--out={out / 'input'}"], out, timeout=limit)

  data, workdir = out / "jpegs", out / "train_run"
  if not data.exists():
    write_image_folder(data, classes=4, per_class=sizes["images_per_class"], size=sizes["size"])
  batch = 16 if args.quick else 256
  parts["train"] = _run("train", [
      python, str(ROOT / "launch.py"), "train",
      "--config=configs/shufflenet_v1.py:groups=3" + (",smoke=true" if args.quick else ""),
      "--config.dataset=image_folder", f"--config.data_dir={data}", "--config.num_classes=4",
      f"--config.tfds_data_dir={out / 'tfds'}", f"--config.input_size={sizes['size']}",
      f"--config.batch_size={batch}", f"--config.eval_batch_size={batch}",
      f"--config.total_steps={sizes['train_steps']}", f"--config.num_workers={args.workers}",
      f"--config.log_every_steps={max(1, sizes['train_steps'] // 6)}",
      f"--config.eval_every_steps={sizes['train_steps']}",
      f"--config.checkpoint_every_steps={sizes['train_steps']}",
      "--config.compute_dtype=auto", "--config.resume=never", f"--workdir={workdir}"],
      out, timeout=limit)

  results = {"machine": input_pipeline.machine(),
             "date": str(datetime.date.today()), "command": " ".join(["python", *sys.argv]),
             "quick": args.quick, "parts": parts}
  if parts["models"]["status"] == "ok":
    results["models"] = json.loads((out / "models.json").read_text())["rows"]
  if parts["input"]["status"] == "ok":
    results["input"] = json.loads((out / "input.json").read_text())
  if parts["train"]["status"] == "ok":
    results["train"] = training_run_summary(workdir)
  (out / "accelerator.json").write_text(json.dumps(results, indent=2) + "\n")
  table = markdown(results)
  (out / "accelerator.md").write_text(table + "\n")
  print(table)
  if any(part["status"] != "ok" for part in parts.values()):
    sys.exit(1)


def markdown(results: dict) -> str:
  lines = [f"Machine: {results['machine']}; date {results['date']}; command: "
           f"{results['command']}", "",
           "| model | conv | backend | train img/s | infer img/s | compile (s) |",
           "| --- | --- | --- | --- | --- | --- |"]
  for r in results.get("models", []):
    lines.append(f"| {r['model']} {r['dtype']} | {r['conv_impl']} | {r['backend']} | "
                 f"{r['train_img_per_s']:.0f} | {r['infer_img_per_s']:.0f} | "
                 f"{r['compile_s']:.1f} |")
  for name, r in results.get("input", {}).get("per_host", {}).items():
    lines.append(f"\nInput pipeline (train_loader, 500x375 JPEGs), {name}: "
                 f"{r['img_per_s']:.0f} img/s")
  if "train" in results:
    t = results["train"]
    lines.append(f"\nShort train run on generated JPEGs: data_wait_fraction "
                 f"{t['data_wait_fraction']:.2f}, step_seconds {t['step_seconds']:.4f}, "
                 f"img/s {t['img_per_sec']:.0f}")
  for name, part in results["parts"].items():
    if part["status"] != "ok":
      lines.append(f"\n{name}: {part['status']}\n```\n{part['tail']}\n```")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
