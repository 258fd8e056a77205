"""Shared pieces of the config files: typed `key=value` args and the papers' training recipes."""

from __future__ import annotations

import ml_collections

# The generic machinery lives in the package (config files load from any directory with it).
from shufflenet_jax.config_files import (  # noqa: F401  used by the config files as common.*
  check_choice,
  convert,
  load_config,
  load_module,
  parse_arg,
  split_arg,
)

RECIPES = ("paper", "official")


def base_config() -> ml_collections.ConfigDict:
  """Every key a training run reads, with neutral defaults; config files override them."""
  c = ml_collections.ConfigDict()
  c.model = "shufflenet_v1"
  c.model_kwargs = ml_collections.ConfigDict()
  c.conv_impl = "auto"             # auto | xla | matmul (layers.py); auto = fastest measured
  c.compute_dtype = "auto"         # auto (bfloat16 on TPU/GPU, float32 on CPU) | float32 |
                                   # bfloat16; params, BN statistics, logits, loss stay float32
  c.bn_mode = "global"             # global (SPMD batch stats) | per_device (paper's per-GPU BN)

  c.dataset = "fashion_mnist"      # fashion_mnist | imagenet2012 | image_folder
  c.data_dir = ""                  # the raw data (IDX files, ImageNet tars, image folder)
  c.tfds_data_dir = "~/tensorflow_datasets"  # where the prepared array_record files go
  c.num_classes = 10
  c.in_channels = 1
  c.input_size = 28
  c.augment = "small"              # small (pad+crop, flip) | imagenet (random resized crop)
  c.crop_area = (0.08, 1.0)        # random-resized-crop area range (imagenet augment)
  c.color_jitter = 0.0
  c.input_format = "rgb_normalized"  # rgb_normalized | bgr_255 (official Megvii input)
  c.eval_resize = 256
  c.num_workers = 0                # grain decoding processes per host (0 = in-process;
                                  # --config.num_workers=auto: from the host's cores)
  c.on_bad_image = "fail"          # fail | skip (image_folder: skip and count unreadable files)
  c.stored_shorter_side = 0        # > 0: train JPEGs stored re-encoded with the shorter side at
  c.stored_quality = 90            # most this, at this JPEG quality (prepared once; cheaper
                                   # decodes: BENCHMARKS.md). 0: stored as they are

  c.batch_size = 128               # global, over all devices of all hosts
  c.eval_batch_size = 256
  c.num_epochs = 10.0
  c.total_steps = 0                # > 0 overrides num_epochs
  c.lr = 0.5                       # at lr_reference_batch; scaled linearly to batch_size
  c.lr_reference_batch = 1024
  c.lr_schedule = "linear"         # linear (to zero, paper) | cosine | constant
  c.warmup_steps = 0
  c.lr_schedule_first = False      # True: update k uses the schedule at k, not k - 1 (the
                                  # official train.py steps its LambdaLR before each update)
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 4e-5            # on conv/FC kernels only
  c.label_smoothing = 0.0
  c.ema_decay = 0.0                # > 0: an exponential moving average of the weights and BN
                                  # statistics per step, evaluated beside them (eval_ema/*)

  c.seed = 0
  c.log_every_steps = 50
  c.eval_every_steps = 0           # 0 = at the end of every epoch
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.profile_steps = ""             # "START:STOP": a jax.profiler trace of those steps in
                                  # WORKDIR/profile (tensorboard --logdir WORKDIR/profile)
  c.resume = "auto"                # auto (resume if the config matches) | force | never |
                                  # any_data_order (also without a data-iterator state)
  return c


