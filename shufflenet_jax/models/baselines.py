"""The papers' comparison models (ShuffleNet paper, Tables 4 and 5).

Table 4 models keep ShuffleNet v1's macro layout (3x3/2 conv1 with 24 channels, 3x3/2 max pool,
Stage2/3/4 with 4/8/4 units whose first unit has stride 2, global pool, FC) and swap the units:

  vgg       two 3x3 convs, each with BN and ReLU
  resnet    bottleneck 1:4 (1x1 -> 3x3 -> 1x1, bottleneck = out/4), projection shortcut on stride 2
  resnext   cardinality 16, bottleneck 1:2: the 3x3 conv has 16 groups and out/2 channels
            rounded up to a multiple of 16 (so small stages keep the cardinality)
  xception  ShuffleNet v1 with g=1 and no shuffle (built by `xception_like`)

Widths: stage widths are (w, 2w, 4w). For each target complexity (140 / 38 / 13 MFLOPs, VGG at
140 only) `TABLE4_WIDTHS` holds the Stage2 width w found by counting MFLOPs of the model for every
multiple of 4 and keeping
the closest. The paper states Stage4 widths only at 38 MFLOPs (ResNet 192, ResNeXt 192, VGG 50);
ours there are ResNet 176 and ResNeXt 144 (its rounded-up bottlenecks cost more), since the
paper's other unit details are not published. `tests/test_baselines.py` recounts every entry.

MobileNet v1 (Table 5) is the standard 28-layer network at width 0.25/0.5/0.75/1.0, 224x224:
41 / 149 / 325 / 569 MFLOPs as published.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from shufflenet_jax.models.layers import (
    ConvBN,
    Dense,
    apply_layers,
    pool_and_classify,
    stem_and_stages,
)
from shufflenet_jax.models.shufflenet_v1 import STAGE_REPEATS, STEMS

UNITS = ("vgg", "resnet", "resnext")
CARDINALITY = 16
# (unit, target MFLOPs) -> Stage2 width (see the module docstring for how they were found).
TABLE4_WIDTHS = {
    ("vgg", 140): 24,                                           # 134.2 MFLOPs
    ("resnet", 140): 96, ("resnet", 38): 44, ("resnet", 13): 16,  # 144.0 / 37.7 / 12.5
    ("resnext", 140): 88, ("resnext", 38): 36, ("resnext", 13): 12,  # 142.2 / 39.8 / 13.5
}
# Xception-like = ShuffleNet v1 g=1 without shuffle at the scale with that complexity
# (143.1 / 38.5 / 13.4 MFLOPs; 0.25x would give 11.0 under our width rule).
XCEPTION_SCALES = {140: 1.0, 38: 0.5, 13: 0.28}
MOBILENET_WIDTHS = (0.25, 0.5, 0.75, 1.0)


class VGGUnit(nnx.Module):
  def __init__(self, cin, cout, *, stride, conv_impl, dtype, rngs):
    common = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
    self.conv_a = ConvBN(cin, cout, 3, stride=stride, **common)
    self.conv_b = ConvBN(cout, cout, 3, **common)

  def __call__(self, x, train):
    return self.conv_b(self.conv_a(x, train), train)


class ResNetUnit(nnx.Module):
  """Bottleneck (1:4 for ResNet; 1:2 with a grouped 3x3 for ResNeXt) with a residual add."""

  def __init__(self, cin, cout, *, stride, mid, groups, conv_impl, dtype, rngs):
    common = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
    self.reduce = ConvBN(cin, mid, 1, **common)
    self.spatial = ConvBN(mid, mid, 3, stride=stride, groups=groups, **common)
    self.expand = ConvBN(mid, cout, 1, relu=False, **common)
    needs_projection = stride != 1 or cin != cout
    self.shortcut = (ConvBN(cin, cout, 1, stride=stride, relu=False, **common)
                     if needs_projection else None)

  def __call__(self, x, train):
    y = self.expand(self.spatial(self.reduce(x, train), train), train)
    shortcut = x if self.shortcut is None else self.shortcut(x, train)
    return jax.nn.relu(y + shortcut.astype(y.dtype))


class Table4Baseline(nnx.Module):
  """ShuffleNet v1's macro layout with `unit` in Stage2/3/4 (Stage2 width `width`)."""

  def __init__(self, *, unit: str = "resnet", width: int = 104, stem: str = "imagenet",
               num_classes: int = 1000, in_channels: int = 3, conv_impl: str = "auto",
               dtype=None, rngs: nnx.Rngs):
    if unit not in UNITS:
      raise ValueError(f"unit={unit!r} is not one of {UNITS} (xception: use xception_like)")
    if stem not in STEMS:
      raise ValueError(f"stem={stem!r} is not one of {STEMS}")
    if width <= 0 or width % 4:
      raise ValueError(f"width={width} must be a positive multiple of 4")
    common = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
    self.stem, self.repeats, self.unit = stem, STAGE_REPEATS, unit
    self.conv1 = ConvBN(in_channels, 24, 3, stride=2 if stem == "imagenet" else 1, **common)
    stages, cin = [], 24
    for stage_index, repeats in enumerate(STAGE_REPEATS):
      cout = width * 2 ** stage_index
      units = []
      for i in range(repeats):
        stride = 2 if i == 0 else 1
        if unit == "vgg":
          units.append(VGGUnit(cin, cout, stride=stride, **common))
        else:
          if unit == "resnet":
            mid, groups = cout // 4, 1
          else:  # 1:2, rounded up to whole groups of the cardinality
            mid = CARDINALITY * math.ceil(cout / 2 / CARDINALITY)
            groups = CARDINALITY
          units.append(ResNetUnit(cin, cout, stride=stride, mid=mid, groups=groups, **common))
        cin = cout
      stages.append(nnx.List(units))
    self.stages = nnx.List(stages)
    self.fc = Dense(cin, num_classes, rngs=rngs)

  def named_layers(self):
    return stem_and_stages(self) + pool_and_classify(self)

  def __call__(self, x: jax.Array, train: bool = False, features: bool = False):
    """Logits, or with `features=True` the feature maps by stride (layers.feature_maps)."""
    return apply_layers(self.named_layers(), x, train, features)


