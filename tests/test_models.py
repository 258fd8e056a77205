import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflenet_jax import complexity
from shufflenet_jax.models import get_model, layers, shufflenet_v1, shufflenet_v2
from tests import jitted


def _filled(model: nnx.Module, seed: int = 0) -> nnx.Module:
  """A shapes-only model with deterministic random values (fast: no init program to compile)."""
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(state)
  values = [jnp.asarray(rng.normal(0, 0.1, leaf.shape).astype(np.float32)) for leaf in leaves]
  state = jax.tree.unflatten(treedef, values)
  # Keep BN variances positive.
  for path, var in nnx.to_flat_state(state):
    if path[-1] == "var":
      var.set_value(jnp.abs(var.get_value()) + 0.5)
  return nnx.merge(graphdef, state)


def _forward(model, x, train=False):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=train))(state, x)


@pytest.mark.parametrize("groups", shufflenet_v1.GROUPS)
@pytest.mark.parametrize("scale", shufflenet_v1.SCALES)
def test_v1_every_group_and_scale_runs_forward(groups, scale):
  model = get_model("shufflenet_v1", groups=groups, scale=scale, stem="small", num_classes=7,
                    abstract=True)
  y = _forward(_filled(model), jnp.ones((2, 32, 32, 3)))
  assert y.shape == (2, 7) and y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("scale", shufflenet_v2.SCALES)
def test_v2_every_scale_runs_forward(scale):
  model = get_model("shufflenet_v2", scale=scale, stem="small", num_classes=5, abstract=True)
  y = _forward(_filled(model), jnp.ones((1, 32, 32, 3)))
  assert y.shape == (1, 5) and bool(jnp.all(jnp.isfinite(y)))


def test_real_initialisation_is_seeded_and_trains_in_train_mode():
  a = get_model("shufflenet_v1", groups=3, scale=0.25, stem="small", num_classes=10,
                in_channels=1, seed=3)
  b = get_model("shufflenet_v1", groups=3, scale=0.25, stem="small", num_classes=10,
                in_channels=1, seed=3)
  c = get_model("shufflenet_v1", groups=3, scale=0.25, stem="small", num_classes=10,
                in_channels=1, seed=4)
  leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(leaves(a), leaves(c)))
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  train_out = jitted.forward(a, x, train=True)
  assert train_out.shape == (4, 10)
  # BN in train mode updated its running statistics; in eval mode it leaves them alone.
  mean = a.conv1.bn.mean.get_value()
  assert not np.allclose(mean, 0)
  jitted.forward(a, x)
  np.testing.assert_array_equal(a.conv1.bn.mean.get_value(), mean)


# Table 1: output size per stage at 224 (Conv1 112, MaxPool 56, Stage2 28, Stage3 14, Stage4 7).
@pytest.mark.parametrize("groups", shufflenet_v1.GROUPS)
def test_v1_stage_shapes_match_table1(groups):
  model = get_model("shufflenet_v1", groups=groups, abstract=True, conv_impl="xla")
  rows = {r["name"]: r["output_shape"] for r in complexity.layer_table(model)}
  _, s2, s3, s4 = shufflenet_v1.v1_channels(groups, 1.0)
  assert s2 == shufflenet_v1.STAGE2_WIDTH_1X[groups]
  assert rows["conv1"] == (112, 112, 24)
  assert rows["maxpool"] == (56, 56, 24)
  assert rows["stage2"] == (28, 28, s2)
  assert rows["stage3"] == (14, 14, s3)
  assert rows["stage4"] == (7, 7, s4)
  assert rows["fc"] == (1000,)
  assert model.repeats == (4, 8, 4)


def test_v1_shallow_halves_the_units():
  model = get_model("shufflenet_v1", groups=3, scale=0.5, shallow=True, abstract=True)
  assert model.repeats == (2, 4, 2)
  assert [len(stage) for stage in model.stages] == [2, 4, 2]


def test_v1_unit_structure():
  model = get_model("shufflenet_v1", groups=3, abstract=True, conv_impl="xla")
  first, second = model.stages[0][0], model.stages[0][1]
  assert first.compress.conv.groups == 1  # Stage2's first pointwise conv is dense (24 inputs)
  assert second.compress.conv.groups == 3
  for unit in (first, second, model.stages[1][0]):
    out = unit.expand.conv.kernel.shape[-1] + (unit.compress.conv.kernel.shape[2]
                                               * unit.compress.conv.groups
                                               if unit.stride == 2 else 0)
    assert unit.compress.conv.kernel.shape[-1] == out // 4  # bottleneck out//4, stride 2 too
    assert unit.depthwise.conv.groups == unit.depthwise.conv.kernel.shape[-1]  # really depthwise
    assert unit.depthwise.relu is False and unit.expand.relu is False
  bn = model.conv1.bn
  assert bn.momentum == 0.9 and bn.epsilon == 1e-5


