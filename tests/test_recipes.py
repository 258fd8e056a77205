"""`recipe=official` trains step for step like the official code (megvii-model/ShuffleNet-Series
train.py), and `recipe=paper` like the same loop with the paper's rules: the fixtures
(tests/fixtures/make_official_training_fixture.py, run in a separate PyTorch environment) hold
each loop's per-step loss and lr and its final weights and BN running statistics after 10 steps
from fixed weights on fixed batches.

Where the paper is silent, our paper recipe chooses, and the paper fixture follows it: weight
decay on conv/FC kernels only (the official code's groups), update k at lr * (1 - (k - 1) / T)
(the official code: lr * (1 - k / T), so its last update has lr 0), RGB input normalised by
ImageNet's mean and std (the official code: BGR 0-255), no label smoothing (official: 0.1)."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from configs import common
from shufflenet_jax import optim, parallel, train
from shufflenet_jax.data import pipeline
from shufflenet_jax.interop import megvii, torch_pickle
from tests import float64_truth as f64

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURES_OF_RECIPES = {  # fixture -> (config, official checkpoint loader, model overrides)
    "official_training_v1_g3_0.5x": ("configs/shufflenet_v1.py:groups=3,scale=0.5,recipe=official",
                                     megvii.load_v1_into, {}),
    "official_training_v2_0.5x": ("configs/shufflenet_v2.py:scale=0.5,recipe=official",
                                  megvii.load_v2_into, {}),
    # The paper's recipe on the official layout (which holds the official checkpoint; the layout
    # is not part of the recipe).
    "paper_training_v2_0.5x": ("configs/shufflenet_v2.py:scale=0.5,recipe=paper",
                               megvii.load_v2_into, {"layout": "official"}),
}


def _config(path: str, expected, model_overrides: dict) -> object:
  """The official recipe at the fixture's sizes (its docstring): what differs from ImageNet's
  config is only size, lr and weight decay, never a rule of the recipe."""
  config = common.load_config(path)
  steps, batch = expected["labels"].shape
  config.num_classes, config.input_size = 10, expected["images_rgb"].shape[2]
  config.batch_size = config.eval_batch_size = batch
  config.lr, config.lr_reference_batch = 0.002, batch
  config.weight_decay = 0.05
  config.total_steps = steps
  config.conv_impl = "xla"
  config.model_kwargs.update(model_overrides)
  return config


def _weights(config, loader, state_dict) -> tuple:
  model = train.build_model(config)
  loader(model, state_dict)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return graphdef, params, batch_stats


def _float64_input(images, config) -> np.ndarray:
  if config.input_format == "bgr_255":
    return images[..., ::-1].astype(np.float64)
  mean, std = pipeline.mean_std(config.dataset)
  return (images - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)


def _float64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("name", sorted(FIXTURES_OF_RECIPES))
def test_each_recipe_trains_step_for_step_like_its_reference_loop(name):
  """Our train step (the fixture's recipe, 8 devices, global BN) from the official checkpoint
  on the reference loop's batches: every step's lr and loss, and after 10 steps every weight and
  BN running statistic, equal the official training's. Both run in float64 (the fixture's
  docstring says why), so any difference is a rule of the recipe, not rounding."""
  path, loader, model_overrides = FIXTURES_OF_RECIPES[name]
  expected = np.load(FIXTURES / f"{name}.npz")
  config = _config(path, expected, model_overrides)
  mesh = parallel.make_mesh()
  graphdef, params, batch_stats = _weights(
      config, loader, torch_pickle.load_state_dict(FIXTURES / f"{name}.pth"))
  tx, schedule = optim.make_optimizer(config, config.total_steps)
  with jax.enable_x64(True):
    params, batch_stats = _float64(params), _float64(batch_stats)
    state = jax.device_put({"step": np.int32(0), "params": params, "batch_stats": batch_stats,
                            "opt_state": tx.init(params)}, parallel.replicated(mesh))
    train_step = train.make_train_step(graphdef, config, mesh)
    losses, lrs = [], []
    for step in range(1, config.total_steps + 1):
      lrs.append(float(train.step_lr(schedule, step, mesh)))  # what training ships (float32)
      lr = parallel.replicate(np.float64(jax.device_get(schedule(step - 1))), mesh)
      images = expected["images_rgb"][step - 1]
      # The recipe's input as the float32 step computes it, here in float64.
      inputs = _float64_input(images, config)
      np.testing.assert_allclose(pipeline.model_input(images, config), inputs, rtol=1e-6,
                                 atol=1e-6)
      batch = {"image": inputs, "label": expected["labels"][step - 1]}
      state, metrics = train_step(state, parallel.global_batch(batch, mesh), lr)
      losses.append(float(metrics["loss"]))
    final_params, final_stats = jax.device_get((state["params"], state["batch_stats"]))
  assert jax.tree.leaves(final_params)[0].dtype == np.float64
  np.testing.assert_allclose(lrs, expected["lrs"], rtol=1e-6)  # step_lr ships float32
  np.testing.assert_allclose(losses, expected["losses"], rtol=1e-7)  # measured: <= 1.2e-9
  final = {k.removeprefix("final/"): expected[k] for k in expected.files
           if k.startswith("final/")}
  _, want_params, want_stats = _weights(config, loader, final)
  for got, want in ((final_params, want_params), (final_stats, want_stats)):
    errors = f64.tree_error(got, jax.device_get(want))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-6, (worst, errors[worst])  # the fixture's float32: 6e-8
