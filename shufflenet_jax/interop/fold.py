"""Folding inference-mode BatchNorm into the preceding conv, for deployment.

conv(x, W) -> BN(mean, var, scale, bias) equals conv(x, W * s) + (bias - mean * s) with
s = scale / sqrt(var + eps). The folded BN is left in place as an exact identity plus the new
bias (scale 1, mean 0, var 1 - eps), so the model's code is unchanged; with the weights as
constants (jax.export, TFLite) compilers reduce it to one add after the conv.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from shufflenet_jax.models.layers import ConvBN


def fold_batch_norm(model: nnx.Module) -> int:
  """Folds every ConvBN's BN statistics into its kernel, in place; returns how many it folded."""
  count = 0
  for _, module in nnx.iter_modules(model):
    if not isinstance(module, ConvBN):
      continue
    bn, conv = module.bn, module.conv
    s = bn.scale[...] / jnp.sqrt(bn.var[...] + bn.epsilon)
    conv.kernel[...] = conv.kernel[...] * s  # the kernel's last axis is the output channel
    bn.bias[...] = bn.bias[...] - bn.mean[...] * s
    bn.scale[...] = jnp.ones_like(s)
    bn.mean[...] = jnp.zeros_like(s)
    bn.var[...] = jnp.full_like(s, 1.0 - bn.epsilon)
    count += 1
  return count
