"""ShuffleNet paper, Table 3: channel shuffle on vs off, g = 3 and 8 at 1x / 0.5x / 0.25x.

12 runs, each a configs/shufflenet_v1.py config (args groups, scale, shuffle).
  python launch.py sweep --experiment=experiments/table3_shuffle.py --root=runs/table3 --dry_run
  python launch.py sweep --experiment=experiments/table3_shuffle.py:proxy --root=runs/t3p --local
  python launch.py sweep --experiment=experiments/table3_shuffle.py --root=/mnt/bucket/table3 \
      --tpu=$TPU --zone=$ZONE [--execute]
  python launch.py report --experiment=experiments/table3_shuffle.py --root=runs/table3
"""

from configs.shufflenet_v1 import get_config  # noqa: F401  every run is a shufflenet_v1 config

TITLE = "ShuffleNet paper, Table 3: with / without channel shuffle"
# (scale, groups) -> top-1 error % (shuffle off, shuffle on)
PAPER = {(1.0, 3): (34.5, 32.6), (1.0, 8): (37.6, 32.4),
         (0.5, 3): (45.7, 43.2), (0.5, 8): (48.1, 42.3),
         (0.25, 3): (56.3, 55.0), (0.25, 8): (56.5, 52.7)}


def sweep(add):
  for (scale, groups), errors in PAPER.items():
    for shuffle, paper in zip((False, True), errors):
      add(row=f"ShuffleNet {scale:g}x (g = {groups})", col=f"shuffle {'on' if shuffle else 'off'}",
          family=f"g={groups}, shuffle {'on' if shuffle else 'off'}", paper=paper,
          groups=groups, scale=scale, shuffle=shuffle)
