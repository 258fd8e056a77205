"""ShuffleNet paper, Table 2: group count g = 1..8 at 1x / 0.5x / 0.25x (ImageNet top-1 error).

15 runs, each a configs/shufflenet_v1.py config (args groups, scale; plus recipe, bn_mode, proxy).
  python launch.py sweep --experiment=experiments/table2_groups.py --root=runs/table2 --dry_run
  python launch.py sweep --experiment=experiments/table2_groups.py:proxy --root=runs/t2p --local
  python launch.py sweep --experiment=experiments/table2_groups.py --root=/mnt/bucket/table2 \
      --tpu=$TPU --zone=$ZONE [--execute]
  python launch.py report --experiment=experiments/table2_groups.py --root=runs/table2
"""

from configs.shufflenet_v1 import get_config  # noqa: F401  every run is a shufflenet_v1 config
from shufflenet_jax.models.shufflenet_v1 import GROUPS

TITLE = "ShuffleNet paper, Table 2: classification error vs number of groups g"
# scale -> (complexity the paper names, top-1 error % for g = 1, 2, 3, 4, 8)
PAPER = {1.0: (140, (33.6, 32.7, 32.6, 32.8, 32.4)),
         0.5: (38, (45.1, 44.4, 43.2, 41.6, 42.3)),
         0.25: (13, (57.1, 56.8, 55.0, 54.2, 52.7))}


def sweep(add):
  for scale, (mflops, errors) in PAPER.items():
    for groups, paper in zip(GROUPS, errors):
      add(row=f"ShuffleNet {scale:g}x ({mflops} MFLOPs)", col=f"g = {groups}",
          family=f"ShuffleNet g={groups}", paper=paper, groups=groups, scale=scale)
