"""ShuffleNet paper, Table 4: other units in the same macro layout at 140 / 38 / 13 MFLOPs.

VGG-like, ResNet, Xception-like and ResNeXt units (configs/baselines.py; widths chosen by counted
complexity, shufflenet_jax/models/baselines.py) against ShuffleNet 1x g8, 0.5x g4 and 0.25x g8.
Run args: model=shufflenet (with groups, scale) or model=vgg|resnet|xception|resnext (with mflops).
  python launch.py sweep --experiment=experiments/table4_structures.py --root=runs/t4 --dry_run
  python launch.py sweep --experiment=experiments/table4_structures.py:proxy --root=runs/t4p --local
  python launch.py report --experiment=experiments/table4_structures.py --root=runs/t4
"""

from configs.baselines import shufflenet_or_baseline as get_config  # noqa: F401

TITLE = "ShuffleNet paper, Table 4: classification error vs other structures"
UNIT_NAMES = {"vgg": "VGG-like", "resnet": "ResNet", "xception": "Xception-like",
              "resnext": "ResNeXt"}
# complexity -> {unit: top-1 error %}, and the ShuffleNet of that complexity with its error.
PAPER = {140: {"vgg": 50.7, "resnet": 37.3, "xception": 33.6, "resnext": 33.3},
         38: {"resnet": 48.8, "xception": 45.1, "resnext": 46.0},
         13: {"resnet": 63.7, "xception": 57.1, "resnext": 65.2}}
SHUFFLENETS = {140: (1.0, 8, 32.4), 38: (0.5, 4, 41.6), 13: (0.25, 8, 52.7)}


def sweep(add):
  for mflops, errors in PAPER.items():
    row = f"{mflops} MFLOPs"
    for unit, paper in errors.items():
      add(row=row, col=UNIT_NAMES[unit], family=UNIT_NAMES[unit], paper=paper, model=unit,
          mflops=mflops)
    scale, groups, paper = SHUFFLENETS[mflops]
    add(row=row, col="ShuffleNet", family="ShuffleNet", paper=paper, model="shufflenet",
        groups=groups, scale=scale)
