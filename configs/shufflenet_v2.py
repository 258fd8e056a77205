"""ShuffleNet v2 (torchvision layout) on ImageNet with the paper's recipe (or `recipe=official`).

Args: scale=0.5|1.0|1.5|2.0, se=false (squeeze-and-excitation in every unit: the paper's "2x with
SE" row is scale=2.0,se=true,recipe=official), recipe=paper|official, bn_mode=global|per_device,
proxy=false (Fashion-MNIST, minutes on a CPU: configs/common.py), smoke=false.

One machine:
  python launch.py train --config=configs/shufflenet_v2.py:scale=1.0 --workdir=workdirs/v2_1x
TPU pod (the same command on every host; jax.distributed joins them; the workdir on a
filesystem every host sees, e.g. a gcsfuse-mounted bucket):
  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd shufflenet_jax && \
      python launch.py train --config=configs/shufflenet_v2.py:scale=1.0 \
      --workdir=/mnt/bucket/v2_1x"
"""

from configs import common, shufflenet_v1
from shufflenet_jax.models import shufflenet_v2


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, scale=1.0, se=False, **common.RUN_ARGS)
  common.check_choice("scale", args.scale, shufflenet_v2.SCALES)
  c = common.base_config()
  common.imagenet_recipe(c, args.recipe, args.scale)
  c.model = "shufflenet_v2"
  c.model_kwargs = dict(scale=args.scale, stem="imagenet")
  if args.se:
    c.model_kwargs.se = True
  if args.recipe == "official":  # the official code's layout (loads its checkpoints)
    c.model_kwargs.layout = "official"
  common.finish(c, args)
  return c


def v2_or_v1_g3(arg: str | None = None, default: str = "v2"):
  """get_config of sweeps comparing V2 with v1 g=3 (experiments/v2_widths, ablation_recipe):
  model=v2 takes this file's args, model=v1 configs/shufflenet_v1.py's with groups=3."""
  model, rest = common.split_arg(arg, "model", default)
  common.check_choice("model", model, ("v1", "v2"))
  if model == "v1":
    return shufflenet_v1.get_config(f"groups=3,{rest}")
  return get_config(rest)
