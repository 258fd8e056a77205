"""train_and_evaluate(config, workdir): the one entry point for training, resuming and evaluating.

Functional core: the model is split once into (graphdef, params, batch_stats); a pure jitted
`train_step(state, batch, lr) -> (state, metrics)` with the state donated runs over one device mesh
(parallel.py). BN mode `global` is plain SPMD (statistics over the global batch); `per_device`
runs the forward/backward under `jax.shard_map` so each device normalises with its own batch
statistics, as the paper's per-GPU BN, then averages gradients and running statistics.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from shufflenet_jax import checkpointing, config_check, metrics, optim, parallel, profiling
from shufflenet_jax import workdir as workdir_files
from shufflenet_jax.data import pipeline
from shufflenet_jax.models import get_model
from shufflenet_jax.models.layers import resolve_compute_dtype

# Layers compute in this dtype; parameters, BN statistics, logits and the loss stay float32.
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(RuntimeError):
  """The loss became NaN/inf; the last good checkpoint is kept."""


def check_config(config: ml_collections.ConfigDict) -> None:
  config_check.validate(config)
  build_model(config, abstract=True)  # unknown model or bad model arguments: fail before any work


def build_model(config: ml_collections.ConfigDict, **overrides) -> nnx.Module:
  dtype = COMPUTE_DTYPES[resolve_compute_dtype(config.compute_dtype)]
  kwargs = dict(num_classes=config.num_classes, in_channels=config.in_channels,
                conv_impl=config.conv_impl, dtype=dtype,
                seed=config.seed, **config.model_kwargs)
  kwargs.update(overrides)
  return get_model(config.model, **kwargs)


def create_train_state(config, mesh, tx):
  """(graphdef, replicated state dict) with freshly initialised parameters."""
  model = build_model(config)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  def state(params, batch_stats):  # one program: eager tx.init compiles one per shape
    return _with_ema(config, {"step": jnp.zeros((), jnp.int32), "params": params,
                              "batch_stats": batch_stats, "opt_state": tx.init(params)})
  return graphdef, jax.jit(state, out_shardings=parallel.replicated(mesh))(params, batch_stats)


def _with_ema(config, state: dict) -> dict:
  """The state with its "ema" entry when the run keeps an EMA of the weights (ema_decay > 0)."""
  if config.get("ema_decay", 0.0) > 0:
    state["ema"] = optim.ema_init(state["params"], state["batch_stats"])
  return state


def weights(state: dict, ema: bool = False) -> dict:
  """The params and BN statistics a model is evaluated with: the trained ones, or their EMA."""
  return state["ema"] if ema else {"params": state["params"], "batch_stats": state["batch_stats"]}


def check_has_ema(config, workdir) -> None:
  """--ema on a run that kept no EMA: a clear error before anything is loaded."""
  if not config.get("ema_decay", 0.0) > 0:
    raise ValueError(f"--ema: the run in {workdir} keeps no EMA of its weights (ema_decay="
                     f"{config.get('ema_decay', 0.0)}); train with --config.ema_decay=0.9998 "
                     "(for example), or drop --ema")


def abstract_like(state, mesh):
  """Shapes, dtypes and replicated shardings of `state`: the target of a restore."""
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def abstract_train_state(config, mesh, tx):
  """(graphdef, restore target) of the train state, without initialising any parameter."""
  graphdef, params, batch_stats = nnx.split(build_model(config, abstract=True), nnx.Param,
                                            nnx.BatchStat)
  state = _with_ema(config, {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                             "batch_stats": batch_stats,
                             "opt_state": jax.eval_shape(tx.init, params)})
  return graphdef, abstract_like(state, mesh)


def restore_train_state(config, workdir: str, mesh, iterator=None):
  """(step, graphdef, state) of the newest readable checkpoint in `workdir`, or None. Reads
  only: a corrupt checkpoint is skipped, not moved; one of another model raises
  CheckpointMismatchError."""
  tx, _ = optim.make_optimizer(config, max(1, config.total_steps))  # shapes only
  graphdef, target = abstract_train_state(config, mesh, tx)
  checkpointer = checkpointing.Checkpointer(str(workdir), read_only=True)  # reads only
  try:
    restored = checkpointer.restore(target, iterator)
  finally:
    checkpointer.close()
  return None if restored is None else (restored[0], graphdef, restored[1])


def loss_fn(graphdef, config):
  """The train-mode loss: (params, batch_stats, images, labels) -> (loss, (logits, new batch
  statistics))."""
  def loss_fn(params, batch_stats, images, labels):
    # copy=True: fresh Variables at this trace level, so BN can update its statistics.
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = model(images, train=True)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, config.num_classes),
                                  config.label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, (logits, nnx.state(model, nnx.BatchStat))
  return loss_fn


def _platform(mesh) -> str:
  return mesh.devices.flat[0].platform


def make_train_step(graphdef, config, mesh):
  """The jitted `train_step(state, batch, lr)`: lr is this step's learning rate (a float32
  scalar replicated on the mesh: `step_lr`), so the schedule is not compiled into the step."""
  grad_fn = jax.value_and_grad(loss_fn(graphdef, config), has_aux=True)

  def per_device_grads(params, batch_stats, images, labels):
    (loss, (logits, stats)), grads = grad_fn(params, batch_stats, images, labels)
    mean = lambda tree: jax.lax.pmean(tree, parallel.DATA_AXIS)
    return mean(loss), logits, mean(stats), mean(grads)

  def train_step(state, batch, lr):
    images, labels = pipeline.model_input(batch["image"], config), batch["label"]
    if config.bn_mode == "global":
      (loss, (logits, stats)), grads = grad_fn(state["params"], state["batch_stats"], images,
                                               labels)
    else:
      data = P(parallel.DATA_AXIS)
      loss, logits, stats, grads = jax.shard_map(
          per_device_grads, mesh=mesh, in_specs=(P(), P(), data, data),
          out_specs=(P(), data, P(), P()))(state["params"], state["batch_stats"], images, labels)
    tx = optim.optimizer_at(config, lr)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": state["step"] + 1, "params": params, "batch_stats": stats,
                 "opt_state": opt_state}
    if "ema" in state:
      new_state["ema"] = optim.ema_update(state["ema"], params, stats, config.ema_decay)
    grad_norm = optax.tree.norm(grads)
    step_metrics = {"loss": loss, "top1": metrics.topk_correct(logits, labels, 1).mean(),
                    "grad_norm": grad_norm,
                    "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    return new_state, step_metrics

  replicated = parallel.replicated(mesh)
  return jax.jit(train_step, donate_argnums=0, out_shardings=replicated,
                 compiler_options=parallel.compiler_options(_platform(mesh)))


def step_lr(schedule, step: int, mesh) -> jax.Array:
  """Step `step`'s learning rate (the schedule at the updates done before it, as optax counts)
  as the train step's replicated lr argument."""
  return parallel.replicate(np.float32(jax.device_get(schedule(step - 1))), mesh)


