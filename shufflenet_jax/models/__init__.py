"""Model registry: `get_model(name, **kwargs)` is how configs, tests and tools build models."""

from __future__ import annotations

import inspect

import jax
from flax import nnx

from shufflenet_jax.models.baselines import MobileNetV1, Table4Baseline
from shufflenet_jax.models.shufflenet_v1 import ShuffleNetV1
from shufflenet_jax.models.shufflenet_v2 import ShuffleNetV2

MODELS = {
    "shufflenet_v1": ShuffleNetV1,
    "shufflenet_v2": ShuffleNetV2,
    "table4_baseline": Table4Baseline,  # vgg / resnet / resnext units in v1's macro layout
    "mobilenet_v1": MobileNetV1,
}


def model_class(name: str) -> type[nnx.Module]:
  if name not in MODELS:
    raise ValueError(f"model={name!r} is not one of {sorted(MODELS)}")
  return MODELS[name]


def get_model(name: str, *, seed: int = 0, abstract: bool = False, **kwargs) -> nnx.Module:
  """Builds model `name`; errors name the valid models and arguments.

  Parameters are initialised inside one jitted program with an RBG key: eager per-layer
  initialisation compiles one small XLA program per parameter shape, which dominated start-up
  on a 2-core CPU. `abstract=True` returns shapes only (`nnx.eval_shape`).
  """
  cls = model_class(name)
  valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "rngs")]
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(f"{name} got unknown argument(s) {unknown}; valid: {valid}")

  def construct():
    return cls(**kwargs, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))

  model = nnx.eval_shape(construct)  # also validates every argument before any compile
  if abstract:
    return model
  graphdef, _ = nnx.split(model)
  state = jax.jit(lambda: nnx.split(construct())[1])()
  return nnx.merge(graphdef, state)