class MobileNetV1(nnx.Module):
  """MobileNet v1 (Howard et al. 2017): 3x3/2 conv, 13 depthwise-separable blocks, pool, FC."""

  # (output channels at width 1.0, stride) of the 13 depthwise-separable blocks.
  BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
            (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

  def __init__(self, *, width: float = 1.0, stem: str = "imagenet", num_classes: int = 1000,
               in_channels: int = 3, conv_impl: str = "auto", dtype=None, rngs: nnx.Rngs):
    if width not in MOBILENET_WIDTHS:
      raise ValueError(f"width={width!r} is not one of {MOBILENET_WIDTHS}")
    common = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
    self.stem, self.repeats = stem, ()  # no stages: 13 blocks
    channels = int(32 * width)
    self.conv1 = ConvBN(in_channels, channels, 3, stride=2 if stem == "imagenet" else 1,
                        **common)
    blocks = []
    for cout, stride in self.BLOCKS:
      cout = int(cout * width)
      blocks.append(nnx.List([ConvBN(channels, channels, 3, stride=stride, groups=channels,
                                     **common),
                              ConvBN(channels, cout, 1, **common)]))
      channels = cout
    self.blocks = nnx.List(blocks)
    self.fc = Dense(channels, num_classes, rngs=rngs)

  def named_layers(self):
    layers = [("conv1", self.conv1)]
    for index, (depthwise, pointwise) in enumerate(self.blocks):
      layers.append((f"block{index + 1}",
                     lambda x, train, d=depthwise, p=pointwise: p(d(x, train), train)))
    return layers + pool_and_classify(self)

  def __call__(self, x: jax.Array, train: bool = False, features: bool = False):
    """Logits, or with `features=True` the feature maps by stride (layers.feature_maps)."""
    return apply_layers(self.named_layers(), x, train, features)


def xception_like(target_mflops: int) -> dict:
  """get_model kwargs of the Xception-like baseline at a Table 4 complexity."""
  if target_mflops not in XCEPTION_SCALES:
    raise ValueError(f"target_mflops={target_mflops} is not one of {tuple(XCEPTION_SCALES)}")
  return dict(groups=1, scale=XCEPTION_SCALES[target_mflops], shuffle=False)