def imagenet_recipe(c: ml_collections.ConfigDict, recipe: str, model_scale: float) -> None:
  """The paper's ImageNet recipe, or the official code's (`recipe=official`)."""
  check_choice("recipe", recipe, RECIPES)
  c.dataset = "imagenet2012"
  c.data_dir = "~/imagenet_download"  # ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar
  c.num_classes = 1000
  c.in_channels = 3
  c.input_size = 224
  c.eval_resize = 256
  c.augment = "imagenet"
  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.lr = 0.5
  c.lr_schedule = "linear"
  c.total_steps = 300_000          # 3e5 iterations at batch 1024 (~240 epochs)
  c.momentum = 0.9
  c.weight_decay = 4e-5
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 10_000
  c.log_every_steps = 100
  c.num_workers = 16
  if recipe == "paper":
    # "slightly less aggressive scale augmentation" (tensorpack: 0.49 below 1x).
    c.crop_area = (0.49, 1.0) if model_scale < 1 else (0.08, 1.0)
  else:
    c.crop_area = (0.08, 1.0)
    c.label_smoothing = 0.1
    c.color_jitter = 0.4
    c.lr_schedule_first = True   # its last update has lr 0 (tests/test_recipes.py)
    c.input_format = "bgr_255"


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
# Epochs of a `proxy` run: every sweep run then takes minutes on a 2-core CPU (README).
PROXY_EPOCHS = 2.0
# Args every paper config accepts (configs/shufflenet_v1.py, shufflenet_v2.py, baselines.py).
RUN_ARGS = dict(recipe="paper", bn_mode="global", proxy=False, smoke=False)


def fashion_mnist_recipe(c: ml_collections.ConfigDict, *, epochs: float, batch_size: int = 128,
                         data_dir: str = FASHION_MNIST_DIR) -> None:
  """28x28 grey Fashion-MNIST training: the embedded default and the `proxy` of every config."""
  c.dataset = "fashion_mnist"
  c.data_dir = data_dir
  c.num_classes = 10
  c.in_channels = 1
  c.input_size = 28
  c.eval_resize = 28
  c.augment = "small"
  c.color_jitter = 0.0
  c.input_format = "rgb_normalized"
  c.batch_size = batch_size
  c.eval_batch_size = 500
  c.num_epochs = epochs
  c.total_steps = 0
  c.lr = 0.4
  c.lr_reference_batch = 128
  c.lr_schedule = "cosine"
  c.warmup_steps = 100
  c.weight_decay = 5e-5
  c.label_smoothing = 0.0
  c.log_every_steps = 50
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 500
  c.num_workers = 1  # decode in a separate process, overlapping the training step


def proxy(c: ml_collections.ConfigDict) -> None:
  """The CPU-scale proxy of an ImageNet config: the same model on Fashion-MNIST for PROXY_EPOCHS.

  The model keeps its ImageNet stem (stride 4 before Stage2), so every model's cost shrinks by the
  same factor (224/28)^2 = 64 and the sweep's complexity ratios hold: a 140-MFLOPs model costs
  about 2.2 MFLOPs here. Accuracies are Fashion-MNIST's, not comparable to the paper's numbers;
  only the ordering between runs of one sweep means anything.
  """
  fashion_mnist_recipe(c, epochs=PROXY_EPOCHS)
  c.lr = 0.1  # at batch 128: 0.4 (the default's) diverged early with the 1x models (loss > 8)


def finish(c: ml_collections.ConfigDict, args: ml_collections.ConfigDict) -> None:
  """Applies the RUN_ARGS every paper config shares: bn_mode, then proxy or smoke sizes."""
  check_choice("bn_mode", args.bn_mode, ("global", "per_device"))
  c.bn_mode = args.bn_mode
  if args.proxy:
    proxy(c)
  if args.smoke:
    smoke(c)


def smoke(c: ml_collections.ConfigDict) -> None:
  """Shrinks any config to a CPU-seconds run on generated-size inputs (tests, quick checks)."""
  c.input_size = min(c.input_size, 32)
  c.eval_resize = c.input_size
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_steps = 4
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 2
  c.num_workers = 0
  c.model_kwargs.stem = "small"


