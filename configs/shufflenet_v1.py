"""ShuffleNet v1 on ImageNet with the paper's recipe (or `recipe=official`).

Args (`key=value`, comma separated): groups=1|2|3|4|8, scale=0.25..2, shuffle=true|false,
shallow=false, se=false (squeeze-and-excitation in every unit: the paper's "2x with SE" row is
groups=3,scale=2.0,se=true), recipe=paper|official, bn_mode=global|per_device,
proxy=false (Fashion-MNIST, minutes on a CPU: configs/common.py), smoke=false.

One machine:
  python launch.py train --config=configs/shufflenet_v1.py:groups=3,scale=1.0 \
      --workdir=workdirs/v1_g3_1x
TPU pod (the same command on every host; jax.distributed joins them; the workdir on a
filesystem every host sees, e.g. a gcsfuse-mounted bucket):
  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd shufflenet_jax && \
      python launch.py train --config=configs/shufflenet_v1.py:groups=8 --workdir=/mnt/bucket/v1_g8"
"""

from configs import common
from shufflenet_jax.models import shufflenet_v1


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, groups=3, scale=1.0, shuffle=True, shallow=False, se=False,
                          **common.RUN_ARGS)
  shufflenet_v1.v1_channels(args.groups, args.scale)  # validates groups and scale early
  c = common.base_config()
  common.imagenet_recipe(c, args.recipe, args.scale)
  c.model = "shufflenet_v1"
  c.model_kwargs = dict(groups=args.groups, scale=args.scale, shuffle=args.shuffle,
                        shallow=args.shallow, stem="imagenet")
  if args.se:
    c.model_kwargs.se = True
  if args.recipe == "official":  # the official code's layer order (loads its checkpoints)
    c.model_kwargs.shuffle_order = "official"
    c.model_kwargs.fc_bias = False
  common.finish(c, args)
  return c