def make_eval_step(graphdef, config, mesh):
  k = min(5, config.num_classes)

  def eval_step(weights, batch):  # weights: train.weights(state) or its EMA
    model = nnx.merge(graphdef, weights["params"], weights["batch_stats"])
    logits = model(pipeline.model_input(batch["image"], config), train=False)
    labels, mask = batch["label"], batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"loss": jnp.sum(loss * mask),
            "top1": jnp.sum(metrics.topk_correct(logits, labels, 1) * mask),
            "top5": jnp.sum(metrics.topk_correct(logits, labels, k) * mask),
            "num_examples": jnp.sum(mask)}

  return jax.jit(eval_step, out_shardings=parallel.replicated(mesh),
                 compiler_options=parallel.compiler_options(_platform(mesh)))


def evaluate(eval_step, weights, config, dataset, mesh, prefix="eval") -> dict[str, float]:
  """Exact metrics of `weights` (train.weights) over the whole eval split: padded examples are
  masked out, none dropped."""
  per_process = parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  totals = None
  for local in pipeline.eval_batches(config, dataset, per_process):
    sums = eval_step(weights, parallel.global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  n = totals["num_examples"]
  return {f"{prefix}/loss": totals["loss"] / n, f"{prefix}/top1": totals["top1"] / n,
          f"{prefix}/top5": totals["top5"] / n, f"{prefix}/num_examples": n}


def evaluate_run(eval_step, state, config, dataset, mesh) -> dict[str, float]:
  """eval/* of the trained weights and, when the run keeps an EMA, eval_ema/* of its EMA."""
  results = evaluate(eval_step, weights(state), config, dataset, mesh)
  if "ema" in state:
    results.update(evaluate(eval_step, weights(state, ema=True), config, dataset, mesh,
                            prefix="eval_ema"))
  return results


class _PreemptionFlag:
  """A stop request, checked every step: SIGTERM (how TPU VMs and schedulers announce a
  preemption) or Ctrl-C (SIGINT) saves at the current step and ends the run; a second Ctrl-C
  exits at once (the previous complete checkpoint stays usable: saves are atomic), a second
  SIGTERM is ignored while the save completes.

  One process: our own handlers. Several: JAX's coordination service catches SIGTERM on any host
  and agrees on one step at which every host saves (`reached_preemption_sync_point`), so all
  hosts enter the collective save together; a Ctrl-C is passed on to it as a SIGTERM.
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    handlers = {signal.SIGINT: self._interrupt}
    if not self._multi:
      handlers[signal.SIGTERM] = self._terminate
    for signum, handler in handlers.items():
      try:
        self._previous[signum] = signal.signal(signum, handler)
      except ValueError:  # not the main thread: no handlers, no stop requests
        pass
    return self

  def _terminate(self, signum, frame):
    self.signal_name = self.signal_name or "SIGTERM"

  def _interrupt(self, signum, frame):
    if self.signal_name is not None:
      sys.stderr.write("\nSecond interrupt: exiting now; the newest complete checkpoint is kept "
                       "and resumes with the same command\n")
      sys.stderr.flush()
      os._exit(130)
    self.signal_name = "SIGINT"
    sys.stderr.write("\nInterrupt: saving a checkpoint at this step (Ctrl-C again exits at "
                     "once)\n")
    sys.stderr.flush()
    if self._multi:  # every host saves at the step JAX's preemption service agrees on
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    if self._multi and multihost_utils.reached_preemption_sync_point(step):
      self.signal_name = self.signal_name or "SIGTERM"
    return self.signal_name is not None

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      if self.signal_name is not None and signum == signal.SIGTERM:
        previous = signal.SIG_IGN  # stopping anyway: a repeated notice must not kill the save
      signal.signal(signum, previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` if it holds this run), evaluates, returns final metrics."""
  check_config(config)
  workdir = Path(workdir).expanduser()
  mesh = parallel.make_mesh()
  per_process_batch = parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  dataset = pipeline.load_dataset(config)  # fails on missing data before the workdir is touched
  with _PreemptionFlag() as stop, workdir_files.lock(workdir):
    checkpointer = checkpointing.Checkpointer(str(workdir), keep=config.keep_checkpoints,
                                              every_steps=config.checkpoint_every_steps)
    writer = None
    try:
      workdir_files.check_resumable(config, workdir, checkpointer.latest_step() is not None,
                                    checkpointer.all_steps())
      run = _prepare_run(config, workdir, mesh, dataset, per_process_batch, checkpointer)
      # Only now, with the checkpoint known to fit the config, is anything written.
      workdir_files.write_config(config, workdir)
      writer = metrics.MetricWriter(str(workdir), enabled=parallel.is_chief())
      return _train(config, workdir, mesh, dataset, checkpointer, writer, stop, **run)
    finally:  # pending async saves complete and files close on success, error or preemption
      checkpointer.close()
      if writer is not None:
        writer.close()


def _prepare_run(config, workdir: Path, mesh, dataset, per_process_batch: int,
                 checkpointer) -> dict:
  """The run's schedule, iterator and state: restored from the newest usable checkpoint (a
  mismatching one raises before anything is written), else freshly initialised."""
  steps_per_epoch = len(dataset.train) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size={config.batch_size} is larger than the training split "
                     f"({len(dataset.train)} examples)")
  total_steps = config.total_steps or math.ceil(config.num_epochs * steps_per_epoch)
  tx, schedule = optim.make_optimizer(config, total_steps)
  graphdef, target = abstract_train_state(config, mesh, tx)
  iterator = pipeline.train_iterator(config, dataset, per_process_batch, config.seed)
  restored = None
  if config.resume != "never":
    restored = checkpointer.restore(target, iterator,
                                    any_data_order=config.resume == "any_data_order")
  if restored is not None:
    first_step, state = restored
    logging.info("Resumed from step %d in %s", first_step, workdir)
    if parallel.is_chief():
      print(f"Resuming from checkpoint at step {first_step}", flush=True)
  else:  # initialise only when there is nothing to resume
    first_step = 0
    graphdef, state = create_train_state(config, mesh, tx)
  return dict(graphdef=graphdef, state=state, schedule=schedule, iterator=iterator,
              first_step=first_step, total_steps=total_steps, steps_per_epoch=steps_per_epoch)


