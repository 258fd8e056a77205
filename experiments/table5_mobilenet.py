"""ShuffleNet paper, Table 5: ShuffleNet vs MobileNet v1 at matched complexity.

MobileNet v1 at width 1.0 / 0.75 / 0.5 / 0.25 (configs/baselines.py) against ShuffleNet 2x g3,
1.5x g3, 1x g8, 0.5x g4, and 0.5x g3 shallow (half the units per stage).
Run args: model=mobilenet (with width) or model=shufflenet (with groups, scale, shallow).
  python launch.py sweep --experiment=experiments/table5_mobilenet.py --root=runs/t5 --dry_run
  python launch.py sweep --experiment=experiments/table5_mobilenet.py:proxy --root=runs/t5p --local
  python launch.py report --experiment=experiments/table5_mobilenet.py --root=runs/t5
"""

from configs.baselines import shufflenet_or_baseline as get_config  # noqa: F401

TITLE = "ShuffleNet paper, Table 5: ShuffleNet vs MobileNet v1"
# row -> (MobileNet width, its error %), (ShuffleNet scale, groups, its error %)
PAPER = {"~550 MFLOPs": ((1.0, 29.4), (2.0, 3, 26.3)),
         "~300 MFLOPs": ((0.75, 31.6), (1.5, 3, 28.5)),
         "~150 MFLOPs": ((0.5, 36.3), (1.0, 8, 32.4)),
         "~40 MFLOPs": ((0.25, 49.4), (0.5, 4, 41.6))}
SHALLOW = ("~40 MFLOPs", 0.5, 3, 42.8)  # 0.5x g3 with half the units per stage: 40 MFLOPs


def sweep(add):
  for row, ((width, mobilenet_error), (scale, groups, error)) in PAPER.items():
    add(row=row, col="MobileNet v1", family="MobileNet v1", paper=mobilenet_error,
        model="mobilenet", width=width)
    add(row=row, col="ShuffleNet", family="ShuffleNet", paper=error, model="shufflenet",
        groups=groups, scale=scale)
  row, scale, groups, error = SHALLOW
  add(row=row, col="ShuffleNet (shallow)", family="ShuffleNet (shallow)", paper=error,
      model="shufflenet", groups=groups, scale=scale, shallow=True)
