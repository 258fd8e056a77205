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
                          data_dir=common.FASHION_MNIST_DIR, smoke=False)
  shufflenet_v1.v1_channels(args.groups, args.scale)
  c = common.base_config()
  c.model = "shufflenet_v1"
  c.model_kwargs = dict(groups=args.groups, scale=args.scale, shuffle=True, shallow=True,
                        stem="small")
  common.fashion_mnist_recipe(c, epochs=args.epochs, batch_size=args.batch_size,
                              data_dir=args.data_dir)
  if args.smoke:
    common.smoke(c)
  return c