def test_shuffle_off_changes_only_the_shuffle(monkeypatch):
  kwargs = dict(groups=3, scale=0.5, stem="small", num_classes=10)
  on = _filled(get_model("shufflenet_v1", shuffle=True, abstract=True, **kwargs))
  off = _filled(get_model("shufflenet_v1", shuffle=False, abstract=True, **kwargs))
  # Same parameter tree, shapes and (same fill) values.
  assert jax.tree.structure(nnx.state(on)) == jax.tree.structure(nnx.state(off))
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  y_on, y_off = _forward(on, x), _forward(off, x)  # one program each, not op by op
  assert not np.allclose(y_on, y_off)
  # With the shuffle replaced by the identity, the two models compute the same function.
  monkeypatch.setattr(shufflenet_v1, "channel_shuffle", lambda x, g: x)
  np.testing.assert_allclose(_forward(on, x), y_off, rtol=1e-5, atol=1e-5)


def test_official_shuffle_order_moves_the_shuffle_after_the_depthwise_conv(monkeypatch):
  model = _filled(get_model("shufflenet_v1", groups=2, scale=0.5, stem="small",
                            shuffle_order="official", abstract=True))
  calls = []
  monkeypatch.setattr(shufflenet_v1, "channel_shuffle", lambda x, g: calls.append("paper") or x)
  monkeypatch.setattr(shufflenet_v1, "channel_unshuffle",
                      lambda x, g: calls.append("official") or x)
  graphdef, state = nnx.split(model)
  jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.ones((1, 32, 32, 3)))
  assert calls and set(calls) == {"official"}  # recorded while tracing: nothing is computed


def test_v2_param_counts_equal_torchvision():
  # torchvision.models.shufflenet_v2_x{0_5,1_0,1_5,2_0}: published num_params.
  expected = {0.5: 1_366_792, 1.0: 2_278_604, 1.5: 3_503_624, 2.0: 7_393_996}
  for scale, count in expected.items():
    model = get_model("shufflenet_v2", scale=scale, abstract=True)
    assert complexity.count_params(model) == count, scale


def test_v2_units_match_torchvision_layout():
  model = get_model("shufflenet_v2", scale=1.0, abstract=True, conv_impl="xla")
  rows = {r["name"]: r["output_shape"] for r in complexity.layer_table(model)}
  assert rows["stage2"] == (28, 28, 116) and rows["stage4"] == (7, 7, 464)
  assert rows["conv5"] == (7, 7, 1024)
  assert model.fc.linear.bias is not None
  unit = model.stages[0][1]
  assert unit.branch1 is None and unit.branch2[1].conv.groups == 58


def test_bad_arguments_name_the_valid_choices():
  with pytest.raises(ValueError, match=r"groups=5 is not one of \(1, 2, 3, 4, 8\)"):
    get_model("shufflenet_v1", groups=5, abstract=True)
  with pytest.raises(ValueError, match="scale=0.75 is not one of"):
    get_model("shufflenet_v2", scale=0.75, abstract=True)
  with pytest.raises(ValueError, match="not one of .*shufflenet_v2"):
    get_model("shufflenet_v3")
  with pytest.raises(ValueError, match=r"unknown argument\(s\) \['group'\]"):
    get_model("shufflenet_v1", group=3)
  with pytest.raises(ValueError, match="stem='tiny' is not one of"):
    get_model("shufflenet_v1", stem="tiny", abstract=True)
  with pytest.raises(ValueError, match="conv_impl='fast' is not one of"):
    layers.resolve_conv_impl("fast")


@pytest.mark.parametrize("name,kwargs", [
    ("shufflenet_v1", dict(groups=3, scale=0.25, shallow=True, conv_impl="matmul")),  # group-major
    ("shufflenet_v2", dict(scale=0.5, conv_impl="xla")),
    ("mobilenet_v1", dict(width=0.25, conv_impl="xla")),
], ids=lambda v: v if isinstance(v, str) else "")
def test_feature_maps_are_the_classifier_paths_values_at_each_stride(name, kwargs):
  """`model(x, features=True)`: a backbone for detection/segmentation heads."""
  model = _filled(get_model(name, num_classes=10, abstract=True, **kwargs))
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  graphdef, state = nnx.split(model)
  both = jax.jit(lambda s, x: (nnx.merge(graphdef, s)(x),
                               nnx.merge(graphdef, s)(x, features=True)))
  logits, maps = both(state, x)
  assert set(maps) == {"stride2", "stride4", "stride8", "stride16", "stride32"}
  for key, value in maps.items():
    stride = int(key.removeprefix("stride"))
    assert value.shape[:3] == (2, 64 // stride, 64 // stride), (key, value.shape)
  last = nnx.merge(graphdef, state).fc(layers.global_avg_pool(maps["stride32"]))
  np.testing.assert_allclose(last, logits, rtol=1e-5, atol=1e-5)
  small = get_model(name, num_classes=10, abstract=True, stem="small", **kwargs)
  small_graphdef, small_state = nnx.split(small)  # shapes only: no compile
  shapes = jax.eval_shape(lambda s, x: nnx.merge(small_graphdef, s)(x, features=True),
                          small_state, x)
  assert "stride1" in shapes and all(  # the small stem keeps conv1 at the input's size
      v.shape[1] == 64 // int(k.removeprefix("stride")) for k, v in shapes.items())
