"""`launch.py export --workdir=W --format=stablehlo|tflite`: a deployable inference program.

stablehlo: `jax.export` serializes the jitted eval-mode forward pass, weights included as
constants, to StableHLO bytes that `jax.export.deserialize` reloads and runs without this
repository's code (or that any StableHLO consumer, e.g. IREE, compiles). The batch dimension is
symbolic, so one artifact serves every batch size.
tflite (phones; TensorFlow is an optional extra: requirements-tflite.txt): BN folded into the
convs, the channel shuffle as a fixed 4-D gather, batch 1, converted through jax2tf and the TFLite
converter, then run in the TFLite interpreter (XNNPACK) against the JAX model before returning.
Input of both: float32 NHWC images preprocessed as in evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FORMATS = ("stablehlo", "tflite")
SUFFIXES = {"stablehlo": ".stablehlo", "tflite": ".tflite"}


def export_stablehlo(model, config, path: Path) -> Path:
  forward = jax.jit(lambda images: model(images, train=False))
  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, config.input_size, config.input_size, config.in_channels),
                              jnp.float32)
  exported = jax.export.export(forward, platforms=("cpu", "cuda", "tpu"))(spec)
  path.write_bytes(exported.serialize())
  return path


def _tensorflow():
  try:
    import tensorflow as tf
    from jax.experimental import jax2tf
  except ImportError:
    raise ValueError("--format=tflite needs TensorFlow, an optional extra kept out of the main "
                     "environment: `make setup-tflite` builds .venv-tflite (then run launch.py "
                     "with .venv-tflite/bin/python), or pip install -r requirements-tflite.txt"
                     ) from None
  return tf, jax2tf


def export_tflite(model, config, path: Path) -> Path:
  """Folds BN into `model` (in place) and writes a batch-1 TFLite flatbuffer."""
  from shufflenet_jax.interop.fold import fold_batch_norm
  from shufflenet_jax.models.layers import shuffle_as_gather
  tf, jax2tf = _tensorflow()
  fold_batch_norm(model)
  shape = (1, config.input_size, config.input_size, config.in_channels)
  with shuffle_as_gather():
    function = tf.function(jax2tf.convert(lambda images: model(images, train=False),
                                          with_gradient=False),
                           input_signature=[tf.TensorSpec(shape, tf.float32)], autograph=False)
    concrete = function.get_concrete_function()
  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], function)
  path.write_bytes(converter.convert())
  return path


def tflite_interpreter(path: str | Path, threads: int | None = None):
  """A TFLite interpreter (LiteRT's if installed, else TensorFlow's) with tensors allocated."""
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    import warnings

    import tensorflow as tf
    warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
    Interpreter = tf.lite.Interpreter
  interpreter = Interpreter(model_path=str(path), num_threads=threads)
  interpreter.allocate_tensors()
  return interpreter


def run_tflite(interpreter, images: np.ndarray) -> np.ndarray:
  outputs = []
  for image in images:  # batch 1
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
    interpreter.invoke()
    outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0])
  return np.stack(outputs)


def load_stablehlo(path: str | Path):
  """The exported program; call `.call(images)` to run it."""
  return jax.export.deserialize(bytearray(Path(path).read_bytes()))


def export(config, workdir: str, fmt: str, output: str | None = None, ema: bool = False) -> Path:
  """The model of `workdir`'s newest checkpoint (its EMA weights with `ema`) as a `fmt` file."""
  from shufflenet_jax.predict import load_model
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r} is not one of {FORMATS}")
  step, model = load_model(config, workdir, ema)
  name = f"model_step{step}{'_ema' if ema else ''}{SUFFIXES[fmt]}"
  path = Path(output) if output else Path(workdir) / "export" / name
  path.parent.mkdir(parents=True, exist_ok=True)
  probe = np.random.default_rng(0).normal(
      size=(2, config.input_size, config.input_size, config.in_channels)).astype(np.float32)
  # before any folding; one compiled program (an eager call compiles layer by layer)
  expected = np.asarray(nnx.jit(lambda m, x: m(x, train=False))(model, probe))
  if fmt == "stablehlo":
    export_stablehlo(model, config, path)
    got = np.asarray(load_stablehlo(path).call(probe))
  else:
    export_tflite(model, config, path)
    interpreter = tflite_interpreter(path)
    got = run_tflite(interpreter, probe)
    ops = sorted({op["op_name"] for op in interpreter._get_ops_details()})
    print(f"TFLite ops: {', '.join(ops)}", flush=True)  # DELEGATE: XNNPACK runs that part
  meta = {"format": fmt, "model": config.model, "model_kwargs": dict(config.model_kwargs),
          "step": step, "ema_weights": ema,
          "input": [None if fmt == "stablehlo" else 1, config.input_size, config.input_size,
                    config.in_channels],
          "input_format": config.input_format, "num_classes": config.num_classes}
  path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
  error = float(np.max(np.abs(expected - got)))
  scale = float(np.max(np.abs(expected)))
  print(f"Exported step {step} to {path} ({path.stat().st_size / 1e6:.1f} MB); reloaded "
        f"and checked: max |difference| {error:.2e} (outputs up to {scale:.2e})", flush=True)
  if not error <= 1e-3 * max(1.0, scale):
    raise ValueError(f"the exported {fmt} model differs from the JAX model by {error:.2e}")
  return path