def _train(config, workdir: Path, mesh, dataset, checkpointer, writer, stop, *, graphdef, state,
           schedule, iterator, first_step: int, total_steps: int,
           steps_per_epoch: int) -> dict:
  chief = parallel.is_chief()
  eval_every = config.eval_every_steps or steps_per_epoch
  schedule = jax.jit(schedule)  # every step's lr: one program, not one per op
  if chief and first_step < total_steps:  # training on (e.g. more epochs): not finished now
    (workdir / workdir_files.RESULT_FILE).unlink(missing_ok=True)
  train_step = parallel.CompiledTogether(make_train_step(graphdef, config, mesh), "train")
  eval_step = parallel.CompiledTogether(make_eval_step(graphdef, config, mesh), "eval")
  if chief:
    print(f"Training {config.model} for {total_steps} steps ({steps_per_epoch} per epoch), "
          f"global batch {config.batch_size} on {mesh.devices.size} device(s) in "
          f"{jax.process_count()} process(es); workdir {workdir}", flush=True)

  progress = metrics.Progress(total_steps, first_step, enabled=chief)
  profiler = profiling.StepProfiler(config.get("profile_steps", ""), workdir, first_step)
  times = profiling.StepTimes()
  eval_results: dict[str, float] = {}
  window, previous = [], None
  try:
    for step in range(first_step + 1, total_steps + 1):
      with times.waiting_for_data():
        batch = parallel.global_batch(next(iterator), mesh)
      lr = step_lr(schedule, step, mesh)
      profiler.before_step(step)
      log_step = step % config.log_every_steps == 0 or step == total_steps
      if log_step and step > first_step + 1:  # the run's first step compiles: not timed
        state, step_metrics = times.timed_step(train_step, state, batch, lr)
      else:
        state, step_metrics = train_step(state, batch, lr)
      profiler.after_step(step, state)
      window.append(step_metrics)
      if previous is not None:  # one step behind, so the host never stalls the device queue
        _check_finite(previous, step - 1, checkpointer)
      previous = step_metrics
      if log_step:
        _check_finite(step_metrics, step, checkpointer)
        summary = {k: float(np.mean([m[k] for m in jax.device_get(window)]))
                   for k in ("loss", "top1", "grad_norm")}
        scalars = {f"train/{k}": v for k, v in summary.items()}
        scalars["lr"] = float(schedule(step - 1))
        breakdown = times.summary()
        scalars["img_per_sec"] = len(window) * config.batch_size / times.elapsed()
        scalars.update(breakdown)
        writer.write(step, scalars)
        progress.update(step, f"loss {summary['loss']:.4f} top1 {summary['top1']:.3f} "
                        f"{scalars['img_per_sec']:.0f} img/s{profiling.describe(breakdown)}")
        window = []
        times.reset()
      if step % eval_every == 0 or step == total_steps:
        eval_start = time.monotonic()
        eval_results = evaluate_run(eval_step, state, config, dataset, mesh)
        writer.write(step, eval_results)
        progress.update(step, _describe_eval(eval_results))
        times.exclude(time.monotonic() - eval_start)  # keep img/s about training alone
      preempted = stop.reached(step)
      if preempted or step == total_steps or step % config.checkpoint_every_steps == 0:
        _check_finite(step_metrics, step, checkpointer)
        checkpointer.save(step, state, iterator, force=preempted or step == total_steps)
      if preempted:
        checkpointer.wait()
        progress.close()
        if chief:
          print(f"{stop.signal_name}: saved a checkpoint at step {step} in {workdir}; rerun "
                "the same command to resume", flush=True)
        return {"preempted_at_step": step, **eval_results}
  finally:
    profiler.close()
    iterator.close()
  progress.close()
  if first_step >= total_steps:  # already finished: report instead of silently doing nothing
    eval_results = evaluate_run(eval_step, state, config, dataset, mesh)
    if chief:
      print(f"{workdir} already holds the finished run (step {first_step}).", flush=True)
  if chief and eval_results:
    workdir_files.write_result(workdir, max(first_step, total_steps), eval_results)
    print(f"Done: step {max(first_step, total_steps)}, {_describe_eval(eval_results)} on "
          f"{int(eval_results['eval/num_examples'])} examples", flush=True)
  return eval_results


