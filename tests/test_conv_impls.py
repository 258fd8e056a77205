"""The conv implementations compute the same function, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflenet_jax.models import get_model
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
    ("shufflenet_v2", dict(scale=0.5)),
])
def test_whole_models_agree_across_implementations(name, kwargs):
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  outputs = []
  for impl in ("xla", "matmul"):
    model = get_model(name, stem="small", num_classes=10, conv_impl=impl, seed=0, **kwargs)
    loss = lambda m: jnp.sum(m(x, train=True) ** 2)
    value, grads = nnx.value_and_grad(loss)(model)
    outputs.append((value, grads))
  (v1, g1), (v2, g2) = outputs
  np.testing.assert_allclose(v1, v2, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)
