"""Pod readiness without a pod: compile the real train and eval steps for a TPU topology here.

With `libtpu` installed, `jax.experimental.topologies` describes a TPU slice's devices on any
machine, and `jax.jit(...).lower(...).compile()` over a mesh of them runs XLA's TPU compiler. The
compiled program reports per-device memory and XLA's cost analysis (FLOPs, HBM bytes) of one step;
a roofline over the chip's peak compute and HBM bandwidth turns those into a step-time estimate.

The estimate is a lower bound on step time: it assumes the step runs at whichever of peak FLOP/s
or peak HBM bandwidth binds, ignores the gradient all-reduce (a few MB of parameters over ICI) and
the input pipeline. Depthwise convolutions run far below peak FLOP/s, so expect real runs to be
slower; BENCHMARKS.md records measured vs estimated where a device was available.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from shufflenet_jax import complexity, optim, parallel, summary, train
from shufflenet_jax.data import throughput
from shufflenet_jax.models.layers import resolve_compute_dtype, resolve_conv_impl


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_gib: float           # per chip
  peak_tflops: float       # bf16 dense, per chip
  hbm_gbps: float          # GB/s, per chip
  source: str
  host_vcpus_per_chip: float | None = None  # of the TPU VM; None where not checked


# Per-chip figures from Google Cloud's TPU system-architecture pages (checked 2026-11).
CHIPS = {
    "v4": Chip("TPU v4", 32, 275, 1228, "https://cloud.google.com/tpu/docs/v4"),
    # v5e VMs: ct5lp-hightpu-4t 112 vCPUs for 4 chips, -8t 224 for 8 (same page, VM types).
    "v5e": Chip("TPU v5e", 16, 197, 819, "https://cloud.google.com/tpu/docs/v5e", 28),
    "v5p": Chip("TPU v5p", 95, 459, 2765, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32, 918, 1640, "https://cloud.google.com/tpu/docs/v6e"),
}
# Training examples per epoch, to turn num_epochs into steps without reading the data.
TRAIN_EXAMPLES = {"imagenet2012": 1_281_167, "fashion_mnist": 60_000}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass
class Topology:
  name: str
  chip: Chip
  chips: int
  devices: list
  num_slices: int

  @property
  def devices_per_chip(self) -> int:  # v4 without megacore exposes each TensorCore
    return max(1, len(self.devices) // (self.chips * self.num_slices))

  @property
  def hosts(self) -> int:
    return len({d.process_index for d in self.devices})


def _import_libtpu() -> None:
  """libtpu from site-packages (`pip install 'jax[tpu]'`) or from VENV/libtpu (`make setup-dev`
  puts it there, so that CPU runs in that venv never probe for TPUs)."""
  if not glob.glob("/dev/accel*") and not os.path.exists("/dev/vfio"):
    # No TPU attached: compiling opens no chip, so two compiles at once (two terminals, the
    # tests' workers) must not fail on libtpu's one-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    import libtpu  # noqa: F401
    return
  except ImportError:
    pass
  local = Path(sys.prefix) / "libtpu"
  if not (local / "libtpu").is_dir():
    raise ValueError("compiling for a TPU topology needs libtpu (about 600 MB; it runs on a "
                     f"CPU-only machine): `make setup-dev` installs it into {local}, or "
                     "pip install 'jax[tpu]'")
  sys.path.insert(0, str(local))
  import libtpu  # noqa: F401


def topology(name: str, num_slices: int = 1) -> Topology:
  """The devices of TPU slice `name` (e.g. v5e:4x4), compile-only, on this machine."""
  match = _TOPOLOGY.match(name)
  if not match:
    raise ValueError(f"topology={name!r} is not CHIP:AxB[xC] with CHIP one of {sorted(CHIPS)} "
                     "(e.g. v5e:4x4, v4:2x2x2, v5p:2x2x2, v6e:8x8)")
  _import_libtpu()
  from jax.experimental import topologies

  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  description = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
  chips = math.prod(int(d) for d in match.group(2).split("x"))
  return Topology(name, CHIPS[match.group(1)], chips, list(description.devices), num_slices)


def _abstract_batch(batch: int, config, mesh, eval_batch: bool = False) -> dict:
  sharding = parallel.batch_sharding(mesh)
  shape = (batch, config.input_size, config.input_size, config.in_channels)
  out = {"image": jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=sharding),  # as loaders ship
         "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)}
  if eval_batch:
    out["mask"] = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=sharding)
  return out


def _check_divides(batch: int, devices: int, what: str) -> None:
  if batch <= 0 or batch % devices:
    lower, upper = (batch // devices) * devices, (batch // devices + 1) * devices
    raise ValueError(f"{what}={batch} is not divisible by the topology's {devices} devices; "
                     f"use a multiple of {devices} (e.g. {lower or upper} or {upper})")


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
         "generated_code": m.generated_code_size_in_bytes}
  # Donated arguments alias their outputs: count those bytes once.
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                  + out["generated_code"])
  return out


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes": float(cost.get("bytes accessed", 0.0))}


def analysis_cache_dir() -> Path:
  """Where compiled programs' analyses are kept: beside JAX's compilation cache when one is set
  (JAX cannot reload an executable compiled for a topology without its chips, so its own cache
  never hits for these), else ~/.cache/shufflenet_jax."""
  jax_cache = jax.config.jax_compilation_cache_dir
  root = Path(jax_cache) if jax_cache else Path.home() / ".cache" / "shufflenet_jax"
  return root / "tpu_analyses"


def _analysis(lowered, name: str, num_slices: int) -> dict:
  """Memory and cost analysis of `lowered` compiled for topology `name`, and its compile time.
  Kept on disk under the program's text, the topology and the compiler's versions: a plan rerun
  after changing one run compiles only that run (a TPU compile takes seconds to minutes)."""
  import libtpu
  compiler = [jax.__version__, getattr(libtpu, "__version__", "?"), name, str(num_slices),
              os.environ.get("LIBTPU_INIT_ARGS", ""),
              " ".join(sorted(set(os.environ.get("XLA_FLAGS", "").split()))),
              str(jax.config.read("jax_disable_most_optimizations"))]
  key = hashlib.sha256("\n".join([*compiler, lowered.as_text()]).encode()).hexdigest()
  path = analysis_cache_dir() / f"{key}.json"
  try:
    return {**json.loads(path.read_text()), "cached": True}
  except (OSError, ValueError):
    pass  # not compiled before, or an unreadable entry: compile again
  started = time.monotonic()
  compiled = lowered.compile()
  result = {"memory": _memory(compiled), "cost": _cost(compiled),
            "compile_seconds": time.monotonic() - started}
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(result))
    os.replace(partial, path)  # readers never see half an entry
  except OSError:
    pass  # a read-only home: the plan is still right, only not kept
  return {**result, "cached": False}


def for_tpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of the config with its `auto` choices (conv_impl, compute_dtype) resolved for the
  TPU target, not for this CPU."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.conv_impl = resolve_conv_impl(config.conv_impl, backend="tpu")
  config.compute_dtype = resolve_compute_dtype(config.compute_dtype, backend="tpu")
  return config


def compile_check(config: ml_collections.ConfigDict, name: str, num_slices: int = 1,
                  include_eval: bool = True, per_core: float | None = None) -> dict:
  """Compiles the config's train and eval steps for topology `name`; returns the report dict.
  `per_core`: the train transform's img/s per core, when already measured (else timed here)."""
  topo = topology(name, num_slices)
  devices = len(topo.devices)
  _check_divides(config.batch_size, devices, "batch_size")
  _check_divides(config.eval_batch_size, devices, "eval_batch_size")
  config = for_tpu(config)
  mesh = parallel.make_mesh(topo.devices)
  tx, _ = optim.make_optimizer(config, max(1, config.total_steps))
  graphdef, state = train.abstract_train_state(config, mesh, tx)

  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=parallel.replicated(mesh))
  analyses = {"train": _analysis(train.make_train_step(graphdef, config, mesh).lower(
      state, _abstract_batch(config.batch_size, config, mesh), lr), name, num_slices)}
  if include_eval:
    eval_batch = _abstract_batch(config.eval_batch_size, config, mesh, eval_batch=True)
    analyses["eval"] = _analysis(train.make_eval_step(graphdef, config, mesh).lower(
        train.weights(state), eval_batch), name, num_slices)

  macs = complexity.model_macs(summary.abstract_model(config), config.input_size,
                               config.in_channels)
  chip = topo.chip
  per_device_hbm = chip.hbm_gib * 2**30 / topo.devices_per_chip
  per_device_flops = chip.peak_tflops * 1e12 / topo.devices_per_chip
  per_device_bw = chip.hbm_gbps * 1e9 / topo.devices_per_chip
  steps = {}
  for key, analysis in analyses.items():
    batch = config.batch_size if key == "train" else config.eval_batch_size
    memory, cost = analysis["memory"], analysis["cost"]
    compute_s, memory_s = cost["flops"] / per_device_flops, cost["bytes"] / per_device_bw
    step_s = max(compute_s, memory_s)
    steps[key] = {
        "batch": batch, "compile_seconds": analysis["compile_seconds"],
        "analysis_cached": analysis["cached"], "memory": memory,
        "fits": memory["total"] <= per_device_hbm, "flops_per_device": cost["flops"],
        "bytes_per_device": cost["bytes"], "compute_bound_s": compute_s,
        "memory_bound_s": memory_s, "step_s": step_s,
        "bound": "compute" if compute_s >= memory_s else "HBM bandwidth",
        "img_per_s_per_chip": batch / step_s / (devices / topo.devices_per_chip)
        if step_s else float("inf"),
    }
  host = host_demand(config, steps["train"]["img_per_s_per_chip"], topo, per_core)
  return {"config_model": config.model, "model_kwargs": dict(config.model_kwargs),
          "topology": name, "num_slices": num_slices, "chip": dataclasses.asdict(chip),
          "devices": devices, "devices_per_chip": topo.devices_per_chip, "hosts": topo.hosts,
          "per_device_hbm_bytes": per_device_hbm, "macs_per_image": macs,
          "compute_dtype": config.compute_dtype, "conv_impl": config.conv_impl, "host": host,
          "augment": config.augment,
          **steps}


