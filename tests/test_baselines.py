import jax.numpy as jnp
import pytest

from shufflenet_jax import complexity
from shufflenet_jax.models import baselines, get_model
from tests.test_models import _filled, _forward


def _mflops(name, **kwargs):
  return complexity.model_macs(get_model(name, abstract=True, conv_impl="xla", **kwargs)) / 1e6


@pytest.mark.parametrize("unit,target", sorted(baselines.TABLE4_WIDTHS))
def test_table4_baselines_land_within_5_percent(unit, target):
  width = baselines.TABLE4_WIDTHS[(unit, target)]
  assert _mflops("table4_baseline", unit=unit, width=width) == pytest.approx(target, rel=0.05)


@pytest.mark.parametrize("target", sorted(baselines.XCEPTION_SCALES))
def test_xception_like_is_shufflenet_g1_without_shuffle(target):
  kwargs = baselines.xception_like(target)
  assert kwargs["groups"] == 1 and kwargs["shuffle"] is False
  assert _mflops("shufflenet_v1", **kwargs) == pytest.approx(target, rel=0.05)


@pytest.mark.parametrize("width,paper,params", [(0.25, 41, 470_072), (0.5, 149, 1_331_592),
                                                (0.75, 325, 2_585_560), (1.0, 569, 4_231_976)])
def test_mobilenet_v1_matches_its_published_complexity(width, paper, params):
  model = get_model("mobilenet_v1", width=width, abstract=True, conv_impl="xla")
  assert complexity.model_macs(model) / 1e6 == pytest.approx(paper, rel=0.01)
  assert complexity.count_params(model) == params  # 4.2 M at 1.0, as published
  rows = complexity.layer_table(model)  # per-layer params add up (checked inside)
  assert rows[-1]["output_shape"] == (1000,)


@pytest.mark.parametrize("name,kwargs", [
    ("table4_baseline", dict(unit="vgg", width=24)),
    ("table4_baseline", dict(unit="resnet", width=16)),
    ("table4_baseline", dict(unit="resnext", width=12)),
    ("mobilenet_v1", dict(width=0.25)),
])
def test_baselines_run_forward(name, kwargs):
  model = get_model(name, stem="small", num_classes=10, abstract=True, **kwargs)
  y = _forward(_filled(model), jnp.ones((2, 32, 32, 3)))
  assert y.shape == (2, 10) and bool(jnp.all(jnp.isfinite(y)))


def test_bad_baseline_arguments():
  with pytest.raises(ValueError, match="unit='xception' is not one of"):
    get_model("table4_baseline", unit="xception", abstract=True)
  with pytest.raises(ValueError, match="width=10 must be a positive multiple of 4"):
    get_model("table4_baseline", unit="resnet", width=10, abstract=True)
  with pytest.raises(ValueError, match="width=0.3 is not one of"):
    get_model("mobilenet_v1", width=0.3, abstract=True)
