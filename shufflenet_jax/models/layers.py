"""Building blocks shared by every model: channel shuffle, convolutions, BN, pooling.

Tensors are NHWC. Every grouped or depthwise convolution in the project goes through `conv2d`
(or `Conv.grouped`), so the implementation is chosen in one place: XLA's `feature_group_count`
convs, or the `matmul` formulation (matmul.py; much faster on XLA:CPU, BENCHMARKS.md), which
can also run ShuffleNet v1 stages group-major (`group_major`). Both are tested equal, forward
and backward, and against float64.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import normalization  # nnx's BatchNorm helpers (layers.BatchNorm)

from shufflenet_jax.models import matmul

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


# compute_dtype: `auto` computes in bfloat16 where the chips have bfloat16 matrix units (TPU,
# GPU) and in float32 on CPU, where XLA:CPU emulates bfloat16 and is slower (BENCHMARKS.md).
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def resolve_compute_dtype(name: str, backend: str | None = None) -> str:
  """`auto` -> "bfloat16" on TPU and GPU, "float32" on CPU (default: JAX's default backend)."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype={name!r} is not one of {COMPUTE_DTYPES}")
  if name == "auto":
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"
  return name


def group_major(conv_impl: str, groups: int) -> bool:
  """Whether a ShuffleNet v1 stage with `groups` runs group-major (matmul.to_groups): only
  under the matmul formulation, where its grouped 1x1 convs become transpose-free matmuls."""
  return groups > 1 and resolve_conv_impl(conv_impl) == "matmul"


def _xla_conv(x, kernel, stride, padding, groups):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0,
           groups: int = 1, impl: str = "auto") -> jax.Array:
  """NHWC conv with an HWIO kernel and symmetric padding; the one place convs are computed."""
  impl = resolve_conv_impl(impl)
  cin_per_group, cin = kernel.shape[2], x.shape[-1]
  if cin != cin_per_group * groups:
    raise ValueError(f"conv2d: input has {cin} channels, kernel expects "
                     f"{cin_per_group} x groups={groups}")
  if impl == "matmul":
    y = matmul.conv2d(x, kernel, stride, padding, groups)
    if y is not None:
      return y
  return _xla_conv(x, kernel, stride, padding, groups)


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
    y = matmul.conv_grouped(xg, kernel, groups=self.groups, stride=self.stride,
                            padding=self.padding, permute=permute)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype).reshape(xg.shape[0], 1, 1, 1, -1)
    return y


class BatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm with PyTorch's running-variance update: a batch is normalised with its biased
  variance (as nnx does), but the running average takes the unbiased one, n / (n - 1) times it
  for n values a channel, as torch.nn.BatchNorm2d does (found by tests/test_recipes.py: after 10
  steps at batch 16 the official training's stage-4 running variances were 3% above nnx's).
  The train-mode path is nnx's own, through its helpers, with that one update changed."""

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = (self.use_running_average if use_running_average is None
                           else use_running_average)
    if use_running_average or mask is not None:
      return super().__call__(x, use_running_average=use_running_average, mask=mask)
    feature_axes = normalization._canonicalize_axes(x.ndim, self.axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    x, _, _, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], self.scale[...], self.bias[...]), dtype=self.dtype)
    mean, var = normalization._compute_stats(
        x, reduction_axes, dtype=self.dtype, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, use_fast_variance=self.use_fast_variance)
    n = math.prod(x.shape[i] for i in reduction_axes)
    if self.axis_name is not None:
      n = n * jax.lax.psum(1, self.axis_name)
    stop = jax.lax.stop_gradient if self.mean._can_update or self.var._can_update else (
        lambda v: v)
    self.mean[...] = stop(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
    self.var[...] = stop(self.momentum * self.var[...]
                         + (1 - self.momentum) * matmul.unbiased(var, n))
    return normalization._normalize(x, mean, var, scale, bias, reduction_axes, feature_axes,
                                    self.dtype, self.epsilon)


def batch_norm(features: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm with PyTorch's momentum, epsilon and running-variance update; statistics stay
  float32 under bf16 compute."""
  return BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)


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
    """`__call__` on group-major activations (see `matmul.to_groups`, `Conv.grouped`)."""
    xg = matmul.batch_norm_grouped(self.bn, self.conv.grouped(xg, permute), train)
    return jax.nn.relu(xg) if self.relu else xg


def _pool(x, init, op, size, stride, padding):
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, init, op, (1, size, size, 1), (1, stride, stride, 1), pad)


def max_pool(x: jax.Array, size: int = 3, stride: int = 2, padding: int = 1, *,
             impl: str = "xla") -> jax.Array:
  """Max pool with explicit symmetric padding (SAME pads (0, 1) at stride 2, unlike PyTorch).
  `impl` follows the conv implementation: `matmul` spells it as shifted slices (XLA:CPU)."""
  if resolve_conv_impl(impl) == "matmul":
    return matmul.max_pool_shifted(x, size, stride, padding)
  return _pool(x, -jnp.inf, jax.lax.max, size, stride, padding)


def avg_pool(x: jax.Array, size: int = 3, stride: int = 2, padding: int = 1, *,
             impl: str = "xla") -> jax.Array:
  """Average pool that counts padded zeros, as PyTorch's AvgPool2d does by default."""
  if resolve_conv_impl(impl) == "matmul":
    summed = matmul.avg_pool_sum(x, size, stride, padding)
  else:
    summed = _pool(x, 0.0, jax.lax.add, size, stride, padding)
  return summed / (size * size)


def global_avg_pool(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2))


class Dense(nnx.Module):
  """Classifier layer; logits are computed and returned in float32 (or wider: a float64 model,
  the tests' truth, keeps float64)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               rngs: nnx.Rngs):
    self.linear = nnx.Linear(in_features, out_features, use_bias=use_bias,
                             kernel_init=nnx.initializers.normal(0.01), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(x.astype(jnp.promote_types(x.dtype, jnp.float32)))



SE_STYLES = ("senet", "official")


class SqueezeExcite(nnx.Module):
  """Squeeze-and-excitation: x * gate(expand(relu(reduce(mean over H, W of x)))).

  `senet` is Hu et al.'s block, which the V1 paper cites for its "with SE" row: reduction 16,
  fully connected layers with biases, a sigmoid gate. `official` is the SELayer of Megvii's
  ShuffleNetV2+ and ShuffleNetV2.Large: reduction 4, bias-free 1x1 convs with a BN after the
  first, a hard-sigmoid gate (relu6(x + 3) / 6). Both count their two layers' MACs.
  """

  def __init__(self, channels: int, *, style: str = "senet", conv_impl: str = "auto", dtype=None,
               rngs: nnx.Rngs):
    if style not in SE_STYLES:
      raise ValueError(f"se_style={style!r} is not one of {SE_STYLES}")
    self.style = style
    official = style == "official"
    hidden = max(1, channels // (4 if official else 16))
    common = dict(use_bias=not official, conv_impl=conv_impl, dtype=dtype, rngs=rngs)
    self.reduce = Conv(channels, hidden, 1, **common)
    self.bn = batch_norm(hidden, dtype=dtype, rngs=rngs) if official else None
    self.expand = Conv(hidden, channels, 1, **common)

  def gate(self, pooled: jax.Array, train: bool) -> jax.Array:
    """The per-channel gate [N, 1, 1, C] of the spatial means `pooled` [N, 1, 1, C]."""
    h = self.reduce(pooled)
    if self.bn is not None:
      h = self.bn(h, use_running_average=not train)
    h = self.expand(jax.nn.relu(h))
    return jax.nn.relu6(h + 3.0) / 6.0 if self.style == "official" else jax.nn.sigmoid(h)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    gate = self.gate(jnp.mean(x, axis=(1, 2), keepdims=True), train)
    return x * gate.astype(x.dtype)

  def grouped(self, xg: jax.Array, train: bool) -> jax.Array:
    """`__call__` on group-major activations [g, N, H, W, C/g]: only the pooled vector and
    the gate change layout (tiny), the activations stay in place."""
    pooled = matmul.from_groups(jnp.mean(xg, axis=(2, 3), keepdims=True))
    gate = matmul.to_groups(self.gate(pooled, train), xg.shape[0])
    return xg * gate.astype(xg.dtype)


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


def apply_layers(layers, x: jax.Array, train: bool, features: bool = False):
  """The layers in order: the logits, or with `features=True` the backbone's feature maps for
  detection or segmentation heads (`feature_maps`)."""
  if features:
    return feature_maps(layers, x, train)
  for _, layer in layers:
    x = layer(x, train)
  return x


def feature_maps(layers, x: jax.Array, train: bool) -> dict[str, jax.Array]:
  """The last NHWC output at each resolution before the global pool, keyed by its stride to the
  input: with the ImageNet stem {"stride2": conv1, "stride4": max pool, "stride8": stage2,
  "stride16": stage3, "stride32": stage4 (V2: conv5)}; with the small stem stride1..8. The same
  values the classifier path computes (the logits are fc(mean of the last map))."""
  size, maps = x.shape[1], {}
  for name, layer in layers:
    if name == "global_pool":
      break
    x = layer(x, train)
    maps[f"stride{round(size / x.shape[1])}"] = x
  return maps
