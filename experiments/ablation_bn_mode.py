"""Ablation: BatchNorm statistics over the global batch vs per device (the paper's per-GPU BN).

The paper trained with batch 1024 on 4 GPUs, so its BN saw 256 images per device; `per_device`
reproduces that on any mesh (shufflenet_jax/train.py). The paper's numbers belong to per_device.
On one device (e.g. the CPU proxy) the two modes are the same computation.
  python launch.py sweep --experiment=experiments/ablation_bn_mode.py --root=runs/bn --dry_run
  python launch.py report --experiment=experiments/ablation_bn_mode.py --root=runs/bn
"""

from configs.shufflenet_v1 import get_config  # noqa: F401  every run is a shufflenet_v1 config

TITLE = "Ablation: BN statistics over the global batch vs per device"
PAPER = {(1.0, 3): 32.6, (0.5, 3): 43.2, (1.0, 8): 32.4}  # Table 2, per-GPU BN


def sweep(add):
  for (scale, groups), paper in PAPER.items():
    for bn_mode in ("global", "per_device"):
      add(row=f"ShuffleNet {scale:g}x (g = {groups})", col=f"bn_mode={bn_mode}",
          family=f"bn_mode={bn_mode}", paper=paper if bn_mode == "per_device" else None,
          groups=groups, scale=scale, bn_mode=bn_mode)
