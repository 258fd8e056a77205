"""`launch.py recalibrate`: BatchNorm statistics recomputed with the weights frozen.

Every BN layer's running mean and variance become the plain average of its batch statistics over
N training batches (PyTorch's `momentum=None` cumulative average), computed exactly as a train
step computes them: train-mode forward, the run's bn_mode and compute dtype, its augmented
training stream (and for the EMA of the weights too, on the same batches, when the run keeps
one). The official code recomputes BN statistics after training; a checkpoint also needs it
after weight averaging or an import from another dataset. The result is a new workdir
(default WORKDIR/recalibrated): the run's config, the same weights and step, the new statistics,
and its evaluation in result.json, which eval, predict and export read like any run. The run's
own checkpoints are only read.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from shufflenet_jax import checkpointing, metrics, parallel, train
from shufflenet_jax import workdir as workdir_files
from shufflenet_jax.data import pipeline

DEFAULT_OUTPUT = "recalibrated"  # inside the run's workdir


def _with_momentum_zero(graphdef, state):
  """The model's graphdef with every BatchNorm's momentum 0: a train-mode forward then returns
  the batch's own statistics as the new running statistics."""
  model = nnx.merge(graphdef, state["params"], state["batch_stats"])
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.BatchNorm):
      module.momentum = 0.0
  return nnx.split(model, nnx.Param, nnx.BatchStat)[0]


def make_statistics_step(graphdef, state, config, mesh):
  """jitted (params, average, batch, count) -> average: this batch's BN statistics folded into
  the average of the `count - 1` batches before it (count is a float32 scalar argument, so one
  program serves every count; count 1 starts the average)."""
  loss_fn = train.loss_fn(_with_momentum_zero(graphdef, state), config)

  def batch_statistics(params, stats, images, labels):
    return loss_fn(params, stats, images, labels)[1][1]

  def step(params, average, batch, count):
    images, labels = pipeline.model_input(batch["image"], config), batch["label"]
    if config.bn_mode == "global":
      stats = batch_statistics(params, average, images, labels)
    else:  # each device's own statistics, averaged over devices, as the train step does
      data = P(parallel.DATA_AXIS)
      per_device = lambda *args: jax.lax.pmean(batch_statistics(*args), parallel.DATA_AXIS)
      stats = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), data, data),
                            out_specs=P())(params, average, images, labels)
    return jax.tree.map(lambda old, new: old + (new - old) / count, average, stats)

  return jax.jit(step, out_shardings=parallel.replicated(mesh))


def recalibrate(config: ml_collections.ConfigDict, workdir: str, steps: int,
                output: str | None = None) -> dict:
  """Recalibrates the newest checkpoint of `workdir` over `steps` training batches into
  `output`; returns the new checkpoint's evaluation."""
  train.check_config(config)
  if steps < 1:
    raise ValueError(f"--steps={steps}: recalibration needs at least 1 batch")
  output_dir = Path(output) if output else Path(workdir) / DEFAULT_OUTPUT
  if (output_dir / "checkpoints").exists() and any((output_dir / "checkpoints").iterdir()):
    raise FileExistsError(f"{output_dir} already holds checkpoints; recalibrate into a new "
                          "--output")
  mesh = parallel.make_mesh()
  per_process_batch = parallel.check_batch_size(config.batch_size, mesh)
  restored = train.restore_train_state(config, workdir, mesh)
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {Path(workdir) / 'checkpoints'}; "
                            f"train first (python launch.py train --workdir={workdir} ...)")
  step, graphdef, state = restored
  dataset = pipeline.load_dataset(config)
  iterator = iter(pipeline.train_loader(config, dataset, per_process_batch, config.seed))
  statistics_step = parallel.CompiledTogether(
      make_statistics_step(graphdef, state, config, mesh), "statistics")
  chief = parallel.is_chief()
  if chief:
    print(f"Recalibrating the BN statistics of step {step} over {steps} batches of "
          f"{config.batch_size} training images", flush=True)
  progress = metrics.Progress(steps, 0, enabled=chief)
  # The trained weights' statistics, and their EMA's (recalibrated on the same batches) if kept;
  # copies, whose statistics the loop replaces.
  averages = {"raw": train.weights(state)}
  if "ema" in state:
    averages["ema"] = dict(train.weights(state, ema=True))
  for count in range(1, steps + 1):
    batch = parallel.global_batch(next(iterator), mesh)
    count_on_devices = parallel.replicate(np.float32(count), mesh)
    for weights in averages.values():
      weights["batch_stats"] = statistics_step(weights["params"], weights["batch_stats"], batch,
                                               count_on_devices)
    progress.update(count)
  progress.close()
  state = {**state, "batch_stats": averages["raw"]["batch_stats"]}
  if "ema" in averages:
    state["ema"] = averages["ema"]

  with workdir_files.lock(output_dir):
    checkpointer = checkpointing.Checkpointer(str(output_dir), keep=config.keep_checkpoints)
    try:
      workdir_files.write_config(config, output_dir)
      checkpointer.save(step, state, None, force=True)
    finally:
      checkpointer.close()
    eval_step = parallel.CompiledTogether(train.make_eval_step(graphdef, config, mesh), "eval")
    results = train.evaluate_run(eval_step, state, config, dataset, mesh)
    if chief:
      workdir_files.write_result(output_dir, step, results)
  if chief:
    before = workdir_files.read_result(workdir)
    was = (f" (before: top-1 {before['eval/top1']:.4f})"
           if before and before.get("step") == step and "eval/top1" in before else "")
    print(f"Recalibrated step {step} into {output_dir}: top-1 {results['eval/top1']:.4f} "
          f"top-5 {results['eval/top5']:.4f} on {int(results['eval/num_examples'])} "
          f"examples{was}", flush=True)
  return {"step": step, **results}
