import json
import shutil

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from shufflenet_jax import checkpointing, metrics, optim, parallel, train
from shufflenet_jax import workdir as workdir_files
from shufflenet_jax.data import pipeline
from shufflenet_jax.models import layers
from tests import jitted


def _random_batch(batch_size: int, seed: int = 0, size: int = 28):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(batch_size, size, size, 1)).astype(np.float32),
          "label": rng.integers(0, 10, batch_size).astype(np.int32)}


def _setup(config, devices=None):
  """(mesh, step, graphdef, state): `step(state, batch)` runs the train step with the lr that
  training passes it (the schedule at the state's step)."""
  mesh = parallel.make_mesh(devices)
  tx, schedule = optim.make_optimizer(config, 100)
  graphdef, state = train.create_train_state(config, mesh, tx)
  jitted = train.make_train_step(graphdef, config, mesh)

  def step(state, batch):
    return jitted(state, batch, train.step_lr(schedule, int(state["step"]) + 1, mesh))
  return mesh, step, graphdef, state


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_mesh_spans_all_eight_fake_devices():
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8 and mesh.axis_names == ("data",)
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
    parallel.check_batch_size(12, mesh)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tiny_config):
  mesh, step, graphdef, state = _setup(tiny_config)
  batch = parallel.global_batch(_random_batch(16), mesh)
  losses = []
  for _ in range(8):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
  assert int(state["step"]) == 8


def test_the_train_step_is_one_program_for_every_schedule_and_takes_its_lr(tiny_config):
  """The lr is an argument: runs that differ in lr, schedule, warmup or length compile (and
  cache) one train step; with lr 0 a step moves no parameter, with the schedule's lr it does."""
  mesh, step, graphdef, state = _setup(tiny_config)
  batch = parallel.global_batch(_random_batch(16), mesh)
  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=parallel.replicated(mesh))
  texts = []
  for changes in ({}, dict(lr=0.3, lr_schedule="cosine", warmup_steps=5, total_steps=999)):
    config = ml_collections.ConfigDict(tiny_config.to_dict())
    config.update(changes)
    texts.append(train.make_train_step(graphdef, config, mesh).lower(state, batch, lr).as_text())
  assert texts[0] == texts[1]
  before = _leaves(state["params"])
  frozen, _ = train.make_train_step(graphdef, tiny_config, mesh)(
      jax.tree.map(jnp.copy, state), batch, parallel.replicate(np.float32(0), mesh))
  assert all(np.array_equal(a, b) for a, b in zip(before, _leaves(frozen["params"])))
  moved, _ = step(state, batch)
  assert not all(np.array_equal(a, b) for a, b in zip(before, _leaves(moved["params"])))


def _one_step_stats(config, devices, *batches):
  """(state, loss) after one train step from the initial state, for each batch (one compile)."""
  mesh, step, graphdef, initial = _setup(config, devices)
  results = []
  for batch in batches:
    state = jax.tree.map(jnp.copy, initial)  # the step donates its input
    state, m = step(state, parallel.global_batch(batch, mesh))
    results.append((state, float(m["loss"])))
  return results[0] if len(results) == 1 else results


