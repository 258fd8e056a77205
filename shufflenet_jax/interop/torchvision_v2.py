"""torchvision's ShuffleNetV2 state_dict -> our ShuffleNetV2 (same layout, so a 1:1 copy).

Kernels go from PyTorch's (out, in/groups, kh, kw) to our (kh, kw, in/groups, out); the
classifier's (out, in) weight is transposed; BN's weight/bias/running_mean/running_var become
scale/bias/mean/var. Every key is used exactly once and every shape is checked.
"""

from __future__ import annotations

import numpy as np

from shufflenet_jax.interop.weights import WeightSource, assign_conv_bn, assign_fc
from shufflenet_jax.models import shufflenet_v2


def model_kwargs(state_dict: dict[str, np.ndarray]) -> dict:
  """scale and num_classes of a torchvision ShuffleNetV2 state_dict, from its shapes."""
  if "stage2.0.branch1.2.weight" not in state_dict or "fc.weight" not in state_dict:
    raise ValueError("not a torchvision ShuffleNetV2 state_dict (no stage2.0.branch1.2.weight "
                     "or fc.weight)")
  stage2 = 2 * state_dict["stage2.0.branch1.2.weight"].shape[0]
  scales = [s for s, channels in shufflenet_v2.CHANNELS.items() if channels[1] == stage2]
  if not scales:
    raise ValueError(f"stage2 width {stage2} matches no ShuffleNetV2 width "
                     f"{ {s: c[1] for s, c in shufflenet_v2.CHANNELS.items()} }")
  return {"scale": scales[0], "num_classes": int(state_dict["fc.weight"].shape[0]),
          "in_channels": int(state_dict["conv1.0.weight"].shape[1])}


def assign_unit(unit, source: WeightSource, branch1: str, branch2: str) -> None:
  """One V2 unit from nn.Sequential branches named `branch1` (stride 2 only: dw conv, BN, 1x1
  conv, BN, ReLU) and `branch2` (1x1, BN, ReLU, dw, BN, 1x1, BN, ReLU): torchvision's and the
  official code's units index their layers alike."""
  if unit.branch1 is not None:
    for layer, (conv, bn) in zip(unit.branch1, ((0, 1), (2, 3))):
      assign_conv_bn(layer, source, f"{branch1}.{conv}", f"{branch1}.{bn}")
  for layer, (conv, bn) in zip(unit.branch2, ((0, 1), (3, 4), (5, 6))):
    assign_conv_bn(layer, source, f"{branch2}.{conv}", f"{branch2}.{bn}")


def load_into(model: shufflenet_v2.ShuffleNetV2, state_dict: dict[str, np.ndarray]) -> None:
  """Copies every torchvision weight into `model` (built with the matching scale)."""
  source = WeightSource(state_dict)
  assign_conv_bn(model.conv1, source, "conv1.0", "conv1.1")
  for s, stage in enumerate(model.stages):
    for u, unit in enumerate(stage):
      assign_unit(unit, source, f"stage{s + 2}.{u}.branch1", f"stage{s + 2}.{u}.branch2")
  assign_conv_bn(model.conv5, source, "conv5.0", "conv5.1")
  assign_fc(model.fc, source)
  source.check_all_used()
