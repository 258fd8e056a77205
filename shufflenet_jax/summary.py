"""A Table-1-style description of a model built from a config: per-layer size, channels, cost."""

from __future__ import annotations

import ml_collections
from flax import nnx

from shufflenet_jax import complexity
from shufflenet_jax.models import get_model


def abstract_model(config: ml_collections.ConfigDict, conv_impl: str = "xla") -> nnx.Module:
  """The config's model with shapes only (no memory, no RNG work): enough to count and trace."""
  return get_model(config.model, abstract=True, num_classes=config.num_classes,
                   in_channels=config.in_channels, conv_impl=conv_impl, **config.model_kwargs)


def summarize(config: ml_collections.ConfigDict) -> dict:
  """Per-layer rows plus totals (MACs = the papers' FLOPs, params) at the config's input size."""
  model = abstract_model(config)
  rows = complexity.layer_table(model, config.input_size, config.in_channels)
  repeats = dict(zip(("stage2", "stage3", "stage4"), model.repeats))
  for row in rows:
    row["repeats"] = repeats.get(row["name"], 1)
  return {"model": config.model, "model_kwargs": dict(config.model_kwargs), "rows": rows,
          "macs": sum(r["macs"] for r in rows), "params": complexity.count_params(model),
          "input_size": config.input_size}


def format_table(summary: dict) -> str:
  s = summary["input_size"]
  kwargs = ", ".join(f"{k}={v}" for k, v in summary["model_kwargs"].items())
  lines = [f"{summary['model']}({kwargs}) at {s}x{s}",
           f"{'layer':<12} {'output size':>11} {'channels':>8} {'repeat':>6} "
           f"{'MFLOPs':>9} {'params':>10}"]
  for r in summary["rows"]:
    shape = r["output_shape"]
    size = f"{shape[0]}x{shape[1]}" if len(shape) == 3 else "1x1"
    lines.append(f"{r['name']:<12} {size:>11} {shape[-1]:>8} {r['repeats']:>6} "
                 f"{r['macs'] / 1e6:>9.2f} {r['params']:>10,}")
  lines.append(f"{'total':<12} {'':>11} {'':>8} {'':>6} {summary['macs'] / 1e6:>9.2f} "
               f"{summary['params']:>10,}")
  lines.append("MFLOPs = million multiply-adds of conv and FC layers, as the papers count them.")
  return "\n".join(lines)