def _describe_eval(results: dict[str, float]) -> str:
  line = f"eval top1 {results['eval/top1']:.4f} top5 {results['eval/top5']:.4f}"
  if "eval_ema/top1" in results:
    line += f" (EMA top1 {results['eval_ema/top1']:.4f} top5 {results['eval_ema/top5']:.4f})"
  return line


def _check_finite(step_metrics, step: int, checkpointer) -> None:
  if not bool(step_metrics["finite"]):
    checkpointer.wait()
    raise NonFiniteLossError(
        f"loss became non-finite (loss={float(step_metrics['loss'])}, grad_norm="
        f"{float(step_metrics['grad_norm'])}) at step {step}; stopped. The last good checkpoint "
        f"is step {checkpointer.latest_step()} (lower the learning rate, check the data)")


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        ema: bool = False) -> dict:
  """Evaluates the latest checkpoint in `workdir` (its EMA weights with `ema`) on the whole eval
  split and prints it."""
  check_config(config)
  if ema:
    check_has_ema(config, workdir)
  mesh = parallel.make_mesh()
  restored = restore_train_state(config, workdir, mesh)
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {Path(workdir) / 'checkpoints'}; train first "
                            f"(python launch.py train --workdir={workdir} ...)")
  step, graphdef, state = restored
  dataset = pipeline.load_dataset(config)
  eval_step = parallel.CompiledTogether(make_eval_step(graphdef, config, mesh), "eval")
  results = evaluate(eval_step, weights(state, ema), config, dataset, mesh)
  if parallel.is_chief():
    print(f"step {step}{' (EMA weights)' if ema else ''}: top-1 {results['eval/top1']:.4f} "
          f"top-5 {results['eval/top5']:.4f} loss {results['eval/loss']:.4f} on "
          f"{int(results['eval/num_examples'])} examples", flush=True)
  return {"step": step, **results}
