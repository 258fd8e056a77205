"""ShuffleNet v1 (Zhang et al., CVPR 2018), exactly as the paper's Table 1 and unit description.

Width rule (the paper publishes only some widths):
  * g=3 and g=8 at 0.5x/1x/1.5x/2x use the official Megvii channel lists verbatim.
  * Otherwise Stage2 = scale x Table 1's 1x width, rounded half-up to a multiple of 4*g (so every
    bottleneck out//4 and every grouped conv divides by g); Stage3/4 double it. Conv1 is 24 for
    1x <= scale < 2x and 48 from 2x (as the official lists), and below 1x it is 24*scale rounded up
    to a multiple of g (the official 0.5x g8 list has 16, not 12, for this reason).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from shufflenet_jax.models.layers import (
    SHUFFLE_ORDERS,
    ConvBN,
    Dense,
    SqueezeExcite,
    apply_layers,
    avg_pool,
    channel_shuffle,
    channel_unshuffle,
    group_major,
    pool_and_classify,
    sequential,
    stem_and_stages,
)
from shufflenet_jax.models.matmul import from_groups, regroup, to_groups

GROUPS = (1, 2, 3, 4, 8)
SCALES = (0.25, 0.5, 1.0, 1.5, 2.0)
STEMS = ("imagenet", "small")
STAGE_REPEATS = (4, 8, 4)
# Table 1: Stage2 output channels at 1x for each group count; Stage3/4 double each time.
STAGE2_WIDTH_1X = {1: 144, 2: 200, 3: 240, 4: 272, 8: 384}
# Official Megvii lists [conv1, stage2, stage3, stage4].
OFFICIAL_CHANNELS = {
    (3, 0.5): (12, 120, 240, 480), (3, 1.0): (24, 240, 480, 960),
    (3, 1.5): (24, 360, 720, 1440), (3, 2.0): (48, 480, 960, 1920),
    (8, 0.5): (16, 192, 384, 768), (8, 1.0): (24, 384, 768, 1536),
    (8, 1.5): (24, 576, 1152, 2304), (8, 2.0): (48, 768, 1536, 3072),
}


def _round_to_multiple(value: float, multiple: int, *, up: bool = False) -> int:
  count = math.ceil(value / multiple) if up else math.floor(value / multiple + 0.5)
  return max(1, count) * multiple


def v1_channels(groups: int, scale: float) -> tuple[int, int, int, int]:
  """[conv1, stage2, stage3, stage4] output channels for (groups, scale), per the module rule."""
  if groups not in GROUPS:
    raise ValueError(f"groups={groups!r} is not one of {GROUPS}")
  if not isinstance(scale, (int, float)) or not 0 < scale <= 4:
    raise ValueError(f"scale={scale!r} must be a number in (0, 4]; the paper's are {SCALES}")
  scale = float(scale)
  if (groups, scale) in OFFICIAL_CHANNELS:
    return OFFICIAL_CHANNELS[(groups, scale)]
  stage2 = _round_to_multiple(scale * STAGE2_WIDTH_1X[groups], 4 * groups)
  if scale >= 2:
    conv1 = 48
  elif scale >= 1:
    conv1 = 24
  else:
    conv1 = _round_to_multiple(24 * scale, groups, up=True)
  return conv1, stage2, 2 * stage2, 4 * stage2


class ShuffleV1Unit(nnx.Module):
  """1x1 GConv-BN-ReLU -> shuffle -> 3x3 DWConv-BN -> 1x1 GConv-BN, then add or concat."""

  def __init__(self, in_features: int, out_features: int, *, stride: int, groups: int,
               dense_first: bool, shuffle: bool, shuffle_order: str, conv_impl: str,
               dtype, rngs: nnx.Rngs, se_style: str | None = None):
    if stride == 1 and in_features != out_features:
      raise ValueError(f"stride-1 unit needs in == out channels, got {in_features}->{out_features}")
    bottleneck = out_features // 4  # out//4 in every unit, stride-2 ones included (see facts)
    branch_out = out_features - in_features if stride == 2 else out_features
    common = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
    self.compress = ConvBN(in_features, bottleneck, 1, groups=1 if dense_first else groups,
                           **common)
    self.depthwise = ConvBN(bottleneck, bottleneck, 3, stride=stride, groups=bottleneck,
                            relu=False, **common)
    self.expand = ConvBN(bottleneck, branch_out, 1, groups=groups, relu=False, **common)
    # SE on the residual branch, before the add or concat (where SENet puts it in a ResNet unit).
    self.se = None if se_style is None else SqueezeExcite(branch_out, style=se_style, **common)
    self.stride = stride
    self.groups = groups
    self.shuffle = shuffle and groups > 1
    self.shuffle_order = shuffle_order
    self.conv_impl = conv_impl

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = self.compress(x, train)
    if self.shuffle and self.shuffle_order == "paper":
      y = channel_shuffle(y, self.groups)
    y = self.depthwise(y, train)
    if self.shuffle and self.shuffle_order == "official":  # Megvii: after the DW conv, inverse
      y = channel_unshuffle(y, self.groups)
    y = self.expand(y, train)
    return self._merge(x, y if self.se is None else self.se(y, train))

  def _merge(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """ReLU of the residual add (stride 1, any layout) or of [avg-pooled x, y] (stride 2, NHWC)."""
    if self.stride == 1:
      return jax.nn.relu(x + y)
    pooled = avg_pool(x, impl=self.conv_impl).astype(y.dtype)
    return jax.nn.relu(jnp.concatenate([pooled, y], axis=-1))

  def grouped(self, x: jax.Array, train: bool) -> jax.Array:
    """`__call__` on group-major activations (matmul.to_groups) with this unit's groups:
    x is NHWC for a stride-2 unit (a stage's first) and group-major otherwise; returns
    group-major. No grouped conv pays for a transpose, and the shuffle is fused into the
    depthwise conv's reads."""
    g = self.groups
    if self.compress.conv.groups == 1:  # Stage 2's dense first 1x1 conv
      y = to_groups(self.compress(x, train), g)
    else:
      y = self.compress.grouped(to_groups(x, g) if self.stride == 2 else x, train)
    shuffle = None
    if self.shuffle and self.shuffle_order == "paper":  # read by the DW conv, no copy of its own
      shuffle = functools.partial(regroup, permute=lambda t: channel_shuffle(t, g))
    y = self.depthwise.grouped(y, train, shuffle)
    if self.shuffle and self.shuffle_order == "official":
      y = regroup(y, lambda t: channel_unshuffle(t, g))
    y = self.expand.grouped(y, train)
    if self.se is not None:
      y = self.se.grouped(y, train)
    if self.stride == 1:
      return self._merge(x, y)
    return to_groups(self._merge(x, from_groups(y)), g)


def _group_major_stage(units):
  """A stage whose units run group-major (`ShuffleV1Unit.grouped`); NHWC in and out."""
  def apply(x, train):
    for unit in units:
      # Each unit's output is stored once: left to itself, XLA recomputes the chain of
      # residual adds (and the stage entry's transpose) inside every consumer; measured 1.25x
      # faster inference (BENCHMARKS.md), neutral for training.
      x = jax.lax.optimization_barrier(unit.grouped(x, train))
    return from_groups(x)
  return apply


class ShuffleNetV1(nnx.Module):
  """Conv1 -> MaxPool -> Stage2/3/4 -> global pool -> FC; `stem='small'` for 28-64 px inputs.

  `se=True`: the V1 paper's "with SE" models (Table 5: 2x g=3, 527 MFLOPs): a squeeze-and-
  excitation block on every unit's residual branch before the add/concat. The paper cites SENet
  and gives no details; SENet's block (`se_style='senet'`: reduction 16, sigmoid) reproduces its
  527 MFLOPs exactly (layers.SqueezeExcite; `official` is Megvii's V2+ SELayer)."""

  def __init__(self, *, groups: int = 3, scale: float = 1.0, shuffle: bool = True,
               shallow: bool = False, stem: str = "imagenet", num_classes: int = 1000,
               in_channels: int = 3, shuffle_order: str = "paper", fc_bias: bool = True,
               se: bool = False, se_style: str = "senet", conv_impl: str = "auto", dtype=None,
               rngs: nnx.Rngs):
    if stem not in STEMS:
      raise ValueError(f"stem={stem!r} is not one of {STEMS}")
    if shuffle_order not in SHUFFLE_ORDERS:
      raise ValueError(f"shuffle_order={shuffle_order!r} is not one of {SHUFFLE_ORDERS}")
    conv1, *widths = v1_channels(groups, scale)
    self.channels = (conv1, *widths)
    self.repeats = tuple(r // 2 for r in STAGE_REPEATS) if shallow else STAGE_REPEATS
    self.stem = stem
    common = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
    self.conv1 = ConvBN(in_channels, conv1, 3, stride=2 if stem == "imagenet" else 1, **common)
    stages = []
    in_features = conv1
    for stage_index, (width, repeats) in enumerate(zip(widths, self.repeats)):
      units = []
      for unit_index in range(repeats):
        first = unit_index == 0
        units.append(ShuffleV1Unit(
            in_features, width, stride=2 if first else 1, groups=groups,
            dense_first=first and stage_index == 0, shuffle=shuffle,
            shuffle_order=shuffle_order, se_style=se_style if se else None, **common))
        in_features = width
      stages.append(nnx.List(units))
    self.stages = nnx.List(stages)
    self.fc = Dense(in_features, num_classes, use_bias=fc_bias, rngs=rngs)
    # Group-major stages where grouped convs are matmuls (matmul.to_groups); NHWC elsewhere.
    self.group_major = group_major(conv_impl, groups)

  def named_layers(self) -> list[tuple[str, callable]]:
    """Table-1 rows as (name, fn(x, train)), in order; `__call__` and the summary share them."""
    layers = stem_and_stages(self, _group_major_stage if self.group_major else sequential)
    return layers + pool_and_classify(self)

  def __call__(self, x: jax.Array, train: bool = False, features: bool = False):
    """Logits, or with `features=True` the feature maps by stride (layers.feature_maps)."""
    return apply_layers(self.named_layers(), x, train, features)