def host_demand(config, img_per_s_per_chip: float, topo: Topology,
                per_core: float | None = None) -> dict:
  """What one host must feed its chips at the estimated step time, in cores of the configured
  train transform timed on this machine (pod hosts' cores differ: this is the order of it)."""
  chips_per_host = topo.chips * topo.num_slices / max(1, topo.hosts)
  img_per_s = img_per_s_per_chip * chips_per_host
  per_core = per_core or throughput.per_core_rate(config)
  cores = img_per_s / per_core
  vcpus = (topo.chip.host_vcpus_per_chip * chips_per_host
           if topo.chip.host_vcpus_per_chip else None)
  return {"chips_per_host": chips_per_host, "img_per_s": img_per_s,
          "per_core_img_per_s": per_core, "cores": cores, "host_vcpus": vcpus,
          "can_feed": None if vcpus is None else cores <= vcpus - 1}


def format_host_demand(host: dict, augment: str) -> str:
  vcpus = (f"; the host has {host['host_vcpus']:.0f} vCPUs" if host["host_vcpus"] else
           "; compare with the host's vCPUs")
  line = (f"host input: {host['img_per_s']:.0f} img/s per host ({host['chips_per_host']:g} "
          f"chips) at the estimated step; the {augment} train transform runs at "
          f"{host['per_core_img_per_s']:.0f} img/s per core on this machine, so about "
          f"{host['cores']:.1f} cores of decoding{vcpus}")
  if host["can_feed"] is False:
    line += (f"\nWARNING: a host cannot feed its chips: it needs ~{host['cores']:.0f} cores of "
             f"decoding and has {host['host_vcpus']:.0f} vCPUs; expect an input-bound run "
             "(metrics.jsonl data_wait_fraction), or pre-resize the data")
  return line


