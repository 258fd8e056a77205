"""`launch.py export --workdir=W --format=stablehlo`: a serialized inference program.

`jax.export` serializes the jitted eval-mode forward pass, weights included as constants, to
StableHLO bytes that `jax.export.deserialize` reloads and runs without this repository's code (or
that any StableHLO consumer, e.g. IREE, compiles). The batch dimension is symbolic, so one artifact
serves every batch size. Input: float32 NHWC images preprocessed as in evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("stablehlo",)


def export_stablehlo(model, config, path: Path) -> Path:
  forward = jax.jit(lambda images: model(images, train=False))
  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, config.input_size, config.input_size, config.in_channels),
                              jnp.float32)
  exported = jax.export.export(forward, platforms=("cpu", "cuda", "tpu"))(spec)
  path.write_bytes(exported.serialize())
  return path


def load_stablehlo(path: str | Path):
  """The exported program; call `.call(images)` to run it."""
  return jax.export.deserialize(bytearray(Path(path).read_bytes()))


def export(config, workdir: str, fmt: str, output: str | None = None) -> Path:
  from shufflenet_jax.predict import load_model
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r} is not one of {FORMATS}")
  step, model = load_model(config, workdir)
  path = Path(output) if output else Path(workdir) / "export" / f"model_step{step}.stablehlo"
  path.parent.mkdir(parents=True, exist_ok=True)
  export_stablehlo(model, config, path)
  meta = {"model": config.model, "model_kwargs": dict(config.model_kwargs), "step": step,
          "input": [None, config.input_size, config.input_size, config.in_channels],
          "input_format": config.input_format, "num_classes": config.num_classes}
  path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
  # Proof: the reloaded artifact computes what the model computes.
  probe = np.random.default_rng(0).normal(size=(2, *meta["input"][1:])).astype(np.float32)
  expected = np.asarray(model(probe, train=False))
  got = np.asarray(load_stablehlo(path).call(probe))
  error = float(np.max(np.abs(expected - got)))
  print(f"Exported step {step} to {path} ({path.stat().st_size / 1e6:.1f} MB); reloaded "
        f"and checked: max |difference| {error:.2e}", flush=True)
  return path
