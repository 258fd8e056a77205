"""The ShuffleNet paper's comparison models on ImageNet, with the paper's recipe.

Args: model=vgg|resnet|resnext|xception (Table 4, at mflops=140|38|13; vgg at 140 only) or
model=mobilenet (Table 5, at width=0.25|0.5|0.75|1.0); recipe=paper|official,
bn_mode=global|per_device, proxy=false (Fashion-MNIST, minutes on a CPU), smoke=false.
How each width was chosen: shufflenet_jax/models/baselines.py.

One machine:
  python launch.py train --config=configs/baselines.py:model=resnet,mflops=38 \
      --workdir=workdirs/resnet_38
TPU pod (the same command on every host, workdir on a filesystem every host sees):
  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd shufflenet_jax && \
      python launch.py train --config=configs/baselines.py:model=mobilenet,width=0.5 \
      --workdir=/mnt/bucket/mobilenet_0.5"
"""

from configs import common, shufflenet_v1
from shufflenet_jax.models import baselines

MODELS = ("vgg", "resnet", "resnext", "xception", "mobilenet")


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, model="resnet", mflops=140, width=1.0, **common.RUN_ARGS)
  common.check_choice("model", args.model, MODELS)
  c = common.base_config()
  if args.model == "mobilenet":
    common.check_choice("width", args.width, baselines.MOBILENET_WIDTHS)
    c.model = "mobilenet_v1"
    c.model_kwargs = dict(width=args.width, stem="imagenet")
    scale = args.width
  elif args.model == "xception":
    c.model = "shufflenet_v1"
    c.model_kwargs = dict(**baselines.xception_like(args.mflops), stem="imagenet")
    scale = c.model_kwargs.scale
  else:
    key = (args.model, args.mflops)
    if key not in baselines.TABLE4_WIDTHS:
      valid = sorted(m for u, m in baselines.TABLE4_WIDTHS if u == args.model)
      raise ValueError(f"config arg mflops={args.mflops} is not one of {valid} for "
                       f"model={args.model}")
    c.model = "table4_baseline"
    c.model_kwargs = dict(unit=args.model, width=baselines.TABLE4_WIDTHS[key], stem="imagenet")
    scale = {140: 1.0, 38: 0.5, 13: 0.25}[args.mflops]  # for the recipe's crop area
  common.imagenet_recipe(c, args.recipe, scale)
  common.finish(c, args)
  return c


def shufflenet_or_baseline(arg: str | None = None):
  """get_config of sweeps comparing ShuffleNet v1 with these models (experiments/table4, table5):
  model=shufflenet takes configs/shufflenet_v1.py's args, any other model this file's."""
  model, rest = common.split_arg(arg, "model", "shufflenet")
  if model == "shufflenet":
    return shufflenet_v1.get_config(rest)
  return get_config(f"model={model},{rest}")
