"""ShuffleNet V2 at 0.5x / 1x / 1.5x / 2x beside ShuffleNet v1 g=3 at the same scales.

V2 errors are the official code's retrained ImageNet results (Megvii ShuffleNet-Series README);
v1's are the v1 paper's (Tables 2 and 5). Run args: model=v1|v2, scale.
  python launch.py sweep --experiment=experiments/v2_widths.py --root=runs/v2 --dry_run
  python launch.py sweep --experiment=experiments/v2_widths.py:proxy --root=runs/v2p --local
  python launch.py report --experiment=experiments/v2_widths.py --root=runs/v2
"""

from configs.shufflenet_v2 import v2_or_v1_g3 as get_config  # noqa: F401

TITLE = "ShuffleNet V2 widths (official retrained results) vs ShuffleNet v1 g=3"
# scale -> (V2 error %, v1 g=3 error %)
PAPER = {0.5: (38.9, 43.2), 1.0: (30.6, 32.6), 1.5: (27.4, 28.5), 2.0: (25.0, 26.3)}


def sweep(add):
  for scale, (v2_error, v1_error) in PAPER.items():
    add(row=f"{scale:g}x", col="ShuffleNet V2", family="ShuffleNet V2", paper=v2_error,
        model="v2", scale=scale)
    add(row=f"{scale:g}x", col="ShuffleNet v1 (g = 3)", family="ShuffleNet v1 g=3",
        paper=v1_error, model="v1", scale=scale)
