"""The `matmul` formulation of the convolutions and pooling (`conv_impl=matmul`, picked on CPU:
XLA:CPU's `feature_group_count` convs and reduce_window gradients are many times slower,
BENCHMARKS.md). Grouped 1x1 convs are einsums, depthwise convs and pooling are sums of shifted
slices (depthwise and max pool with their own VJPs), and ShuffleNet v1 stages can run in a
group-major layout (`to_groups`) where grouped convs need no transposes and the channel shuffle
is read by the depthwise conv. layers.py chooses between this and XLA's ops; every function here
is tested against XLA's formulation and against float64 (tests/test_conv_impls.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def accumulator(dtype):
  """The matmul path computes in float32 (as XLA's conv accumulates): bf16 running sums lose
  digits, and XLA:CPU has no bf16 x bf16 -> f32 dot for the backward pass."""
  return jnp.promote_types(dtype, jnp.float32)


def grouped_pointwise(x, kernel, groups):
  """1x1 conv with groups as one batched matmul over (groups, channels per group)."""
  *lead, cin = x.shape
  cout = kernel.shape[-1]
  xg = x.reshape(*lead, groups, cin // groups)
  kg = kernel.reshape(cin // groups, groups, cout // groups).swapaxes(0, 1)
  acc = accumulator(x.dtype)
  y = jnp.einsum("...gi,gio->...go", xg.astype(acc), kg.astype(acc))
  return y.reshape(*lead, cout).astype(x.dtype)


def pointwise(x, kernel, stride, groups):
  """1x1 conv (no padding) of NHWC x with an HWIO kernel: one matmul, or one batched matmul
  over the groups."""
  if stride > 1:
    x = x[:, ::stride, ::stride, :]
  if groups == 1:
    acc = accumulator(x.dtype)
    return jnp.einsum("nhwi,io->nhwo", x.astype(acc), kernel[0, 0].astype(acc)).astype(x.dtype)
  return grouped_pointwise(x, kernel, groups)


def conv2d(x, kernel, stride, padding, groups):
  """The conv in this formulation, or None where it has none (dense k x k convs: XLA's)."""
  kh, kw, cin_per_group, _ = kernel.shape
  if kh == kw == 1 and padding == 0:
    return pointwise(x, kernel, stride, groups)
  if groups == x.shape[-1] and cin_per_group == 1:
    return depthwise(x, kernel, stride, padding)
  return None


# Windowed ops as shifted slices. Arrays are [..., H, W, C]: NHWC, or group-major [g, N, H, W, c].


def _window_slice(xp, i, j, out_h, out_w, stride):
  """Window position (i, j) of every output pixel: a strided slice of the padded input."""
  lead = xp.ndim - 3
  start = (0,) * lead + (i, j, 0)
  limit = xp.shape[:lead] + (i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1,
                             xp.shape[-1])
  return jax.lax.slice(xp, start, limit, (1,) * lead + (stride, stride, 1))


def _window_scatter(dy, i, j, padded_h, padded_w, stride):
  """Transpose of `_window_slice`: dy placed back at window position (i, j), zeros elsewhere."""
  out_h, out_w = dy.shape[-3:-1]
  span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
  config = [(0, 0, 0)] * (dy.ndim - 3) + [(i, padded_h - i - span_h, stride - 1),
                                          (j, padded_w - j - span_w, stride - 1), (0, 0, 0)]
  return jax.lax.pad(dy, jnp.zeros((), dy.dtype), config)


def _out_size(size, window, stride, padding):
  return (size + 2 * padding - window) // stride + 1


def pad_hw(x, padding, value=0.0):
  config = [(0, 0)] * (x.ndim - 3) + [(padding, padding), (padding, padding), (0, 0)]
  return jnp.pad(x, config, constant_values=value)


def window_slices(xp, size, stride, padding):
  """The size x size window slices of xp (the input padded by `padding` on each side)."""
  out_h, out_w = (_out_size(d - 2 * padding, size, stride, padding) for d in xp.shape[-3:-1])
  return [_window_slice(xp, i, j, out_h, out_w, stride) for i in range(size) for j in range(size)]


def _sum_to_shape(t, shape):
  """Sum t over the axes that `shape` (right-aligned, as in broadcasting) does not keep."""
  shape = (1,) * (t.ndim - len(shape)) + tuple(shape)
  return jnp.sum(t, axis=tuple(a for a, d in enumerate(shape) if d == 1 and t.shape[a] > 1),
                 keepdims=True)


def _vary_like(w, x):
  """Under shard_map, `w` cast to vary over the mesh axes x varies over, as autodiff does
  implicitly, so that a custom VJP's cotangent for w has w's type (the cast's transpose then
  sums it over those axes). A no-op outside shard_map."""
  axes = tuple(jax.typeof(x).mat.varying - jax.typeof(w).mat.varying)
  return jax.lax.pcast(w, axes, to="varying") if axes else w


def depthwise_shifted(x, weights, stride, padding, permute=None):
  """Depthwise k x k conv of x [..., H, W, C] as a sum of k*k strided slices times per-channel
  weights [k, k, <broadcastable to x>], accumulated in float32, of `permute(x)` when given (a
  channel permutation, which XLA then fuses into the reads instead of copying x).

  The custom VJP keeps only the padded (permuted) input for the backward pass: differentiating
  the slices directly makes XLA materialise all k*k shifted copies of it as residuals."""
  return _depthwise_vjp(x, _vary_like(weights, x), stride, padding, permute)


def _depthwise_sum(xp, weights, stride, padding):
  """The depthwise conv of the padded input xp: k*k window slices times their weights."""
  size = weights.shape[0]
  acc = accumulator(xp.dtype)
  y = sum(window.astype(acc) * weights[k // size, k % size].astype(acc)
          for k, window in enumerate(window_slices(xp, size, stride, padding)))
  return y.astype(xp.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_vjp(x, weights, stride, padding, permute):
  return _depthwise_fwd(x, weights, stride, padding, permute)[0]


def _depthwise_fwd(x, weights, stride, padding, permute):
  # The padded (permuted) input is stored once and read by every window, here and in the
  # backward pass: left to itself XLA recomputes x's producers (BN, ReLU, the permutation) in
  # each window (measured: inference 1.1x slower without this barrier).
  xp = jax.lax.optimization_barrier(pad_hw(permute(x) if permute else x, padding))
  return _depthwise_sum(xp, weights, stride, padding), (xp, weights)


def _depthwise_bwd(stride, padding, permute, residuals, dy):
  xp, weights = residuals
  size = weights.shape[0]
  acc = accumulator(xp.dtype)
  dy = dy.astype(acc)
  dweights = jnp.stack([_sum_to_shape(window.astype(acc) * dy, weights.shape[2:])
                        for window in window_slices(xp, size, stride, padding)])
  dweights = dweights.reshape(weights.shape)
  dxp = sum(_window_scatter(dy * weights[k // size, k % size].astype(acc), k // size, k % size,
                            xp.shape[-3], xp.shape[-2], stride) for k in range(size * size))
  h, w = xp.shape[-3] - 2 * padding, xp.shape[-2] - 2 * padding
  dsource = dxp[..., padding:padding + h, padding:padding + w, :].astype(xp.dtype)
  if permute:  # the permutation's transpose (x has dsource's shape and type)
    dsource = jax.linear_transpose(permute, dsource)(dsource)[0]
  return dsource, dweights.astype(weights.dtype)


_depthwise_vjp.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise(x, kernel, stride, padding):
  """NHWC depthwise conv with an HW1C kernel (channel multiplier = C_out / C_in)."""
  mult = kernel.shape[-1] // x.shape[-1]
  if mult > 1:  # channel multiplier: output channel j reads input channel j // mult
    x = jnp.repeat(x, mult, axis=-1)
  return depthwise_shifted(x, kernel[:, :, 0], stride, padding)


# Group-major activations: [g, N, H, W, C/g] holds NHWC channel c at (c // (C/g), ..., c % (C/g)),
# the same channel order with the groups outermost in memory. A grouped 1x1 conv is then one
# batched matmul over g with no transposes; in NHWC, XLA:CPU transposes its input and output
# around every grouped matmul, forward and backward (5x slower, BENCHMARKS.md). ShuffleNet v1
# keeps a whole stage group-major with conv_impl=matmul.


def to_groups(x: jax.Array, groups: int) -> jax.Array:
  """NHWC -> group-major [groups, N, H, W, C/groups]."""
  *lead, c = x.shape
  if groups < 1 or c % groups:
    raise ValueError(f"to_groups: {c} channels are not divisible by groups={groups}")
  return jnp.moveaxis(x.reshape(*lead, groups, c // groups), -2, 0)


def from_groups(xg: jax.Array) -> jax.Array:
  """Group-major [g, N, H, W, C/g] -> NHWC."""
  g, *lead, c = xg.shape
  return jnp.moveaxis(xg, 0, -2).reshape(*lead, g * c)


def regroup(xg: jax.Array, permute) -> jax.Array:
  """Apply an NHWC channel permutation (e.g. channel_shuffle) to a group-major tensor; XLA
  turns the three reshapes/transposes into one copy of it."""
  return to_groups(permute(from_groups(xg)), xg.shape[0])


def unbiased(var: jax.Array, n) -> jax.Array:
  """PyTorch's running-variance input: the unbiased estimate from the biased variance of n
  values (layers.BatchNorm and batch_norm_grouped)."""
  return var * (n / jnp.maximum(n - 1, 1))


def batch_norm_grouped(bn: nnx.BatchNorm, xg: jax.Array, train: bool) -> jax.Array:
  """`bn` (layers.BatchNorm over C channels) on group-major xg: the same statistics (float32,
  E[x^2] - E[x]^2 as nnx computes them), running-average updates (PyTorch's unbiased running
  variance) and output dtype."""
  if bn.axis_name is not None:
    raise ValueError("batch_norm_grouped does not average statistics over a named axis")
  g, c = xg.shape[0], xg.shape[-1]
  shape = (g, 1, 1, 1, c)
  dtype = bn.dtype or jnp.result_type(xg, bn.scale[...])
  x = xg.astype(dtype)
  if train:
    x32 = x.astype(jnp.promote_types(dtype, jnp.float32))
    mean = jnp.mean(x32, axis=(1, 2, 3))
    var = jnp.maximum(0.0, jnp.mean(jnp.square(x32), axis=(1, 2, 3)) - jnp.square(mean))
    mean, var = mean.reshape(-1), var.reshape(-1)
    stop = jax.lax.stop_gradient if bn.mean._can_update or bn.var._can_update else (lambda v: v)
    bn.mean[...] = stop(bn.momentum * bn.mean[...] + (1 - bn.momentum) * mean)
    n = xg.shape[1] * xg.shape[2] * xg.shape[3]
    bn.var[...] = stop(bn.momentum * bn.var[...] + (1 - bn.momentum) * unbiased(var, n))
  else:
    mean, var = bn.mean[...], bn.var[...]
  mean, var = mean.astype(dtype).reshape(shape), var.astype(dtype).reshape(shape)
  multiplier = jax.lax.rsqrt(var + bn.epsilon) * bn.scale[...].astype(dtype).reshape(shape)
  return ((x - mean) * multiplier + bn.bias[...].astype(dtype).reshape(shape)).astype(dtype)


def conv_grouped(xg, kernel, *, groups, stride, padding, permute=None):
  """A conv (HWIO kernel, `groups` as in NHWC) on group-major activations: a grouped 1x1 conv
  whose groups are the layout's, or a depthwise conv, which can read its input through a
  channel permutation `permute` (group-major -> group-major) at no extra pass."""
  g, c = xg.shape[0], xg.shape[-1]
  kh, kw, cin_per_group, cout = kernel.shape
  if permute is not None and groups != g * c:
    raise ValueError("Conv.grouped: only depthwise convs take a permuted input")
  if kh == kw == 1 and stride == 1 and groups == g and cin_per_group == c:
    acc = accumulator(xg.dtype)
    kg = kernel[0, 0].reshape(c, g, cout // g).swapaxes(0, 1)
    return jnp.einsum("gnhwi,gio->gnhwo", xg.astype(acc), kg.astype(acc)).astype(xg.dtype)
  if groups == g * c and cin_per_group == 1 and cout == g * c:
    return depthwise_shifted(xg, kernel.reshape(kh, kw, g, 1, 1, 1, c), stride, padding,
                             permute)
  raise ValueError(f"Conv.grouped: no group-major form for a {kh}x{kw} conv with "
                   f"groups={groups} on {g} x {c} channels")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_shifted(x, size, stride, padding):
  """Max over k*k strided slices. The gradient goes to the first maximum of each window (as
  PyTorch's), recorded in the forward pass as a small int8 window index, so the backward pass
  is one fused pass over dy; XLA:CPU's own gradient of reduce_window (select-and-scatter with
  int32 index tensors) was the slowest op of the train step."""
  return _max_pool_fwd(x, size, stride, padding)[0]


def _max_pool_fwd(x, size, stride, padding):
  windows = window_slices(pad_hw(x, padding, -jnp.inf), size, stride, padding)
  y, first = windows[0], jnp.zeros(windows[0].shape, jnp.int8)
  for index, window in enumerate(windows[1:], 1):
    first = jnp.where(window > y, jnp.int8(index), first)  # strictly greater: ties keep the first
    y = jnp.maximum(y, window)
  return y, (first, x.shape)


def _max_pool_bwd(size, stride, padding, residuals, dy):
  first, shape = residuals
  h, w = shape[-3:-1]
  padded_h, padded_w = h + 2 * padding, w + 2 * padding
  dxp = sum(_window_scatter(jnp.where(first == k, dy, 0), k // size, k % size, padded_h,
                            padded_w, stride) for k in range(size * size))
  return (dxp[..., padding:padding + h, padding:padding + w, :],)


max_pool_shifted.defvjp(_max_pool_fwd, _max_pool_bwd)


def avg_pool_sum(x, size, stride, padding):
  """The sum of each (zero-padded) window: linear, so autodiff of the slices is one fused pass."""
  return sum(window_slices(pad_hw(x, padding), size, stride, padding))
