"""The conv implementations compute the same function, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflenet_jax import parallel
from shufflenet_jax.models import get_model, layers
from shufflenet_jax.models.layers import conv2d

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


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("size", [7, 8])
def test_matmul_equals_xla_forward_and_gradients(case, dtype, size):
  cin, cout, k, stride, groups = case
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, size, size, cin), dtype)
  kernel = (jax.random.normal(kk, (k, k, cin // groups, cout)) * 0.3).astype(dtype)
  cotangent = None

  def run(impl):
    f = lambda x, w: conv2d(x, w, stride=stride, padding=(k - 1) // 2, groups=groups, impl=impl)
    y, vjp = jax.vjp(f, x, kernel)
    nonlocal cotangent
    if cotangent is None:
      cotangent = jax.random.normal(kg, y.shape, dtype)
    return (y, *vjp(cotangent))

  reference, fast = run("xla"), run("matmul")
  for a, b in zip(reference, fast):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               **TOLERANCE[dtype])


@pytest.mark.parametrize("name,kwargs", [
    ("shufflenet_v1", dict(groups=3, scale=0.5)),
    ("shufflenet_v1", dict(groups=8, scale=0.25)),
    ("shufflenet_v1", dict(groups=2, scale=0.5, shuffle=False)),
    ("shufflenet_v1", dict(groups=4, scale=0.5, shuffle_order="official")),
    ("shufflenet_v1", dict(groups=3, scale=0.25, stem="imagenet")),  # max pool in the stem
    ("shufflenet_v1", dict(groups=1, scale=0.25)),
    ("shufflenet_v2", dict(scale=0.5)),
    ("shufflenet_v2", dict(scale=0.5, stem="imagenet")),
])
def test_whole_models_agree_across_implementations(name, kwargs):
  """Loss, every gradient, the BN statistics a train step writes and eval-mode outputs.
  (V1 with groups > 1 runs its stages group-major under matmul: layers.to_groups.)"""
  kwargs = {"stem": "small", **kwargs}
  size = 64 if kwargs["stem"] == "imagenet" else 32
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  outputs = []
  for impl in ("xla", "matmul"):
    model = get_model(name, num_classes=10, conv_impl=impl, seed=0, **kwargs)
    loss = lambda m: jnp.sum(m(x, train=True) ** 2)
    value, grads = nnx.value_and_grad(loss)(model)  # also updates the BN running statistics
    outputs.append((value, grads, nnx.state(model, nnx.BatchStat), model(x, train=False)))
  (v1, g1, s1, e1), (v2, g2, s2, e2) = outputs
  np.testing.assert_allclose(v1, v2, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):  # float32 summation-order noise
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=5e-4 * max(1.0, float(jnp.abs(a).max())))
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(e1, e2, rtol=1e-4, atol=1e-4)


def test_group_major_v1_in_bfloat16_agrees_with_xla():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  logits = [get_model("shufflenet_v1", groups=3, scale=0.5, stem="small", num_classes=10,
                      conv_impl=impl, dtype=jnp.bfloat16, seed=0)(x, train=True)
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
  xg = layers.to_groups(x, 3)
  assert xg.shape == (3, 2, 3, 3, 4)
  np.testing.assert_array_equal(xg[1, :, :, :, 2], x[..., 1 * 4 + 2])
  np.testing.assert_array_equal(layers.from_groups(xg), x)
  shuffled = layers.regroup(xg, lambda t: layers.channel_shuffle(t, 3))
  np.testing.assert_array_equal(layers.from_groups(shuffled), layers.channel_shuffle(x, 3))
  with pytest.raises(ValueError, match="not divisible by groups=5"):
    layers.to_groups(x, 5)


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
    got = layers.from_groups(layers.batch_norm_grouped(grouped, layers.to_groups(x, 3), train))
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
