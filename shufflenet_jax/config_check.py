"""Every value a run reads, checked before the run touches anything: one table of keys and rules.

`validate(config)` raises one ValueError naming the key, the bad value and what is valid. The
choices come from the modules that read each key, so the table cannot drift from the code.
(Batch sizes must also divide the devices: parallel.check_batch_size, once the mesh exists.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from shufflenet_jax import optim, profiling
from shufflenet_jax.data import image_folder, pipeline, preprocess
from shufflenet_jax.models import layers

BN_MODES = ("global", "per_device")
# auto: resume this run; force: even with a different config; never: refuse a workdir with
# checkpoints; any_data_order: also from a checkpoint whose data-iterator state is missing.
RESUME_MODES = ("auto", "force", "never", "any_data_order")

CHOICES: dict[str, tuple] = {
    "augment": pipeline.AUGMENTS,
    "input_format": preprocess.INPUT_FORMATS,
    "on_bad_image": image_folder.BAD_IMAGE_POLICIES,
    "lr_schedule": optim.SCHEDULES,
    "dataset": pipeline.DATASETS,
    "bn_mode": BN_MODES,
    "compute_dtype": layers.COMPUTE_DTYPES,
    "resume": RESUME_MODES,
    "conv_impl": layers.CONV_IMPLS,
}


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _crop_area(value) -> bool:
  return (isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_number, value))
          and 0 < value[0] <= value[1] <= 1)


def _profile_steps(value) -> bool:
  try:
    profiling.parse_profile_steps(value)
  except (ValueError, TypeError):
    return False
  return True


# key: (rule, what a valid value is)
RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "batch_size": (lambda v: _integer(v) and v > 0, "an integer > 0"),
    "eval_batch_size": (lambda v: _integer(v) and v > 0, "an integer > 0"),
    "num_epochs": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "total_steps": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: use num_epochs)"),
    "lr": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "lr_reference_batch": (lambda v: _integer(v) and v > 0, "an integer > 0"),
    "warmup_steps": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "label_smoothing": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "ema_decay": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1) (0: no EMA)"),
    "color_jitter": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "crop_area": (_crop_area, "(low, high) with 0 < low <= high <= 1"),
    "input_size": (lambda v: _integer(v) and v > 0, "an integer > 0"),
    "stored_shorter_side": (lambda v: _integer(v) and v >= 0,
                            "an integer >= 0 (0: train images stored as they are)"),
    "stored_quality": (lambda v: _integer(v) and 1 <= v <= 100, "an integer in [1, 100]"),
    "eval_resize": (lambda v: _integer(v) and v > 0, "an integer > 0"),
    "num_classes": (lambda v: _integer(v) and v > 0, "an integer > 0"),
    "in_channels": (lambda v: _integer(v) and v > 0, "an integer > 0"),
    "num_workers": (lambda v: _integer(v) and v >= pipeline.AUTO_WORKERS,
                    "an integer >= 0 (0: decode in-process) or auto (-1: from the host's cores)"),
    "seed": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "log_every_steps": (lambda v: _integer(v) and v > 0, "an integer > 0"),
    "eval_every_steps": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: every epoch)"),
    "checkpoint_every_steps": (lambda v: _integer(v) and v > 0, "an integer > 0"),
    "keep_checkpoints": (lambda v: _integer(v) and v > 0, "an integer > 0"),
    "profile_steps": (_profile_steps,
                      "'' (off) or 'START:STOP' with 1 <= START <= STOP, e.g. '100:110'"),
}


def validate(config) -> None:
  """Raises ValueError for the first key of the table whose value is not valid."""
  for key, choices in CHOICES.items():
    if key in config and config[key] not in choices:
      raise ValueError(f"config {key}={config[key]!r} is not one of {choices}")
  for key, (rule, valid) in RULES.items():
    if key in config and not rule(config[key]):
      raise ValueError(f"config {key}={config[key]!r} is not valid: must be {valid}")
  if "total_steps" in config and config.total_steps == 0 and config.num_epochs <= 0:
    raise ValueError(f"config num_epochs={config.num_epochs!r} with total_steps=0 trains "
                     "nothing: set num_epochs > 0 or total_steps > 0")
  if "input_size" in config and config.eval_resize < config.input_size:
    raise ValueError(f"config eval_resize={config.eval_resize} is smaller than input_size="
                     f"{config.input_size}: the eval center crop needs eval_resize >= input_size")
