"""`launch.py recalibrate`: BN statistics over N training batches with frozen weights, checked
against a direct float64 computation of every BN layer's batch statistics."""

import hashlib
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from shufflenet_jax import parallel, train
from shufflenet_jax import workdir as workdir_files
from shufflenet_jax.data import pipeline
from shufflenet_jax.models import layers
from tests import processes


def _files_digest(directory: Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def _flat(tree) -> dict[str, np.ndarray]:
  """{"['stages'][0][0]['compress']['bn']['mean']": array, ...} (nnx.State's `.value` dropped)."""
  return {jax.tree_util.keystr(path).removesuffix(".value"): np.asarray(leaf)
          for path, leaf in jax.tree.leaves_with_path(jax.device_get(tree))}


def _direct_statistics(config, params, batches) -> dict[str, np.ndarray]:
  """Every BatchNorm's input recorded in a train-mode forward (XLA's convs, NHWC; one jitted
  program), its per-channel mean and unbiased variance (what PyTorch's running average takes)
  in float64, averaged over the batches."""
  direct_config = ml_collections.ConfigDict(config.to_dict())
  direct_config.conv_impl = "xla"
  model = train.build_model(direct_config)
  nnx.update(model, params)
  graphdef, state = nnx.split(model)
  bn_paths = lambda m: {id(bn): path for path, bn in nnx.iter_modules(m)
                        if isinstance(bn, nnx.BatchNorm)}
  paths = list(bn_paths(model).values())
  original = layers.BatchNorm.__call__  # the models' BN

  def bn_inputs(state, x):
    merged = nnx.merge(graphdef, state)
    names, recorded = bn_paths(merged), {}

    def recording(self, x, *args, **kwargs):
      assert names[id(self)] not in recorded  # each BatchNorm runs once a forward
      recorded[names[id(self)]] = x
      return original(self, x, *args, **kwargs)

    layers.BatchNorm.__call__ = recording
    try:
      merged(x, train=True)
    finally:
      layers.BatchNorm.__call__ = original
    return [recorded[path] for path in paths]

  run = jax.jit(bn_inputs)
  inputs = [[np.asarray(x, np.float64) for x in jax.device_get(
      run(state, pipeline.model_input(batch["image"], config)))] for batch in batches]
  stats = {}
  for k, path in enumerate(paths):
    means = [xs[k].mean(axis=(0, 1, 2)) for xs in inputs]
    variances = [xs[k].var(axis=(0, 1, 2), ddof=1) for xs in inputs]  # PyTorch's running var
    stats[path] = (np.mean(means, axis=0), np.mean(variances, axis=0))
  return stats


def test_recalibrate_averages_the_batch_statistics_of_n_batches_into_a_new_workdir(tiny_config,
                                                                                   tmp_path):
  run = tmp_path / "run"
  tiny_config.num_workers = 0
  tiny_config.ema_decay = 0.5  # its statistics are recalibrated too, on the same batches
  train.train_and_evaluate(tiny_config, str(run))
  before = _files_digest(run)

  result = processes.run([sys.executable, "launch.py", "recalibrate", f"--workdir={run}",
                          "--steps=3"], timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  output = run / "recalibrated"
  assert "Recalibrating the BN statistics of step 6 over 3 batches of 16" in result.stdout
  assert f"Recalibrated step 6 into {output}: top-1" in result.stdout
  assert "(before: top-1" in result.stdout
  after = {k: v for k, v in _files_digest(run).items() if not k.startswith("recalibrated/")}
  assert after == before  # the run's own files are only read
  assert workdir_files.read_result(output)["step"] == 6

  mesh = parallel.make_mesh()
  config = workdir_files.load_config(output)
  step, _, old = train.restore_train_state(config, str(run), mesh)
  new_step, _, new = train.restore_train_state(config, str(output), mesh)
  assert step == new_step == 6

  dataset = pipeline.load_dataset(config)
  iterator = iter(pipeline.train_loader(config, dataset, config.batch_size, config.seed))
  batches = [next(iterator) for _ in range(3)]
  for old_weights, new_weights in ((old, new), (old["ema"], new["ema"])):
    for key, value in _flat(old_weights["params"]).items():  # the weights are frozen
      np.testing.assert_array_equal(_flat(new_weights["params"])[key], value)
    direct = _direct_statistics(config, old_weights["params"], batches)
    recalibrated = _flat(new_weights["batch_stats"])
    old_stats = _flat(old_weights["batch_stats"])
    assert len(recalibrated) == 2 * len(direct)
    changed = 0
    for path, (mean, var) in direct.items():
      key = "".join(f"[{k!r}]" for k in path)
      got_mean, got_var = recalibrated[f"{key}['mean']"], recalibrated[f"{key}['var']"]
      scale = max(1.0, float(np.abs(var).max()))
      np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5 * scale, err_msg=key)
      np.testing.assert_allclose(got_var, var, rtol=1e-4, atol=1e-5 * scale, err_msg=key)
      changed += not np.allclose(old_stats[f"{key}['var']"], got_var)
    assert changed == len(direct)  # training's momentum average is not what recalibration gives
  assert "eval_ema/top1" in workdir_files.read_result(output)

  again = processes.run([sys.executable, "launch.py", "recalibrate", f"--workdir={run}"])
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1] == (
      f"error: {output} already holds checkpoints; recalibrate into a new --output")
