"""Complexity counted from the model itself: MACs of conv and FC layers (the papers' "FLOPs").

MACs are read off the traced program (jaxpr), so they follow whatever the model really computes:
every `conv_general_dilated` counts out_elements * kh * kw * in_channels / groups and every
`dot_general` counts out_elements * contracted size. BN, ReLU, pooling, shuffle and additions
count zero, as in the papers. Models are traced with the XLA conv implementation, because the
matmul implementation spells depthwise convs as shifted multiply-adds that this count would miss.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _eqn_macs(eqn) -> int:
  prim = eqn.primitive.name
  if prim == "conv_general_dilated":
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out_feature_dim, in_feature_dim, *spatial_dims)
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    in_per_group = rhs.shape[rhs_spec[1]]
    return math.prod(out.shape) * window * in_per_group
  if prim == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    out = eqn.outvars[0].aval
    return math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
  return 0


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def jaxpr_macs(jaxpr) -> int:
  """Sum of conv + dot MACs in a (closed) jaxpr, recursing into nested calls."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_macs(eqn)
    for sub in _subjaxprs(eqn):
      total += jaxpr_macs(sub)
  return total


def count_params(model: nnx.Module) -> int:
  """Trainable parameters (BN running statistics excluded, as torchvision counts them)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def function_macs(fn, *args) -> int:
  """MACs of fn(*args), traced abstractly (args may be jax.ShapeDtypeStruct)."""
  return jaxpr_macs(jax.make_jaxpr(fn)(*args))


def input_spec(input_size: int, in_channels: int = 3, batch: int = 1) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, input_size, input_size, in_channels), jnp.float32)


def _bind(model: nnx.Module, fn):
  """(traceable fn(state, x), abstract state): works for real and `nnx.eval_shape` models."""
  graphdef, state = nnx.split(model)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  return (lambda state, x: fn(nnx.merge(graphdef, state), x)), abstract


def model_macs(model: nnx.Module, input_size: int = 224, in_channels: int = 3) -> int:
  """MACs of one forward pass of one image, in inference mode."""
  fn, state = _bind(model, lambda m, x: m(x, train=False))
  return function_macs(fn, state, input_spec(input_size, in_channels))


def layer_table(model: nnx.Module, input_size: int = 224, in_channels: int = 3) -> list[dict]:
  """One row per `model.named_layers()` entry: output shape, MACs and parameters of that layer."""
  rows = []
  x = input_spec(input_size, in_channels)
  param_paths = [(path, leaf.size) for path, leaf in
                 jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
  counted = 0
  for index, (name, _) in enumerate(model.named_layers()):
    fn, state = _bind(model, lambda m, x, index=index: m.named_layers()[index][1](x, False))
    macs = function_macs(fn, state, x)
    x = jax.eval_shape(fn, state, x)
    rows.append({"name": name, "output_shape": tuple(x.shape[1:]), "macs": macs,
                 "params": _params_under(param_paths, _layer_attr(name))})
    counted += rows[-1]["params"]
  if counted != count_params(model):
    raise AssertionError(f"per-layer params {counted} != model params {count_params(model)}")
  return rows


def _layer_attr(name: str) -> tuple:
  """Path prefix in the model state for a named layer: `stageN` lives under stages/N-2 and
  `blockN` (MobileNet) under blocks/N-1; any other layer under its own name."""
  if name.startswith("stage"):
    return ("stages", int(name[len("stage"):]) - 2)
  if name.startswith("block"):
    return ("blocks", int(name[len("block"):]) - 1)
  return (name,)


def _params_under(param_paths, prefix: tuple) -> int:
  total = 0
  for path, size in param_paths:
    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    if keys[:len(prefix)] == prefix:
      total += size
  return total