def test_global_bn_equals_single_device_bn(tiny_config):
  batch = _random_batch(16, seed=1)
  many, loss_many = _one_step_stats(tiny_config, None, batch)
  one, loss_one = _one_step_stats(tiny_config, jax.devices()[:1], batch)
  assert loss_many == pytest.approx(loss_one, rel=1e-5)
  for a, b in zip(_leaves(many["batch_stats"]), _leaves(one["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(_leaves(many["params"]), _leaves(one["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_per_device_bn_uses_each_devices_own_statistics(tiny_config):
  batch = _random_batch(16, seed=2)
  global_state, global_loss = _one_step_stats(tiny_config, None, batch)
  tiny_config.bn_mode = "per_device"
  per_device, per_device_loss = _one_step_stats(tiny_config, None, batch)
  assert per_device_loss != pytest.approx(global_loss, rel=1e-4)
  # Reference: each 2-example slice alone on one device; running stats and loss are averaged.
  slices = _one_step_stats(tiny_config, jax.devices()[:1],
                           *({k: v[2 * i:2 * i + 2] for k, v in batch.items()} for i in range(8)))
  assert per_device_loss == pytest.approx(np.mean([loss for _, loss in slices]), rel=1e-4)
  expected = [np.mean(values, axis=0)
              for values in zip(*(_leaves(s["batch_stats"]) for s, _ in slices))]
  for got, want in zip(_leaves(per_device["batch_stats"]), expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  var_global = _leaves(global_state["batch_stats"])
  assert any(not np.allclose(a, b, rtol=1e-3) for a, b in
             zip(_leaves(per_device["batch_stats"]), var_global))


class _ListSource:
  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


@pytest.mark.parametrize("num_examples", [1, 13, 37])
def test_eval_counts_every_example_exactly_once(tiny_config, num_examples):
  rng = np.random.default_rng(num_examples)
  records = [{"image": rng.integers(0, 255, (28, 28, 1), np.uint8), "label": int(i % 10)}
             for i in range(num_examples)]
  dataset = pipeline.Dataset(train=None, eval=_ListSource(records), class_names=list("abcdefghij"),
                             mean=np.float32(0), std=np.float32(1))
  mesh, _, graphdef, state = _setup(tiny_config)
  results = train.evaluate(train.make_eval_step(graphdef, tiny_config, mesh), state, tiny_config,
                           dataset, mesh)
  assert results["eval/num_examples"] == num_examples
  # Reference: all examples in one unpadded forward pass.
  model = nnx.merge(graphdef, state["params"], state["batch_stats"])
  images = np.stack([r["image"] for r in records]).astype(np.float32)
  labels = np.array([r["label"] for r in records])
  logits = nnx.jit(lambda m, x: m(x, train=False))(model, jnp.asarray(images))  # one compile
  top1 = float(np.mean(np.argmax(logits, -1) == labels))
  top5 = float(np.mean(metrics.topk_correct(logits, jnp.asarray(labels), 5)))
  assert results["eval/top1"] == pytest.approx(top1, abs=1e-6)
  assert results["eval/top5"] == pytest.approx(top5, abs=1e-6)


def _final_params(workdir, config):
  step, _, restored = train.restore_train_state(config, str(workdir), parallel.make_mesh())
  return step, restored


def test_stop_and_resume_gives_the_same_parameters(tiny_config, tmp_path):
  """With an EMA of the weights: it is resumed exactly too, and evaluated beside them."""
  workdir = tmp_path / "run"
  tiny_config.ema_decay = 0.5
  train.train_and_evaluate(tiny_config, str(workdir))
  step, uninterrupted = _final_params(workdir, tiny_config)
  assert step == 6
  # Interrupt after step 3: drop the final checkpoint, rerun the same command.
  shutil.rmtree(workdir / "checkpoints" / "6")
  train.train_and_evaluate(tiny_config, str(workdir))
  step, resumed = _final_params(workdir, tiny_config)
  assert step == 6
  assert set(resumed) == {"step", "params", "batch_stats", "opt_state", "ema"}
  for a, b in zip(_leaves(uninterrupted), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  lines = workdir_files.read_metrics(str(workdir))
  assert {"train/loss", "train/top1", "lr", "img_per_sec"} <= set(lines[0])
  evals = [line for line in lines if "eval/top1" in line]
  assert evals[-1]["eval/num_examples"] == 37 and 0 <= evals[-1]["eval/top5"] <= 1
  assert evals[-1]["eval_ema/num_examples"] == 37 and 0 <= evals[-1]["eval_ema/top5"] <= 1
  # `launch.py eval [--ema]` on the finished workdir reproduces the run's final evaluation.
  for ema, prefix in ((False, "eval"), (True, "eval_ema")):
    reevaluated = train.evaluate_checkpoint(tiny_config, str(workdir), ema=ema)
    assert reevaluated["step"] == 6
    assert reevaluated["eval/top1"] == pytest.approx(evals[-1][f"{prefix}/top1"], abs=1e-9)
    assert reevaluated["eval/loss"] == pytest.approx(evals[-1][f"{prefix}/loss"], rel=1e-6)
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"] == "shufflenet_v1" and saved["batch_size"] == 16


def test_the_ema_is_the_reference_update_of_every_steps_weights_in_float64(tiny_config):
  """ema_0 = the initial weights and BN statistics, ema_t = d * ema_{t-1} + (1 - d) * (step t's
  weights and statistics), computed in float64 from the states the train step returned."""
  tiny_config.ema_decay = 0.7
  mesh, step, graphdef, state = _setup(tiny_config)
  trained = lambda state: _leaves(train.weights(state))
  reference = [x.astype(np.float64) for x in trained(state)]
  assert all(np.array_equal(a, b) for a, b in zip(trained(state), _leaves(state["ema"])))
  for seed in range(4):
    state, _ = step(state, parallel.global_batch(_random_batch(16, seed=seed), mesh))
    reference = [0.7 * e + 0.3 * x for e, x in zip(reference, trained(state))]
  ema = _leaves(state["ema"])
  assert len(ema) == len(reference)
  for got, want in zip(ema, reference):
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)
  assert not all(np.allclose(a, b) for a, b in zip(ema, trained(state)))  # it lags the weights
  with pytest.raises(ValueError, match=r"--ema: the run in W keeps no EMA.*ema_decay=0.0"):
    train.check_has_ema(ml_collections.ConfigDict({"ema_decay": 0.0}), "W")


def test_resume_refuses_a_different_config(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  tiny_config.total_steps = 3
  train.train_and_evaluate(tiny_config, str(workdir))
  # A config.json written before ema_decay existed means no EMA: the run still resumes.
  saved = json.loads((workdir / "config.json").read_text())
  del saved["ema_decay"]
  (workdir / "config.json").write_text(json.dumps(saved))
  workdir_files.check_resumable(tiny_config, workdir, True)
  tiny_config.ema_decay = 0.9
  with pytest.raises(ValueError, match=r"different config \(ema_decay: 0.0 -> 0.9\)"):
    train.train_and_evaluate(tiny_config, str(workdir))
  tiny_config.ema_decay = 0.0
  tiny_config.lr = 0.01
  with pytest.raises(ValueError, match=r"different config \(lr: 0.4 -> 0.01\).*resume=force"):
    train.train_and_evaluate(tiny_config, str(workdir))
  tiny_config.resume = "never"
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    train.train_and_evaluate(tiny_config, str(workdir))
  # Forced, it resumes, and the earlier config.json is kept beside the new one.
  tiny_config.resume = "force"
  tiny_config.total_steps = 4
  train.train_and_evaluate(tiny_config, str(workdir))
  kept = list(workdir.glob("config.*.json"))
  assert len(kept) == 1 and json.loads(kept[0].read_text())["lr"] == 0.4
  assert json.loads((workdir / "config.json").read_text())["lr"] == 0.01


def test_checkpoint_saved_on_8_devices_restores_on_4(tiny_config, tmp_path):
  mesh8, step, graphdef, state = _setup(tiny_config)
  state, _ = step(state, parallel.global_batch(_random_batch(16), mesh8))
  expected = _leaves(state)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  iterator = iter(_dummy_loader())
  next(iterator)
  ckpt.save(1, state, iterator, force=True)
  ckpt.close()
  mesh4 = parallel.make_mesh(jax.devices()[:4])
  target = train.abstract_like(state, mesh4)
  restored_step, restored = checkpointing.Checkpointer(str(tmp_path)).restore(target)
  assert restored_step == 1
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding.mesh.devices.size == 4
  for a, b in zip(expected, _leaves(restored)):
    np.testing.assert_array_equal(a, b)


def _dummy_loader():
  source = [{"x": np.int32(i)} for i in range(10)]
  return grain.DataLoader(data_source=source, sampler=grain.samplers.IndexSampler(10, seed=0),
                          operations=[grain.transforms.Batch(2)])


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_config,
                                                                                tmp_path):
  tiny_config.lr = 1e12
  tiny_config.total_steps = 12
  tiny_config.checkpoint_every_steps = 1
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite .* at step (\d+)") as error:
    train.train_and_evaluate(tiny_config, str(tmp_path))
  latest = checkpointing.Checkpointer(str(tmp_path)).latest_step()
  bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
  assert bad_step >= 2  # step 1 starts from finite initial weights
  assert latest == bad_step - 1  # checkpoint_every_steps=1: every finite step was saved
  step, _, state = train.restore_train_state(tiny_config, str(tmp_path), parallel.make_mesh())
  assert step == latest
  assert all(np.isfinite(leaf).all() for leaf in _leaves(state["params"]))
  if latest is not None:
    _, state = _final_params(tmp_path, tiny_config)
    assert all(np.all(np.isfinite(x)) for x in _leaves(state["params"]))


@pytest.mark.parametrize("key,value,message", [
    ("bn_mode", "sync", "bn_mode='sync' is not one of"),
    ("compute_dtype", "float16", "compute_dtype='float16' is not one of"),
    ("dataset", "cifar", "dataset='cifar' is not one of"),
    ("batch_size", 12, "batch_size=12 is not divisible by the 8 devices"),
    ("lr_schedule", "step", "lr_schedule='step' is not one of"),
])
def test_bad_config_values_are_clear_errors(tiny_config, tmp_path, key, value, message):
  tiny_config[key] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert not (tmp_path / "config.json").exists()  # nothing written


def test_missing_data_dir_says_how_to_get_the_data(tiny_config, tmp_path):
  tiny_config.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # nothing written


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny_config):
  images = _random_batch(16)["image"]
  logits = {}
  for dtype in ("float32", "bfloat16"):
    tiny_config.compute_dtype = dtype
    model = train.build_model(tiny_config)
    activations = model.conv1(jnp.asarray(images), train=False)  # the layers compute in dtype
    assert activations.dtype == (jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    logits[dtype] = jitted.forward(model, jnp.asarray(images))
    assert logits[dtype].dtype == jnp.float32
  difference = np.abs(np.asarray(logits["bfloat16"]) - np.asarray(logits["float32"]))
  assert 0 < difference.max() < 0.05  # bfloat16 rounding, not another function
  mesh, step, graphdef, state = _setup(tiny_config)
  state, m = step(state, parallel.global_batch(_random_batch(16), mesh))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["batch_stats"]))
  assert m["loss"].dtype == jnp.float32 and np.isfinite(float(m["loss"]))


def test_compute_dtype_auto_is_bfloat16_on_tpu_and_gpu_and_float32_on_cpu(tiny_config):
  assert tiny_config.compute_dtype == "auto"  # the default
  for backend, expected in (("tpu", "bfloat16"), ("gpu", "bfloat16"), ("cpu", "float32")):
    assert layers.resolve_compute_dtype("auto", backend) == expected
    for explicit in ("float32", "bfloat16"):  # an explicit dtype is kept on every backend
      assert layers.resolve_compute_dtype(explicit, backend) == explicit
  with pytest.raises(ValueError, match=r"compute_dtype='fp16' is not one of \('auto'"):
    layers.resolve_compute_dtype("fp16")
  model = train.build_model(tiny_config)  # on this CPU: float32 layers
  activations = model.conv1(jnp.asarray(_random_batch(16)["image"]), train=False)
  assert activations.dtype == jnp.float32


def test_eval_checkpoint_without_checkpoint_is_a_clear_error(tiny_config, tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    train.evaluate_checkpoint(tiny_config, str(tmp_path))
