"""Forward+backward time of single layers at ShuffleNet v1 1x g3 Stage2 shapes (batch 32):
where the train step's time goes on this machine. Backs the "what limits it" notes in
BENCHMARKS.md.

  python benchmarks/layer_micro.py
"""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shufflenet_jax import parallel  # noqa: E402
from shufflenet_jax.models import layers, matmul  # noqa: E402


def fwd_bwd_ms(f, *args, repeats: int = 20) -> float:
  """Mean milliseconds of jit(grad(sum(f(*args)**2))) with respect to every argument."""
  g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=tuple(range(len(args)))),
              compiler_options=parallel.compiler_options())
  jax.block_until_ready(g(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = g(*args)
  jax.block_until_ready(out)
  return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
  key = jax.random.key(0)
  x60 = jax.random.normal(key, (32, 28, 28, 60))
  x240 = jax.random.normal(key, (32, 28, 28, 240))
  rows = []
  for impl in ("xla", "matmul"):
    rows.append((f"depthwise 3x3, 32x28x28x60, {impl}", fwd_bwd_ms(
        lambda x, w, i=impl: layers.conv2d(x, w, padding=1, groups=60, impl=i), x60,
        jax.random.normal(key, (3, 3, 1, 60)))))
    rows.append((f"grouped 1x1 g3, 240->60, {impl}", fwd_bwd_ms(
        lambda x, w, i=impl: layers.conv2d(x, w, groups=3, impl=i), x240,
        jax.random.normal(key, (1, 1, 80, 60)))))
  conv = layers.Conv(240, 60, 1, groups=3, conv_impl="matmul", rngs=nnx.Rngs(0))
  graphdef_conv, conv_state = nnx.split(conv)
  rows.append(("grouped 1x1 g3, 240->60, matmul on group-major [3,32,28,28,80]", fwd_bwd_ms(
      lambda x, s: nnx.merge(graphdef_conv, s).grouped(x), matmul.to_groups(x240, 3),
      conv_state)))
  rows.append(("dense 1x1, 240->60, matmul", fwd_bwd_ms(
      lambda x, w: layers.conv2d(x, w, impl="matmul"), x240,
      jax.random.normal(key, (1, 1, 240, 60)))))
  graphdef, state = nnx.split(layers.batch_norm(240, rngs=nnx.Rngs(0)))
  rows.append(("BatchNorm (train), 32x28x28x240", fwd_bwd_ms(
      lambda x, s: nnx.merge(graphdef, s, copy=True)(x, use_running_average=False), x240,
      state)))
  rows.append(("ReLU(x + y), 32x28x28x240", fwd_bwd_ms(lambda x, y: jax.nn.relu(x + y), x240,
                                                        x240)))
  rows.append(("channel shuffle g3 (x * y), 32x28x28x240", fwd_bwd_ms(
      lambda x, y: layers.channel_shuffle(x, 3) * y, x240, x240)))
  print("| layer (forward + backward, batch 32) | ms |\n| --- | --- |")
  for name, ms in rows:
    print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
  main()
