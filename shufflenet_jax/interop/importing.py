"""`launch.py import`: a PyTorch checkpoint on disk -> a workdir (config.json + checkpoint at step
0) that eval, predict, export and train (fine-tuning) read like any run of ours."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from shufflenet_jax import checkpointing, optim, parallel, train
from shufflenet_jax import workdir as workdir_files
from shufflenet_jax.interop import megvii, torch_pickle, torchvision_v2

# --from -> (model kwargs from the weights' shapes, loader, config spec of the imported run)
SOURCES = {
    "torchvision": (torchvision_v2.model_kwargs, torchvision_v2.load_into,
                    "configs/shufflenet_v2.py:scale={scale}"),
    "megvii_v1": (megvii.v1_model_kwargs, megvii.load_v1_into,
                  "configs/shufflenet_v1.py:groups={groups},scale={scale},recipe=official"),
    "megvii_v2": (megvii.v2_model_kwargs, megvii.load_v2_into,
                  "configs/shufflenet_v2.py:scale={scale},recipe=official"),
}


def import_weights(source: str, weights: str, workdir: str,
                   config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """Converts `weights` from `source` into a new `workdir`; returns the run's config."""
  if source not in SOURCES:
    raise ValueError(f"--from={source!r} is not one of {tuple(SOURCES)}")
  directory = Path(workdir)
  if (directory / "checkpoints").exists() and any((directory / "checkpoints").iterdir()):
    raise FileExistsError(f"{directory} already holds checkpoints; import into a new --workdir")
  read_kwargs, load_into, spec = SOURCES[source]
  state_dict = torch_pickle.load_state_dict(weights)
  kwargs = read_kwargs(state_dict)
  if config is None:
    from shufflenet_jax import config_files
    config = config_files.load_config(spec.format(**kwargs))
  config = ml_collections.ConfigDict(config.to_dict())
  config.num_classes, config.in_channels = kwargs["num_classes"], kwargs["in_channels"]
  model = train.build_model(config)
  load_into(model, state_dict)  # checks every shape: a config for another model fails here
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx, _ = optim.make_optimizer(config, max(1, config.total_steps))
  mesh = parallel.make_mesh()
  state = parallel.replicate({"step": jnp.zeros((), jnp.int32), "params": params,
                              "batch_stats": batch_stats, "opt_state": tx.init(params)}, mesh)
  checkpointer = checkpointing.Checkpointer(str(directory), keep=config.keep_checkpoints)
  try:
    workdir_files.check_resumable(config, directory, checkpointer.latest_step() is not None)
    workdir_files.write_config(config, directory)
    checkpointer.save(0, state, None, force=True)
  finally:
    checkpointer.close()
  if jax.process_index() == 0:
    model_name = "ShuffleNetV1" if source == "megvii_v1" else "ShuffleNetV2"
    extra = f" g={kwargs['groups']}" if "groups" in kwargs else ""
    print(f"Imported {weights} ({source} {model_name} {kwargs['scale']}x{extra}, "
          f"{kwargs['num_classes']} classes) into {directory}", flush=True)
  return config
