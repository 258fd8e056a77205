"""Float64 truth for the numerics tests: the same weights and inputs computed in float64.

A model is piecewise smooth: ReLU switches where its input crosses zero. Float32 rounding moves
a pre-activation that lies within ~1e-6 of zero to the other side (measured: -9.3e-7 in float64,
+3.5e-7 in float32 in one of 7,680 values of v1 g3's stage3 unit 5), and the float32 gradient
is then the exact gradient of a neighbouring branch: 1e-2 away from float64's, for either conv
implementation, depending only on how the CPU rounded. So the reference replays the ReLU
decisions of the float32 run it checks (`relu_decisions`), and the float64 run is the XLA
formulation (standard convs, plain autodiff), never the custom VJPs under test.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shufflenet_jax import parallel
from shufflenet_jax.models import get_model, matmul
from tests import jitted

_RELU = jax.nn.relu


@contextlib.contextmanager
def relu_decisions(record: list | None = None, replay=None):
  """While active, every `jax.nn.relu` appends `x > 0` to `record`, or applies the next mask of
  `replay` (in x's layout: float64_runs converts group-major ones) instead of its own comparison."""
  masks = iter(replay) if replay is not None else None

  def relu(x):
    if masks is not None:
      mask = next(masks)
      if mask.shape != x.shape:
        raise ValueError(f"recorded ReLU decision {mask.shape} does not fit an input {x.shape}")
      return jnp.where(mask, x, jnp.zeros((), x.dtype))
    record.append(x > 0)
    return _RELU(x)

  jax.nn.relu = relu
  try:
    yield
  finally:
    jax.nn.relu = _RELU


def error(value, truth) -> float:
  """max |value - truth|, relative to max(1, max |truth|) (the tests' scale-aware metric)."""
  truth = np.asarray(truth, np.float64)
  scale = max(1.0, float(np.abs(truth).max())) if truth.size else 1.0
  return float(np.abs(np.asarray(value, np.float64) - truth).max(initial=0.0) / scale)


def _as_float64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)
                      if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _train_step_outputs(graphdef, state, x):
  """(loss, gradients, BN statistics after the step, recorded ReLU decisions) of one train-mode
  forward/backward of sum(logits^2)."""
  def loss(params, rest):
    model = nnx.merge(graphdef, params, rest, copy=True)
    record = []
    with relu_decisions(record=record):
      logits = model(x, train=True)
    return jnp.sum(logits.astype(jnp.float32) ** 2), (nnx.state(model, nnx.BatchStat), record)

  params, rest = state
  (value, (stats, record)), grads = jax.value_and_grad(loss, has_aux=True)(params, rest)
  return value, grads, stats, record


def weights(name: str, kwargs: dict, seed: int = 0) -> tuple:
  """(params, other state) on the host, the same for every conv implementation (they share
  parameters, checkpoints and layouts), distributed as the model's own initialisation: He-normal
  kernels, N(0, 0.01) for the classifier, BN scale 1 and shift 0, running mean 0 and variance 1.
  Drawn with numpy from the abstract model: compiling the model's initialiser costs ~3 s per
  model and is not under test. (GRADIENT_TRUTH_BOUND was measured on this distribution.)"""
  model = get_model(name, conv_impl="xla", abstract=True, **kwargs)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    shape, key = leaf.shape, jax.tree_util.keystr(path)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return np.zeros(shape, leaf.dtype)
    if "['scale']" in key or "['var']" in key:
      return np.ones(shape, np.float32)
    if len(shape) < 2:  # biases, BN shifts and running means
      return np.zeros(shape, np.float32)
    std = 0.01 if len(shape) == 2 else np.sqrt(2.0 / np.prod(shape[:-1]))  # dense: classifier
    return rng.normal(0.0, std, shape).astype(np.float32)

  draw_all = lambda tree: jax.tree_util.tree_map_with_path(draw, tree)
  return draw_all(params), draw_all(rest)


def _graphdef(name: str, kwargs: dict, impl: str):
  model = get_model(name, conv_impl=impl, abstract=True, **kwargs)
  return nnx.split(model, nnx.Param, ...)[0]


def float32_run(name: str, kwargs: dict, impl: str, state, x):
  """What training computes: one jitted train-mode step of the model on `state` (compiler
  options as train.py uses them), plus its eval-mode logits."""
  graphdef = _graphdef(name, kwargs, impl)

  def step(state, x):
    value, grads, stats, record = _train_step_outputs(graphdef, state, x)
    return value, grads, stats, record, nnx.merge(graphdef, *state)(x, train=False)

  value, grads, stats, record, logits = jax.jit(
      step, compiler_options=parallel.compiler_options())(state, x)
  return dict(loss=value, grads=grads, stats=stats, logits=logits,
              masks=[np.asarray(m) for m in record])


def float64_runs(name: str, kwargs: dict, state, x, mask_sets):
  """The XLA formulation in float64 on the same weights, once for each set of ReLU decisions in
  `mask_sets` (compiled without XLA's optimisations: the truth need not be fast)."""
  graphdef = _graphdef(name, kwargs, "xla")

  def run(state, x, masks):
    def loss(params, rest):
      model = nnx.merge(graphdef, params, rest, copy=True)
      with relu_decisions(replay=masks):
        logits = model(x, train=True)
      return jnp.sum(logits ** 2), nnx.state(model, nnx.BatchStat)
    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(*state)
    return dict(loss=value, grads=grads, stats=stats,
                logits=nnx.merge(graphdef, *state)(x, train=False))

  # The float64 model is NHWC: group-major decisions (V1 stages under matmul) are converted
  # first, so that one compile serves every set (the masks are arguments).
  mask_sets = [[np.asarray(matmul.from_groups(m)) if m.ndim == 5 else m for m in masks]
               for masks in mask_sets]
  with jitted.xla_optimisations(False), jax.enable_x64(True):
    step = jax.jit(run)
    state, x = _as_float64(state), _as_float64(x)
    results = []
    for masks in mask_sets:  # both implementations usually decide every ReLU alike: run once
      same = next((r for m, r in results
                   if len(m) == len(masks) and all(map(np.array_equal, m, masks))), None)
      results.append((masks, same if same is not None else
                      jax.device_get(step(state, x, masks))))
    return [r for _, r in results]


def tree_error(values, truth) -> dict[str, float]:
  """error() of every leaf, keyed by its path."""
  flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in jax.tree.leaves_with_path(tree)}
  values, truth = flat(values), flat(truth)
  assert values.keys() == truth.keys()
  return {k: error(values[k], truth[k]) for k in values}
