"""ShuffleNet v2 (Ma et al., ECCV 2018) in torchvision's layout (parameter counts match exactly) or
the official Megvii code's (`layout="official"`, to load its checkpoints).

torchvision: a stride-1 unit splits channels into halves, transforms the second, concats and
shuffles with 2 groups; a stride-2 unit runs both branches (out/2 channels each) on the whole
input, concats, shuffles. The classifier has a bias.
official: a stride-1 unit splits even/odd channels (the shuffle happens at entry), concats without
a shuffle; a stride-2 unit's projection branch keeps the input's width and the main branch makes
out - in channels; no shuffle after concat; the classifier has no bias.
All convs are bias-free in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from shufflenet_jax.models.layers import (
    ConvBN,
    Dense,
    SqueezeExcite,
    apply_layers,
    channel_shuffle,
    pool_and_classify,
    sequential,
    stem_and_stages,
)

# [conv1, stage2, stage3, stage4, conv5] per width multiplier (paper Table 5 / torchvision).
CHANNELS = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
SCALES = tuple(CHANNELS)
STAGE_REPEATS = (4, 8, 4)
STEMS = ("imagenet", "small")
LAYOUTS = ("torchvision", "official")


class ShuffleV2Unit(nnx.Module):
  """torchvision's InvertedResidual: chunk halves (stride 1) or two branches (stride 2), shuffle."""

  def __init__(self, in_features: int, out_features: int, *, stride: int, conv_impl: str,
               dtype, rngs: nnx.Rngs, layout: str = "torchvision", se_style: str | None = None):
    branch = out_features // 2
    if stride == 1 and in_features != 2 * branch:
      raise ValueError(f"stride-1 unit needs in == out channels, got {in_features}->{out_features}")
    common = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
    self.stride = stride
    self.layout = layout
    official = layout == "official"
    # (branch1 output, branch2 output): official stride-2 units keep the input's width in branch1.
    proj_out, main_out = (in_features, out_features - in_features) if official and stride > 1 \
        else (branch, branch)
    if stride > 1:
      self.branch1 = nnx.List([
          ConvBN(in_features, in_features, 3, stride=stride, groups=in_features, relu=False,
                 **common),
          ConvBN(in_features, proj_out, 1, **common),
      ])
    else:
      self.branch1 = None
    self.branch2 = nnx.List([
        ConvBN(in_features if stride > 1 else branch, branch, 1, **common),
        ConvBN(branch, branch, 3, stride=stride, groups=branch, relu=False, **common),
        ConvBN(branch, main_out, 1, **common),
    ])
    # SE on the main branch's output, before the concat (Megvii's ShuffleNetV2+ / V2.Large).
    self.se = None if se_style is None else SqueezeExcite(main_out, style=se_style, **common)

  def _main(self, x: jax.Array, train: bool) -> jax.Array:
    y = sequential(self.branch2)(x, train)
    return y if self.se is None else self.se(y, train)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    official = self.layout == "official"
    if self.stride == 1:
      if official:  # Megvii: even channels pass through, odd ones enter the branch
        x1, x2 = x[..., 0::2], x[..., 1::2]
      else:
        x1, x2 = jnp.split(x, 2, axis=-1)
      out = jnp.concatenate([x1, self._main(x2, train)], axis=-1)
    else:
      out = jnp.concatenate([sequential(self.branch1)(x, train),
                             self._main(x, train)], axis=-1)
    return out if official else channel_shuffle(out, 2)


class ShuffleNetV2(nnx.Module):
  """Conv1 -> MaxPool -> Stage2/3/4 -> Conv5 -> global pool -> FC (with bias).

  `se=True`: the V2 paper's "with SE" models (Table 8: 2x, 597 MFLOPs): a squeeze-and-excitation
  block on every unit's main branch before the concat, as Megvii's own SE models (V2+, V2.Large)
  place it, with their SELayer by default (`se_style='official'`: reduction 4, BN, hard
  sigmoid). The paper gives no details; counted, 2x official comes to 591.5M (its SE layers'
  MACs are small; the paper's 597M may count the pooling and the gating products too)."""

  def __init__(self, *, scale: float = 1.0, stem: str = "imagenet", num_classes: int = 1000,
               in_channels: int = 3, layout: str = "torchvision", se: bool = False,
               se_style: str = "official", conv_impl: str = "auto", dtype=None,
               rngs: nnx.Rngs):
    if scale not in CHANNELS:
      raise ValueError(f"scale={scale!r} is not one of {SCALES} for shufflenet_v2")
    if stem not in STEMS:
      raise ValueError(f"stem={stem!r} is not one of {STEMS}")
    if layout not in LAYOUTS:
      raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    conv1, *widths, conv5 = CHANNELS[scale]
    self.channels = CHANNELS[scale]
    self.repeats = STAGE_REPEATS
    self.stem = stem
    common = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
    self.conv1 = ConvBN(in_channels, conv1, 3, stride=2 if stem == "imagenet" else 1, **common)
    stages = []
    in_features = conv1
    for width, repeats in zip(widths, STAGE_REPEATS):
      units = []
      for unit_index in range(repeats):
        units.append(ShuffleV2Unit(in_features, width, stride=2 if unit_index == 0 else 1,
                                   layout=layout, se_style=se_style if se else None,
                                   **common))
        in_features = width
      stages.append(nnx.List(units))
    self.stages = nnx.List(stages)
    self.conv5 = ConvBN(in_features, conv5, 1, **common)
    self.fc = Dense(conv5, num_classes, use_bias=layout == "torchvision", rngs=rngs)

  def named_layers(self) -> list[tuple[str, callable]]:
    """Table-5 rows as (name, fn(x, train)), in order; `__call__` and the summary share them."""
    layers = stem_and_stages(self)
    layers.append(("conv5", self.conv5))
    return layers + pool_and_classify(self)

  def __call__(self, x: jax.Array, train: bool = False, features: bool = False):
    """Logits, or with `features=True` the feature maps by stride (layers.feature_maps)."""
    return apply_layers(self.named_layers(), x, train, features)
