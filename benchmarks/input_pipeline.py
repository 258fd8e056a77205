"""Host input throughput of the ImageNet train path: per core, and per host with grain workers.

One run times, on the same generated JPEGs (smooth images, which compress like photos):
  - per core, in this process: the previous path (full decode, crop, resize, normalise to float32
    on the host) beside today's (crop box first, JPEG decoded at a reduced DCT scale when the crop
    allows, one resize, uint8 shipped and normalised on the device), for ImageNet's typical
    500x375 and for larger 1000x750 photos;
  - today's path on the same photos stored re-encoded (`--config.stored_shorter_side`, STORED
    settings), with their size;
  - per host: batches/s of the real `pipeline.train_loader` with 0, 1 and 2 grain workers.

  .venv/bin/python benchmarks/input_pipeline.py [--seconds 5] [--out benchmarks/input_results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from shufflenet_jax.data import throughput  # noqa: E402

SIZES = {"500x375": (500, 375), "1000x750": (1000, 750)}
# `--config.stored_shorter_side` / `stored_quality` settings timed on the same images.
STORED = ((160, 90), (256, 90), (320, 95))


def previous_path(data: bytes, rng, size: int):
  from shufflenet_jax.data import preprocess
  image = preprocess.random_resized_crop(preprocess.decode(data), rng, size)
  return preprocess.normalize(image, "rgb_normalized", preprocess.IMAGENET_MEAN_RGB,
                              preprocess.IMAGENET_STD_RGB)


def todays_path(data: bytes, rng, size: int):
  from shufflenet_jax.data import preprocess
  return np.ascontiguousarray(preprocess.decode_random_resized_crop(data, rng, size))


def per_core(path, jpegs: list[bytes], seconds: float, size: int = 224) -> dict:
  rng = np.random.default_rng(0)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    out = path(jpegs[count % len(jpegs)], rng, size)
    count += 1
  return {"img_per_s": count / (time.perf_counter() - start), "bytes_shipped": out.nbytes}


def per_host(jpegs: list[bytes], workers: int, seconds: float, batch: int = 64) -> dict:
  """img/s of pipeline.train_loader (today's path) with `workers` grain processes."""
  from absl import flags

  from configs import common
  from shufflenet_jax.data import pipeline
  if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
    flags.FLAGS.mark_as_parsed()
  config = common.load_config("configs/shufflenet_v1.py")
  config.num_workers = workers
  records = [{"image": jpegs[i % len(jpegs)], "label": i % 1000} for i in range(4096)]
  dataset = pipeline.Dataset(train=records, eval=records, class_names=[], mean=None, std=None)
  iterator = iter(pipeline.train_loader(config, dataset, batch, seed=0))
  next(iterator)  # workers started and warm
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(iterator)
    count += batch
  return {"img_per_s": count / (time.perf_counter() - start)}


def machine() -> str:
  flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
  isa = "AVX-512" if "avx512" in flags else "AVX2+FMA" if "fma" in flags else "?"
  model = next((line.split(":", 1)[1].strip() for line in flags.splitlines()
                if line.startswith("model name")), platform.processor())
  return f"{model}, {os.cpu_count()} cores, {isa}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=5.0)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--out", default=str(HERE / "input_results"))
  args = parser.parse_args()
  results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
             "command": " ".join(["python"] + sys.argv), "per_core": {}, "per_host": {}}
  for name, (w, h) in SIZES.items():
    jpegs = throughput.photo_like_jpegs(w, h, count=16)
    kb = sum(map(len, jpegs)) / len(jpegs) / 1024
    for label, path in (("previous", previous_path), ("today", todays_path)):
      r = per_core(path, jpegs, args.seconds)
      results["per_core"][f"{name} {label}"] = {**r, "jpeg_kb": kb}
      print(f"{name} ({kb:.0f} KB) {label:8s} {r['img_per_s']:7.1f} img/s/core, "
            f"{r['bytes_shipped']} bytes/image shipped", flush=True)
    for side, quality in STORED:  # today's path on the images as `prepare` stores them
      from shufflenet_jax.data import preprocess
      stored = [preprocess.shrink_jpeg(j, side, quality) for j in jpegs]
      r = per_core(todays_path, stored, args.seconds)
      stored_kb = sum(map(len, stored)) / len(stored) / 1024
      results["per_core"][f"{name} stored shorter {side} q{quality}"] = {**r, "jpeg_kb": stored_kb}
      print(f"{name} stored at shorter side {side}, q{quality} ({stored_kb:.0f} KB) today "
            f"{r['img_per_s']:7.1f} img/s/core", flush=True)
  jpegs = throughput.photo_like_jpegs(*SIZES["500x375"], count=16)
  for workers in map(int, args.workers.split(",")):
    r = per_host(jpegs, workers, args.seconds)
    results["per_host"][f"{workers} workers"] = r
    print(f"train_loader, 500x375, {workers} worker(s): {r['img_per_s']:7.1f} img/s", flush=True)
  Path(args.out + ".json").write_text(json.dumps(results, indent=2) + "\n")
  print(f"wrote {args.out}.json")


if __name__ == "__main__":
  main()