def check_fits(result: dict) -> None:
  """Raises with the numbers when the train or eval step needs more HBM than a device has."""
  for key in ("train", "eval"):
    step = result[key]
    if not step["fits"]:
      raise ValueError(
          f"the {key} step needs {step['memory']['total'] / 2**30:.2f} GiB per device but a "
          f"{result['chip']['name']} device has {result['per_device_hbm_bytes'] / 2**30:.1f} GiB;"
          f" lower the batch ({key} batch {step['batch']}) or use a larger topology")


def _gib(x: float) -> str:
  return f"{x / 2**30:.3f} GiB"


def _compile_time(step: dict) -> str:
  return f"{step['compile_seconds']:.1f} s" + (" (reused)" if step["analysis_cached"] else "")


def format_report(result: dict) -> str:
  chip = result["chip"]
  lines = [
      f"{result['config_model']} {result['model_kwargs']} on {result['topology']}"
      + (f" x {result['num_slices']} slices" if result["num_slices"] > 1 else "")
      + f": {result['devices']} devices ({result['devices_per_chip']} per chip), "
      f"{result['hosts']} host(s); {result['compute_dtype']}, conv_impl={result['conv_impl']}",
      f"chip: {chip['name']}, {chip['hbm_gib']} GiB HBM, {chip['peak_tflops']} bf16 TFLOP/s, "
      f"{chip['hbm_gbps']} GB/s ({chip['source']})",
      f"{'':22}{'train step':>16}{'eval step':>16}",
  ]
  t, e = result["train"], result["eval"]
  rows = [
      ("global batch", str(t["batch"]), str(e["batch"])),
      ("compile time", _compile_time(t), _compile_time(e)),
      ("arguments", _gib(t["memory"]["arguments"]), _gib(e["memory"]["arguments"])),
      ("temporaries", _gib(t["memory"]["temporaries"]), _gib(e["memory"]["temporaries"])),
      ("generated code", _gib(t["memory"]["generated_code"]),
       _gib(e["memory"]["generated_code"])),
      ("total per device", _gib(t["memory"]["total"]), _gib(e["memory"]["total"])),
      ("HBM per device", _gib(result["per_device_hbm_bytes"]),
       _gib(result["per_device_hbm_bytes"])),
      ("GFLOPs per device", f"{t['flops_per_device'] / 1e9:.4g}",
       f"{e['flops_per_device'] / 1e9:.4g}"),
      ("GB HBM traffic/device", f"{t['bytes_per_device'] / 1e9:.4g}",
       f"{e['bytes_per_device'] / 1e9:.4g}"),
      ("est. step time", f"{t['step_s'] * 1e3:.2f} ms", f"{e['step_s'] * 1e3:.2f} ms"),
      ("bound by", t["bound"], e["bound"]),
      ("est. img/s per chip", f"{t['img_per_s_per_chip']:.0f}",
       f"{e['img_per_s_per_chip']:.0f}"),
  ]
  lines += [f"{name:22}{a:>16}{b:>16}" for name, a, b in rows]
  lines.append("Estimates are a roofline lower bound on step time (peak FLOP/s or HBM "
               "bandwidth, whichever binds; no all-reduce, no input pipeline).")
  lines.append(format_host_demand(result["host"], result["augment"]))
  return "\n".join(lines)


