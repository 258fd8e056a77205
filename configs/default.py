"""The embedded default: a small ShuffleNet v1 on Fashion-MNIST that trains on a laptop CPU.

ShuffleNet v1 g=3 at 0.25x, shallow (half the units), small-image stem: 4 epochs reach about 90%
test top-1 in about 6.5 minutes on a 2-core CPU (README has the measured figure).

Args: groups=3, scale=0.25 (any v1 value), epochs=4, batch_size=128, data_dir=..., smoke=false.

  python launch.py train --config=configs/default.py --workdir=workdirs/default
(`make train` runs exactly this.) Data: the four IDX files of Fashion-MNIST in `data_dir`
(Debian: `apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist).
"""

from configs import common
from shufflenet_jax.models import shufflenet_v1


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, groups=3, scale=0.25, epochs=4.0, batch_size=128,
                          data_dir="/usr/share/datasets/fashion-mnist", smoke=False)
  shufflenet_v1.v1_channels(args.groups, args.scale)
  c = common.base_config()
  c.model = "shufflenet_v1"
  c.model_kwargs = dict(groups=args.groups, scale=args.scale, shuffle=True, shallow=True,
                        stem="small")
  c.dataset = "fashion_mnist"
  c.data_dir = args.data_dir
  c.num_classes = 10
  c.in_channels = 1
  c.input_size = 28
  c.augment = "small"
  c.batch_size = args.batch_size
  c.eval_batch_size = 500
  c.num_epochs = args.epochs
  c.lr = 0.4
  c.lr_reference_batch = 128
  c.lr_schedule = "cosine"
  c.warmup_steps = 100
  c.weight_decay = 5e-5
  c.label_smoothing = 0.0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.num_workers = 1  # decode in a separate process, overlapping the training step
  if args.smoke:
    common.smoke(c)
  return c
