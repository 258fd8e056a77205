"""Copying a PyTorch state_dict into our modules: every key used once, every shape checked.

Kernels go from PyTorch's (out, in/groups, kh, kw) to our (kh, kw, in/groups, out); a Linear's
(out, in) weight is transposed; BN's weight/bias/running_mean/running_var become
scale/bias/mean/var.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from shufflenet_jax.models.layers import ConvBN


class WeightSource:
  """The state_dict, tracking which keys were consumed."""

  def __init__(self, state_dict: dict[str, np.ndarray]):
    self.arrays = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    self.used: set[str] = set()

  def take(self, key: str) -> np.ndarray:
    if key not in self.arrays:
      raise ValueError(f"the weights have no {key!r}; are they the model --from names?")
    self.used.add(key)
    return self.arrays[key]

  def check_all_used(self) -> None:
    unused = sorted(set(self.arrays) - self.used)
    if unused:
      raise ValueError(f"weights not used by the conversion: {unused[:8]}"
                       f"{' ...' if len(unused) > 8 else ''}")


def _assign(variable: nnx.Variable, value: np.ndarray, key: str) -> None:
  if tuple(variable.shape) != tuple(value.shape):
    raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(variable.shape)}")
  variable[...] = np.asarray(value, np.float32)


def assign_conv_bn(layer: ConvBN, source: WeightSource, conv: str, bn: str) -> None:
  """PyTorch Conv2d at `conv` and BatchNorm2d at `bn` -> our ConvBN."""
  _assign(layer.conv.kernel, source.take(f"{conv}.weight").transpose(2, 3, 1, 0), conv)
  for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                       ("var", "running_var")):
    _assign(getattr(layer.bn, ours), source.take(f"{bn}.{theirs}"), f"{bn}.{theirs}")


def assign_fc(fc, source: WeightSource, key: str = "fc", bias: bool = True) -> None:
  _assign(fc.linear.kernel, source.take(f"{key}.weight").T, f"{key}.weight")
  if bias:
    _assign(fc.linear.bias, source.take(f"{key}.bias"), f"{key}.bias")
