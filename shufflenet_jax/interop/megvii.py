"""Official Megvii checkpoints (megvii-model/ShuffleNet-Series) -> our models, exactly.

Their channel orders are reproduced by the models' own options rather than by permuting weights:
V1 -> ShuffleNetV1(shuffle_order="official", fc_bias=False): the shuffle after the depthwise conv
with the (n, g) -> (g, n) permutation; V2 -> ShuffleNetV2(layout="official"): even/odd channel
split at block entry, no shuffle after concat, the stride-2 projection branch at the input's
width. Both classifiers have no bias. Their input is BGR 0-255 without normalisation: the configs'
`recipe=official` (input_format=bgr_255) evaluates them that way.
"""

from __future__ import annotations

import numpy as np

from shufflenet_jax.interop import torchvision_v2
from shufflenet_jax.interop.weights import WeightSource, assign_conv_bn, assign_fc
from shufflenet_jax.models import shufflenet_v1, shufflenet_v2


def _features(state_dict) -> int:
  return 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("features."))


def v1_model_kwargs(state_dict: dict[str, np.ndarray]) -> dict:
  """groups, scale, num_classes of an official ShuffleNetV1 checkpoint, from its shapes."""
  if "features.1.branch_main_1.0.weight" not in state_dict:
    raise ValueError("not an official ShuffleNetV1 checkpoint (no features.1.branch_main_1)")
  conv1 = state_dict["first_conv.0.weight"].shape[0]
  stage2 = conv1 + state_dict["features.0.branch_main_2.0.weight"].shape[0]
  unit = state_dict["features.1.branch_main_1.0.weight"]  # (mid, in / groups, 1, 1)
  groups = stage2 // unit.shape[1]
  matches = [scale for (g, scale), channels in shufflenet_v1.OFFICIAL_CHANNELS.items()
             if g == groups and channels[:2] == (conv1, stage2)]
  if not matches:
    raise ValueError(f"conv1 {conv1}, stage2 {stage2}, groups {groups} match no official "
                     f"ShuffleNetV1 width {sorted(shufflenet_v1.OFFICIAL_CHANNELS)}")
  return {"groups": groups, "scale": matches[0],
          "num_classes": int(state_dict["classifier.0.weight"].shape[0]),
          "in_channels": int(state_dict["first_conv.0.weight"].shape[1])}


def v2_model_kwargs(state_dict: dict[str, np.ndarray]) -> dict:
  if "features.0.branch_proj.2.weight" not in state_dict:
    raise ValueError("not an official ShuffleNetV2 checkpoint (no features.0.branch_proj)")
  stage2 = (state_dict["features.0.branch_proj.2.weight"].shape[0]
            + state_dict["features.0.branch_main.5.weight"].shape[0])
  scales = [s for s, channels in shufflenet_v2.CHANNELS.items() if channels[1] == stage2]
  if not scales:
    raise ValueError(f"stage2 width {stage2} matches no ShuffleNetV2 width")
  return {"scale": scales[0], "num_classes": int(state_dict["classifier.0.weight"].shape[0]),
          "in_channels": int(state_dict["first_conv.0.weight"].shape[1])}


def _units(model):
  return [unit for stage in model.stages for unit in stage]


def load_v1_into(model: shufflenet_v1.ShuffleNetV1, state_dict: dict[str, np.ndarray]) -> None:
  units = _units(model)
  if any(u.shuffle and u.shuffle_order != "official" for u in units):
    raise ValueError("official V1 weights need shuffle_order='official' (config recipe=official)")
  source = WeightSource(state_dict)
  assign_conv_bn(model.conv1, source, "first_conv.0", "first_conv.1")
  for index, unit in enumerate(units):
    prefix = f"features.{index}"
    assign_conv_bn(unit.compress, source, f"{prefix}.branch_main_1.0",
                   f"{prefix}.branch_main_1.1")
    assign_conv_bn(unit.depthwise, source, f"{prefix}.branch_main_1.3",
                   f"{prefix}.branch_main_1.4")
    assign_conv_bn(unit.expand, source, f"{prefix}.branch_main_2.0", f"{prefix}.branch_main_2.1")
  assign_fc(model.fc, source, "classifier.0", bias=False)
  source.check_all_used()


def load_v2_into(model: shufflenet_v2.ShuffleNetV2, state_dict: dict[str, np.ndarray]) -> None:
  units = _units(model)
  if units[0].layout != "official":
    raise ValueError("official V2 weights need layout='official' (config recipe=official)")
  source = WeightSource(state_dict)
  assign_conv_bn(model.conv1, source, "first_conv.0", "first_conv.1")
  for index, unit in enumerate(units):
    torchvision_v2.assign_unit(unit, source, f"features.{index}.branch_proj",
                               f"features.{index}.branch_main")
  assign_conv_bn(model.conv5, source, "conv_last.0", "conv_last.1")
  assign_fc(model.fc, source, "classifier.0", bias=False)
  source.check_all_used()
