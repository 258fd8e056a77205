"""The optax chain from a config: L2 weight decay on kernels, SGD momentum, lr schedule; and the
exponential moving average of the weights (`ema_decay`)."""

from __future__ import annotations

import jax
import ml_collections
import optax

SCHEDULES = ("linear", "cosine", "constant")


def scaled_lr(config: ml_collections.ConfigDict) -> float:
  """Linear scaling rule: lr is given for `lr_reference_batch` (the paper: 0.5 at 1024)."""
  return config.lr * config.batch_size / config.lr_reference_batch


def lr_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  peak = scaled_lr(config)
  warmup = min(config.warmup_steps, total_steps)
  decay_steps = max(1, total_steps - warmup)
  if config.lr_schedule == "linear":  # the paper: linear to zero
    decay = optax.linear_schedule(peak, 0.0, decay_steps)
  elif config.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps)
  elif config.lr_schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"lr_schedule={config.lr_schedule!r} is not one of {SCHEDULES}")
  schedule = decay if not warmup else optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
  if config.get("lr_schedule_first", False):
    # The official train.py calls scheduler.step() before each update: update k (optax's count
    # k - 1) runs at the schedule's value for k, and the last one at lr 0.
    return lambda count: schedule(count + 1)
  return schedule


def decay_mask(params):
  """Weight decay on conv/FC kernels only (ndim > 1), not on BN scales or biases (official)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _sgd(config: ml_collections.ConfigDict, learning_rate) -> optax.GradientTransformation:
  """PyTorch-equivalent SGD: grad + wd * param, then momentum (optionally Nesterov)."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
      optax.sgd(learning_rate, momentum=config.momentum or None, nesterov=config.nesterov),
  )


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The run's optimizer (its state: what is initialised and checkpointed) and lr schedule."""
  schedule = lr_schedule(config, total_steps)
  return _sgd(config, schedule), schedule


def optimizer_at(config: ml_collections.ConfigDict, lr) -> optax.GradientTransformation:
  """make_optimizer's update with this step's lr given as a value (a traced scalar in the train
  step): the compiled step then does not depend on the schedule, total_steps or the peak lr, so
  runs that differ only in those (a sweep, a longer run, a resumed one) share one program.
  Same state structure as make_optimizer's (the schedule's step count is kept)."""
  return _sgd(config, lambda count: lr)


def ema_init(params, batch_stats) -> dict:
  """The EMA starts as a copy of the initial weights and BN statistics."""
  return {"params": params, "batch_stats": batch_stats}


def ema_update(ema: dict, params, batch_stats, decay: float) -> dict:
  """ema <- decay * ema + (1 - decay) * new, after every train step, for the parameters and the
  BN running statistics alike (torchvision's ExponentialMovingAverage with use_buffers=True,
  timm's ModelEmaV2): the EMA weights are then evaluated with statistics that match them."""
  new = {"params": params, "batch_stats": batch_stats}
  return jax.tree.map(lambda e, x: e + (1.0 - decay) * (x - e), ema, new)
