"""The conv implementations compute the same function, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflenet_jax import parallel
from shufflenet_jax.models import get_model, layers, matmul
from shufflenet_jax.models.layers import conv2d
from tests import float64_truth as f64
from tests import jitted

pytestmark = pytest.mark.numerics  # optimised code; `make test` reruns these with AVX2 code

CASES = [  # (in, out, kernel, stride, groups)
    (12, 24, 1, 1, 1),    # dense pointwise
    (12, 24, 1, 1, 3),    # grouped pointwise (ShuffleNet GConv)
    (24, 16, 1, 1, 8),
    (16, 16, 3, 1, 16),   # depthwise
    (16, 16, 3, 2, 16),   # depthwise stride 2
    (3, 8, 3, 2, 1),      # dense 3x3 stem (both use XLA's conv)
    (8, 16, 3, 1, 8),     # depthwise with channel multiplier 2
]
TOLERANCE = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=3e-2, atol=3e-2)}


# Below a few units in the last place at unit scale, which of two float32 sums of the same ~100
# terms is closer to the truth is the summation order's luck, not a property of the method.
F32_ULP = 2.0 ** -23
BF16_ULP = 2.0 ** -7
ULPS = 4


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("size", [7, 8])
def test_matmul_is_as_close_to_float64_as_xla_forward_and_gradients(case, dtype, size):
  """Each conv, its input gradient and its kernel gradient, in both implementations, against
  the same conv in float64: the matmul path's error is at most twice XLA's (or ULPS ulps)."""
  cin, cout, k, stride, groups = case
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, size, size, cin), dtype)
  kernel = (jax.random.normal(kk, (k, k, cin // groups, cout)) * 0.3).astype(dtype)
  conv = lambda impl: lambda x, w: conv2d(x, w, stride=stride, padding=(k - 1) // 2,
                                          groups=groups, impl=impl)
  cotangent = jax.random.normal(kg, jax.eval_shape(conv("xla"), x, kernel).shape, dtype)

  def run(impl, *args):
    y, vjp = jax.vjp(conv(impl), *args)
    return (y, *vjp(cotangent.astype(y.dtype)))

  reference, fast = run("xla", x, kernel), run("matmul", x, kernel)
  with jax.enable_x64(True):
    truth = jax.device_get(run("xla", *(jnp.asarray(a, jnp.float64) for a in (x, kernel))))
  floor = ULPS * (F32_ULP if dtype == jnp.float32 else BF16_ULP)
  for a, b, t in zip(reference, fast, truth):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               **TOLERANCE[dtype])
    assert f64.error(b, t) <= 2 * max(f64.error(a, t), floor), (f64.error(b, t), f64.error(a, t))


WHOLE_MODELS = [  # every kind of unit, stem, layout and shuffle once: compiling is the cost
    ("shufflenet_v1", dict(groups=3, scale=0.5)),  # the full depth (every unit of every stage)
    ("shufflenet_v1", dict(groups=8, scale=0.25, stem="imagenet", shallow=True)),  # max pool
    ("shufflenet_v1", dict(groups=2, scale=0.5, shuffle=False, shallow=True)),
    # with SE (SENet's block), which runs group-major under matmul too
    ("shufflenet_v1", dict(groups=4, scale=0.5, shuffle_order="official", shallow=True, se=True)),
    ("shufflenet_v1", dict(groups=1, scale=0.25, shallow=True)),
    ("shufflenet_v2", dict(scale=0.5)),
    # SE with SENet's block: Megvii's SELayer normalises N values a channel, which at batch 4
    # leaves float32 3e-4 from float64 in either implementation (test_squeeze_excite_... below)
    ("shufflenet_v2", dict(scale=0.5, stem="imagenet", layout="official", se=True,
                           se_style="senet")),
    ("table4_baseline", dict(unit="vgg", width=16)),
    ("table4_baseline", dict(unit="resnet", width=32)),
    ("table4_baseline", dict(unit="resnext", width=32)),
    ("mobilenet_v1", dict(width=0.25)),
]
# Float32 gradients of these models lie 6e-7 to 1.1e-4 from float64 (measured 2026-12-02 on AVX2
# and AVX-512 code, both implementations, batch 4, float64_truth.weights; the most for VGG, which
# has no residual path): an implementation that is not within this of the truth is wrong.
GRADIENT_TRUTH_BOUND = 2e-4


@pytest.mark.parametrize("name,kwargs", WHOLE_MODELS, ids=str)
def test_whole_models_against_float64_and_across_implementations(name, kwargs):
  """One jitted train-mode step of each implementation in float32 against the same weights in
  float64 (with the float32 run's ReLU decisions: tests/float64_truth.py): every gradient of
  the matmul path is as close to the truth as XLA's own (at most twice its worst error), and
  the loss, BN statistics and eval outputs agree. (V1 with groups > 1 runs its stages
  group-major under matmul: matmul.to_groups.)"""
  kwargs = {"stem": "small", "num_classes": 10, **kwargs}
  size = 64 if kwargs["stem"] == "imagenet" else 32
  # Batch 4: with 2, Stage 4's BN normalises 8 values a channel and amplifies float32 rounding
  # (measured: V2 with the ImageNet stem, loss 3e-5 and gradients 5e-4 from float64).
  x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
  state = f64.weights(name, kwargs)
  runs = {impl: f64.float32_run(name, kwargs, impl, state, x) for impl in ("xla", "matmul")}
  masks = [run["masks"] for run in runs.values()]
  truths = dict(zip(runs, f64.float64_runs(name, kwargs, state, x, masks)))
  worst = {}
  for impl, run in runs.items():
    truth = truths[impl]
    np.testing.assert_allclose(run["loss"], truth["loss"], rtol=1e-5)
    errors = f64.tree_error(run["grads"], truth["grads"])
    worst[impl] = max(errors.values())
    assert worst[impl] <= GRADIENT_TRUTH_BOUND, (impl, max(errors, key=errors.get), worst)
    for key, e in f64.tree_error(run["stats"], truth["stats"]).items():
      assert e <= 1e-5, (impl, key, e)
    assert f64.error(run["logits"], truth["logits"]) <= 1e-4
  assert worst["matmul"] <= 2 * worst["xla"], worst
  xla, matmul = runs["xla"], runs["matmul"]
  np.testing.assert_allclose(xla["loss"], matmul["loss"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(xla["stats"]), jax.tree.leaves(matmul["stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(xla["logits"], matmul["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("style", layers.SE_STYLES)
def test_squeeze_excite_against_float64_in_both_layouts_and_implementations(style):
  """Both SE styles in train mode (batch 16: the official SELayer's BN sees 16 values a
  channel), NHWC under both conv implementations and group-major (V1's matmul stages): output,
  input and parameter gradients against the XLA formulation in float64."""
  x = jax.random.normal(jax.random.key(0), (16, 6, 6, 48))
  cotangent = jax.random.normal(jax.random.key(1), x.shape)

  def run(impl, grouped, x, dtype=jnp.float32):
    se = layers.SqueezeExcite(48, style=style, conv_impl=impl, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(se, nnx.Param, ...)
    params = jax.tree.map(lambda p: p.astype(dtype) + 0.1, params)  # non-zero biases too
    rest = jax.tree.map(lambda r: r.astype(dtype), rest)

    def forward(params, x):
      module = nnx.merge(graphdef, params, rest, copy=True)
      if grouped:
        return matmul.from_groups(module.grouped(matmul.to_groups(x, 4), train=True))
      return module(x, train=True)
    y, vjp = jax.vjp(forward, params, x)
    return y, *vjp(cotangent.astype(dtype))

  with jax.enable_x64(True):
    truth = jax.device_get(run("xla", False, x.astype(jnp.float64), jnp.float64))
  for impl, grouped in (("xla", False), ("matmul", False), ("matmul", True)):
    got = jax.jit(run, static_argnums=(0, 1))(impl, grouped, x)
    errors = f64.tree_error(got, truth)
    assert max(errors.values()) <= 1e-5, (impl, grouped, errors)


def test_group_major_v1_in_bfloat16_agrees_with_xla():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  logits = [jitted.forward(get_model("shufflenet_v1", groups=3, scale=0.5, stem="small",
                                     num_classes=10, conv_impl=impl, dtype=jnp.bfloat16,
                                     seed=0), x, train=True)
            for impl in ("xla", "matmul")]
  assert logits[1].dtype == logits[0].dtype
  np.testing.assert_allclose(logits[0], logits[1], rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("pool", [layers.max_pool, layers.avg_pool], ids=lambda f: f.__name__)
@pytest.mark.parametrize("size", [7, 8, 112])
def test_shifted_slice_pooling_equals_reduce_window(pool, size):
  kx, kg = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (2, size, size, 5))
  outputs = []
  for impl in ("xla", "matmul"):
    y, vjp = jax.vjp(lambda x, impl=impl: pool(x, impl=impl), x)
    outputs.append((y, *vjp(jax.random.normal(kg, y.shape))))
  for a, b in zip(*outputs):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window():
  # All-equal windows (e.g. zeros after ReLU): PyTorch's rule, first in row-major window order.
  grad = jax.grad(lambda x: layers.max_pool(x, impl="matmul").sum())(jnp.zeros((1, 4, 4, 1)))
  expected = np.zeros((4, 4))
  expected[0, 0] = expected[0, 1] = expected[1, 0] = expected[1, 1] = 1
  np.testing.assert_array_equal(grad[0, :, :, 0], expected)


def test_group_major_layout_keeps_the_channel_order():
  x = jnp.arange(2 * 3 * 3 * 12, dtype=jnp.float32).reshape(2, 3, 3, 12)
  xg = matmul.to_groups(x, 3)
  assert xg.shape == (3, 2, 3, 3, 4)
  np.testing.assert_array_equal(xg[1, :, :, :, 2], x[..., 1 * 4 + 2])
  np.testing.assert_array_equal(matmul.from_groups(xg), x)
  shuffled = matmul.regroup(xg, lambda t: layers.channel_shuffle(t, 3))
  np.testing.assert_array_equal(matmul.from_groups(shuffled), layers.channel_shuffle(x, 3))
  with pytest.raises(ValueError, match="not divisible by groups=5"):
    matmul.to_groups(x, 5)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16], ids=["f32", "bf16"])
def test_batch_norm_grouped_equals_nnx_batch_norm(dtype):
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 12)) * 3 + 1
  reference = layers.batch_norm(12, dtype=dtype, rngs=nnx.Rngs(0))
  grouped = layers.batch_norm(12, dtype=dtype, rngs=nnx.Rngs(0))
  for bn in (reference, grouped):  # non-trivial affine parameters
    bn.scale[...] = jnp.linspace(0.5, 2.0, 12)
    bn.bias[...] = jnp.linspace(-1.0, 1.0, 12)
  tolerance = dict(rtol=1e-5, atol=1e-5) if dtype is None else dict(rtol=2e-2, atol=2e-2)
  for train in (True, False):
    expected = reference(x, use_running_average=not train)
    got = matmul.from_groups(matmul.batch_norm_grouped(grouped, matmul.to_groups(x, 3), train))
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               **tolerance)
    np.testing.assert_allclose(grouped.mean[...], reference.mean[...], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grouped.var[...], reference.var[...], rtol=1e-6, atol=1e-6)


def test_cpu_compiler_options_are_accepted_and_only_for_cpu():
  assert parallel.compiler_options("tpu") == {} and parallel.compiler_options("gpu") == {}
  options = parallel.compiler_options("cpu")
  assert options == parallel.CPU_COMPILER_OPTIONS
  step = jax.jit(lambda x: jnp.sin(x) @ x, compiler_options=options)
  np.testing.assert_allclose(step(jnp.eye(3)), np.sin(np.eye(3)), rtol=1e-6)