def total_steps(config: ml_collections.ConfigDict) -> int:
  """Training steps of a config, without reading its data (known dataset sizes)."""
  if config.total_steps:
    return config.total_steps
  if config.dataset not in TRAIN_EXAMPLES:
    raise ValueError(f"dataset={config.dataset!r} has no known size; set total_steps to plan it")
  return math.ceil(config.num_epochs * (TRAIN_EXAMPLES[config.dataset] // config.batch_size))


def plan(runs, overrides: list[str], name: str, num_slices: int = 1) -> tuple[str, list[dict]]:
  """Markdown table of every sweep run's estimated step time, steps, wall time and chip-hours
  on topology `name` (each run's train step compiled for it); also the rows as dicts."""
  from shufflenet_jax import config_files, sweeps

  rows, cache, rates, topo = [], {}, {}, None
  for index, run in enumerate(runs, 1):
    config = sweeps.apply_overrides(config_files.load_config(run.config), overrides)
    target = for_tpu(config)
    key = (target.model, str(sorted(dict(target.model_kwargs).items())), target.batch_size,
           target.eval_batch_size, target.input_size, target.in_channels, target.num_classes,
           target.compute_dtype, target.bn_mode, target.conv_impl)
    transform = (config.augment, config.input_size, config.in_channels, config.color_jitter)
    if transform not in rates:  # timed once per transform, not once per compile
      rates[transform] = throughput.per_core_rate(config)
    if key not in cache:
      print(f"[{index}/{len(runs)}] compiling {run.name} for {name}", flush=True)
      cache[key] = compile_check(config, name, num_slices, include_eval=False,
                                 per_core=rates[transform])
    result = cache[key]
    topo = topo or topology(name, num_slices)
    host = host_demand(config, result["train"]["img_per_s_per_chip"], topo, rates[transform])
    steps = total_steps(config)
    chips = result["devices"] // result["devices_per_chip"]
    wall_h = result["train"]["step_s"] * steps / 3600
    rows.append({"run": run.name, "batch": config.batch_size, "chips": chips,
                 "step_ms": result["train"]["step_s"] * 1e3, "steps": steps,
                 "wall_hours": wall_h, "chip_hours": wall_h * chips,
                 "img_per_s_per_chip": result["train"]["img_per_s_per_chip"],
                 "memory_gib": result["train"]["memory"]["total"] / 2**30,
                 "fits": result["train"]["fits"], "host_img_per_s": host["img_per_s"],
                 "host_cores": host["cores"], "host_can_feed": host["can_feed"]})
  slices = f" x {num_slices} slices" if num_slices > 1 else ""
  lines = [f"Estimated on {name}{slices} ({CHIPS[name.split(':')[0]].name}; roofline lower bound "
           "on step time: real runs are slower)",
           "",
           "| run | global batch | chips | est. step (ms) | est. img/s/chip | steps | "
           "est. wall (h) | est. chip-hours | memory/device (GiB) | fits | host img/s | "
           "decode cores/host |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['run']} | {r['batch']} | {r['chips']} | {r['step_ms']:.2f} | "
                 f"{r['img_per_s_per_chip']:.0f} | {r['steps']} | {r['wall_hours']:.3g} | "
                 f"{r['chip_hours']:.3g} | {r['memory_gib']:.2f} | "
                 f"{'yes' if r['fits'] else 'NO'} | {r['host_img_per_s']:.0f} | "
                 f"{r['host_cores']:.1f}{' (too many)' if r['host_can_feed'] is False else ''} |")
  total_wall = sum(r["wall_hours"] for r in rows)
  total_chip = sum(r["chip_hours"] for r in rows)
  lines.append(f"| **all {len(rows)} runs, one after another** | | | | | | {total_wall:.3g} | "
               f"{total_chip:.3g} | | | | |")
  lines.append("")
  lines.append("decode cores/host: the host's img/s at the estimated step over the per-core rate "
               "of each run's train transform timed on this machine; (too many): more than the "
               "host's vCPUs")
  return "\n".join(lines), rows
