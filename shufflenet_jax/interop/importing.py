"""`launch.py import`: a PyTorch checkpoint on disk -> a workdir (config.json + checkpoint at step
0) that eval, predict, export and train (fine-tuning) read like any run of ours."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from shufflenet_jax import checkpointing, optim, parallel, train
from shufflenet_jax.interop import torch_pickle, torchvision_v2

SOURCES = ("torchvision",)


def import_weights(source: str, weights: str, workdir: str,
                   config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """Converts `weights` from `source` into a new `workdir`; returns the run's config."""
  if source not in SOURCES:
    raise ValueError(f"--from={source!r} is not one of {SOURCES}")
  directory = Path(workdir)
  if (directory / "checkpoints").exists() and any((directory / "checkpoints").iterdir()):
    raise FileExistsError(f"{directory} already holds checkpoints; import into a new --workdir")
  state_dict = torch_pickle.load_state_dict(weights)
  kwargs = torchvision_v2.model_kwargs(state_dict)
  if config is None:
    from configs import common
    config = common.load_config(f"configs/shufflenet_v2.py:scale={kwargs['scale']}")
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model != "shufflenet_v2" or config.model_kwargs.scale != kwargs["scale"]:
    raise ValueError(f"the weights are ShuffleNetV2 {kwargs['scale']}x; the config builds "
                     f"{config.model} {dict(config.model_kwargs)}")
  config.num_classes, config.in_channels = kwargs["num_classes"], kwargs["in_channels"]

  model = train.build_model(config)
  torchvision_v2.load_into(model, state_dict)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx, _ = optim.make_optimizer(config, max(1, config.total_steps))
  mesh = parallel.make_mesh()
  state = parallel.replicate({"step": jnp.zeros((), jnp.int32), "params": params,
                              "batch_stats": batch_stats, "opt_state": tx.init(params)}, mesh)
  checkpointer = checkpointing.Checkpointer(str(directory), keep=config.keep_checkpoints)
  try:
    train.prepare_workdir(config, directory, checkpointer)
    checkpointer.save(0, state, None, force=True)
  finally:
    checkpointer.close()
  if jax.process_index() == 0:
    print(f"Imported {weights} ({source} ShuffleNetV2 {kwargs['scale']}x, "
          f"{kwargs['num_classes']} classes) into {directory}", flush=True)
  return config
