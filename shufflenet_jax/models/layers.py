"""Building blocks shared by every model: channel shuffle, convolutions, BN, pooling.

Tensors are NHWC. Every grouped or depthwise convolution in the project goes through `conv2d`
(or `Conv.grouped`), so the implementation is chosen in one place: XLA's `feature_group_count`
convs, or `matmul` (much faster on XLA:CPU, BENCHMARKS.md): grouped 1x1 convs as einsums,
depthwise convs and pooling as shifted slices (depthwise and max pool with their own VJPs), and
ShuffleNet v1 stages in a group-major layout (`to_groups`) where grouped convs need no
transposes and the channel shuffle is read by the depthwise conv. Both are tested equal, forward
and backward.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from flax import nnx

CONV_IMPLS = ("auto", "xla", "matmul")
SHUFFLE_ORDERS = ("paper", "official")

# BatchNorm as the papers and PyTorch use it; NNX's default momentum (0.99) is not PyTorch's 0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _check_divisible(channels: int, groups: int, what: str) -> None:
  if groups < 1 or channels % groups:
    raise ValueError(f"{what}: {channels} channels are not divisible by groups={groups}")


# Traced while set: the shuffle as a fixed 4-D gather instead of a 5-D reshape-transpose, which
# TFLite/ONNX converters reject (export.py). The same permutation either way.
_SHUFFLE_AS_GATHER = contextvars.ContextVar("shuffle_as_gather", default=False)


@contextlib.contextmanager
def shuffle_as_gather():
  token = _SHUFFLE_AS_GATHER.set(True)
  try:
    yield
  finally:
    _SHUFFLE_AS_GATHER.reset(token)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """The paper's shuffle: channels as (groups, n) -> transpose to (n, groups) -> flatten."""
  *lead, c = x.shape
  _check_divisible(c, groups, "channel_shuffle")
  if _SHUFFLE_AS_GATHER.get():
    return jnp.take(x, jnp.asarray(shuffle_permutation(c, groups)), axis=-1)
  x = x.reshape(*lead, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


def channel_unshuffle(x: jax.Array, groups: int) -> jax.Array:
  """Inverse of `channel_shuffle`: (n, groups) -> (groups, n); the official Megvii V1 order."""
  *lead, c = x.shape
  _check_divisible(c, groups, "channel_unshuffle")
  if _SHUFFLE_AS_GATHER.get():
    return jnp.take(x, jnp.asarray(shuffle_permutation(c, c // groups)), axis=-1)
  x = x.reshape(*lead, c // groups, groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


def shuffle_permutation(channels: int, groups: int) -> list[int]:
  """Output channel i of `channel_shuffle` is input channel perm[i] (a fixed gather, 4-D export)."""
  _check_divisible(channels, groups, "shuffle_permutation")
  n = channels // groups
  return [(i % groups) * n + i // groups for i in range(channels)]


def resolve_conv_impl(impl: str, backend: str | None = None) -> str:
  """`auto` picks the measured fastest implementation for `backend` (default: JAX's default
  backend; BENCHMARKS.md)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl={impl!r} is not one of {CONV_IMPLS}")
  if impl == "auto":
    return "matmul" if (backend or jax.default_backend()) == "cpu" else "xla"
  return impl


def _xla_conv(x, kernel, stride, padding, groups):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


def _accumulator(dtype):
  """The matmul path computes in float32 (as XLA's conv accumulates): bf16 running sums lose
  digits, and XLA:CPU has no bf16 x bf16 -> f32 dot for the backward pass."""
  return jnp.promote_types(dtype, jnp.float32)


def _grouped_pointwise(x, kernel, groups):
  """1x1 conv with groups as one batched matmul over (groups, channels per group)."""
  *lead, cin = x.shape
  cout = kernel.shape[-1]
  xg = x.reshape(*lead, groups, cin // groups)
  kg = kernel.reshape(cin // groups, groups, cout // groups).swapaxes(0, 1)
  acc = _accumulator(x.dtype)
  y = jnp.einsum("...gi,gio->...go", xg.astype(acc), kg.astype(acc))
  return y.reshape(*lead, cout).astype(x.dtype)


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


def _pad_hw(x, padding, value=0.0):
  config = [(0, 0)] * (x.ndim - 3) + [(padding, padding), (padding, padding), (0, 0)]
  return jnp.pad(x, config, constant_values=value)


def _windows(xp, size, stride, padding):
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


def _depthwise_shifted(x, weights, stride, padding, permute=None):
  """Depthwise k x k conv of x [..., H, W, C] as a sum of k*k strided slices times per-channel
  weights [k, k, <broadcastable to x>], accumulated in float32, of `permute(x)` when given (a
  channel permutation, which XLA then fuses into the reads instead of copying x).

  The custom VJP keeps only the padded (permuted) input for the backward pass: differentiating
  the slices directly makes XLA materialise all k*k shifted copies of it as residuals."""
  return _depthwise_vjp(x, _vary_like(weights, x), stride, padding, permute)


def _depthwise_sum(xp, weights, stride, padding):
  """The depthwise conv of the padded input xp: k*k window slices times their weights."""
  size = weights.shape[0]
  acc = _accumulator(xp.dtype)
  y = sum(window.astype(acc) * weights[k // size, k % size].astype(acc)
          for k, window in enumerate(_windows(xp, size, stride, padding)))
  return y.astype(xp.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_vjp(x, weights, stride, padding, permute):
  return _depthwise_fwd(x, weights, stride, padding, permute)[0]


def _depthwise_fwd(x, weights, stride, padding, permute):
  # The padded (permuted) input is stored once and read by every window, here and in the
  # backward pass: left to itself XLA recomputes x's producers (BN, ReLU, the permutation) in
  # each window (measured: inference 1.1x slower without this barrier).
  xp = jax.lax.optimization_barrier(_pad_hw(permute(x) if permute else x, padding))
  return _depthwise_sum(xp, weights, stride, padding), (xp, weights)


def _depthwise_bwd(stride, padding, permute, residuals, dy):
  xp, weights = residuals
  size = weights.shape[0]
  acc = _accumulator(xp.dtype)
  dy = dy.astype(acc)
  dweights = jnp.stack([_sum_to_shape(window.astype(acc) * dy, weights.shape[2:])
                        for window in _windows(xp, size, stride, padding)])
  dweights = dweights.reshape(weights.shape)
  dxp = sum(_window_scatter(dy * weights[k // size, k % size].astype(acc), k // size, k % size,
                            xp.shape[-3], xp.shape[-2], stride) for k in range(size * size))
  h, w = xp.shape[-3] - 2 * padding, xp.shape[-2] - 2 * padding
  dsource = dxp[..., padding:padding + h, padding:padding + w, :].astype(xp.dtype)
  if permute:  # the permutation's transpose (x has dsource's shape and type)
    dsource = jax.linear_transpose(permute, dsource)(dsource)[0]
  return dsource, dweights.astype(weights.dtype)


_depthwise_vjp.defvjp(_depthwise_fwd, _depthwise_bwd)


def _depthwise(x, kernel, stride, padding):
  """NHWC depthwise conv with an HW1C kernel (channel multiplier = C_out / C_in)."""
  mult = kernel.shape[-1] // x.shape[-1]
  if mult > 1:  # channel multiplier: output channel j reads input channel j // mult
    x = jnp.repeat(x, mult, axis=-1)
  return _depthwise_shifted(x, kernel[:, :, 0], stride, padding)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0,
           groups: int = 1, impl: str = "auto") -> jax.Array:
  """NHWC conv with an HWIO kernel and symmetric padding; the one place convs are computed."""
  impl = resolve_conv_impl(impl)
  kh, kw, cin_per_group, cout = kernel.shape
  cin = x.shape[-1]
  if cin != cin_per_group * groups:
    raise ValueError(f"conv2d: input has {cin} channels, kernel expects "
                     f"{cin_per_group} x groups={groups}")
  if impl == "matmul":
    if kh == kw == 1 and padding == 0:
      if stride > 1:
        x = x[:, ::stride, ::stride, :]
      if groups == 1:
        acc = _accumulator(x.dtype)
        y = jnp.einsum("nhwi,io->nhwo", x.astype(acc), kernel[0, 0].astype(acc))
        return y.astype(x.dtype)
      return _grouped_pointwise(x, kernel, groups)
    if groups == cin and cin_per_group == 1:
      return _depthwise(x, kernel, stride, padding)
  return _xla_conv(x, kernel, stride, padding, groups)


# Group-major activations: [g, N, H, W, C/g] holds NHWC channel c at (c // (C/g), ..., c % (C/g)),
# the same channel order with the groups outermost in memory. A grouped 1x1 conv is then one
# batched matmul over g with no transposes; in NHWC, XLA:CPU transposes its input and output
# around every grouped matmul, forward and backward (5x slower, BENCHMARKS.md). ShuffleNet v1
# keeps a whole stage group-major with conv_impl=matmul.


def to_groups(x: jax.Array, groups: int) -> jax.Array:
  """NHWC -> group-major [groups, N, H, W, C/groups]."""
  *lead, c = x.shape
  _check_divisible(c, groups, "to_groups")
  return jnp.moveaxis(x.reshape(*lead, groups, c // groups), -2, 0)


def from_groups(xg: jax.Array) -> jax.Array:
  """Group-major [g, N, H, W, C/g] -> NHWC."""
  g, *lead, c = xg.shape
  return jnp.moveaxis(xg, 0, -2).reshape(*lead, g * c)


def regroup(xg: jax.Array, permute) -> jax.Array:
  """Apply an NHWC channel permutation (e.g. channel_shuffle) to a group-major tensor; XLA
  turns the three reshapes/transposes into one copy of it."""
  return to_groups(permute(from_groups(xg)), xg.shape[0])


def batch_norm_grouped(bn: nnx.BatchNorm, xg: jax.Array, train: bool) -> jax.Array:
  """`bn` (an nnx.BatchNorm over C channels) on group-major xg: the same statistics (float32,
  E[x^2] - E[x]^2 as nnx computes them), running-average updates and output dtype."""
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
    bn.var[...] = stop(bn.momentum * bn.var[...] + (1 - bn.momentum) * var)
  else:
    mean, var = bn.mean[...], bn.var[...]
  mean, var = mean.astype(dtype).reshape(shape), var.astype(dtype).reshape(shape)
  multiplier = jax.lax.rsqrt(var + bn.epsilon) * bn.scale[...].astype(dtype).reshape(shape)
  return ((x - mean) * multiplier + bn.bias[...].astype(dtype).reshape(shape)).astype(dtype)


class Conv(nnx.Module):
  """Bias-free (by default) NHWC conv whose grouped/depthwise math goes through `conv2d`."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 1, *,
               stride: int = 1, padding: int | None = None, groups: int = 1,
               use_bias: bool = False, conv_impl: str = "auto", dtype=None,
               rngs: nnx.Rngs):
    _check_divisible(in_features, groups, "Conv input")
    _check_divisible(out_features, groups, "Conv output")
    self.stride = stride
    self.padding = (kernel_size - 1) // 2 if padding is None else padding
    self.groups = groups
    self.conv_impl = resolve_conv_impl(conv_impl)
    self.dtype = dtype
    shape = (kernel_size, kernel_size, in_features // groups, out_features)
    init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    if self.dtype is not None:
      x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = conv2d(x, kernel, stride=self.stride, padding=self.padding, groups=self.groups,
               impl=self.conv_impl)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y

  def grouped(self, xg: jax.Array, permute=None) -> jax.Array:
    """The same conv on group-major activations (matmul implementation): grouped 1x1 convs
    whose groups are the layout's, and depthwise convs, which can read their input through a
    channel permutation `permute` (group-major -> group-major) at no extra pass."""
    kernel = self.kernel[...]
    if self.dtype is not None:
      xg, kernel = xg.astype(self.dtype), kernel.astype(self.dtype)
    g, c = xg.shape[0], xg.shape[-1]
    kh, kw, cin_per_group, cout = kernel.shape
    acc = _accumulator(xg.dtype)
    if permute is not None and self.groups != g * c:
      raise ValueError("Conv.grouped: only depthwise convs take a permuted input")
    if kh == kw == 1 and self.stride == 1 and self.groups == g and cin_per_group == c:
      kg = kernel[0, 0].reshape(c, g, cout // g).swapaxes(0, 1)
      y = jnp.einsum("gnhwi,gio->gnhwo", xg.astype(acc), kg.astype(acc)).astype(xg.dtype)
    elif self.groups == g * c and cin_per_group == 1 and cout == g * c:
      y = _depthwise_shifted(xg, kernel.reshape(kh, kw, g, 1, 1, 1, c), self.stride,
                             self.padding, permute)
    else:
      raise ValueError(f"Conv.grouped: no group-major form for a {kh}x{kw} conv with "
                       f"groups={self.groups} on {g} x {c} channels")
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype).reshape(g, 1, 1, 1, -1)
    return y


def batch_norm(features: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm with PyTorch's momentum/epsilon; statistics stay float32 under bf16 compute."""
  return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                       rngs=rngs)


class ConvBN(nnx.Module):
  """Conv -> BatchNorm -> optional ReLU, the unit every ShuffleNet layer is made of."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 1, *,
               stride: int = 1, groups: int = 1, relu: bool = True, conv_impl: str = "auto",
               dtype=None, rngs: nnx.Rngs):
    self.conv = Conv(in_features, out_features, kernel_size, stride=stride, groups=groups,
                     conv_impl=conv_impl, dtype=dtype, rngs=rngs)
    self.bn = batch_norm(out_features, dtype=dtype, rngs=rngs)
    self.relu = relu

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = self.bn(self.conv(x), use_running_average=not train)
    return jax.nn.relu(x) if self.relu else x

  def grouped(self, xg: jax.Array, train: bool, permute=None) -> jax.Array:
    """`__call__` on group-major activations (see `to_groups` and `Conv.grouped`)."""
    xg = batch_norm_grouped(self.bn, self.conv.grouped(xg, permute), train)
    return jax.nn.relu(xg) if self.relu else xg


def _pool(x, init, op, size, stride, padding):
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, init, op, (1, size, size, 1), (1, stride, stride, 1), pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_shifted(x, size, stride, padding):
  """Max over k*k strided slices. The gradient goes to the first maximum of each window (as
  PyTorch's), recorded in the forward pass as a small int8 window index, so the backward pass
  is one fused pass over dy; XLA:CPU's own gradient of reduce_window (select-and-scatter with
  int32 index tensors) was the slowest op of the train step."""
  return _max_pool_fwd(x, size, stride, padding)[0]


def _max_pool_fwd(x, size, stride, padding):
  windows = _windows(_pad_hw(x, padding, -jnp.inf), size, stride, padding)
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


_max_pool_shifted.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, size: int = 3, stride: int = 2, padding: int = 1, *,
             impl: str = "xla") -> jax.Array:
  """Max pool with explicit symmetric padding (SAME pads (0, 1) at stride 2, unlike PyTorch).
  `impl` follows the conv implementation: `matmul` spells it as shifted slices (XLA:CPU)."""
  if resolve_conv_impl(impl) == "matmul":
    return _max_pool_shifted(x, size, stride, padding)
  return _pool(x, -jnp.inf, jax.lax.max, size, stride, padding)


def avg_pool(x: jax.Array, size: int = 3, stride: int = 2, padding: int = 1, *,
             impl: str = "xla") -> jax.Array:
  """Average pool that counts padded zeros, as PyTorch's AvgPool2d does by default."""
  if resolve_conv_impl(impl) == "matmul":  # linear: autodiff of the slices is one fused pass
    summed = sum(_windows(_pad_hw(x, padding), size, stride, padding))
  else:
    summed = _pool(x, 0.0, jax.lax.add, size, stride, padding)
  return summed / (size * size)


def global_avg_pool(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2))


class Dense(nnx.Module):
  """Classifier layer; logits are computed and returned in float32."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               rngs: nnx.Rngs):
    self.linear = nnx.Linear(in_features, out_features, use_bias=use_bias,
                             kernel_init=nnx.initializers.normal(0.01), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(x.astype(jnp.float32))



def sequential(modules):
  """fn(x, train) that applies `modules` (each called as m(x, train)) in order."""
  def apply(x, train):
    for module in modules:
      x = module(x, train)
    return x
  return apply


def stem_and_stages(model, stage_fn=sequential) -> list[tuple[str, callable]]:
  """The macro layout shared by the models: conv1, max pool (ImageNet stem), stage2..4, each
  stage applied by `stage_fn(units)`."""
  layers = [("conv1", model.conv1)]
  if model.stem == "imagenet":
    impl = model.conv1.conv.conv_impl
    layers.append(("maxpool", lambda x, train: max_pool(x, impl=impl)))
  for index, stage in enumerate(model.stages):
    layers.append((f"stage{index + 2}", stage_fn(stage)))
  return layers


def pool_and_classify(model) -> list[tuple[str, callable]]:
  return [("global_pool", lambda x, train: global_avg_pool(x)),
          ("fc", lambda x, train: model.fc(x))]


def apply_layers(layers, x: jax.Array, train: bool) -> jax.Array:
  for _, layer in layers:
    x = layer(x, train)
  return x
