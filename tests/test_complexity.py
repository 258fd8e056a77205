import jax
import pytest

from shufflenet_jax import complexity
from shufflenet_jax.models import get_model
from shufflenet_jax.models.layers import conv2d


def _mflops(name, **kwargs):
  model = get_model(name, abstract=True, conv_impl="xla", **kwargs)
  return complexity.model_macs(model) / 1e6


@pytest.mark.parametrize("groups,paper", [(1, 143), (2, 140), (3, 137), (4, 133), (8, 137)])
def test_v1_table1_complexity_within_1_5_percent(groups, paper):
  assert _mflops("shufflenet_v1", groups=groups) == pytest.approx(paper, rel=0.015)


@pytest.mark.parametrize("groups,scale,official", [
    (3, 0.5, 38), (3, 1.0, 138), (3, 1.5, 292), (3, 2.0, 524),
    (8, 0.5, 40), (8, 1.0, 138), (8, 1.5, 290), (8, 2.0, 522)])
def test_v1_official_lists_complexity(groups, scale, official):
  assert _mflops("shufflenet_v1", groups=groups, scale=scale) == pytest.approx(official, rel=0.015)


@pytest.mark.parametrize("scale,expected", [(0.5, 40.5), (1.0, 144.9), (1.5, 295.8),
                                            (2.0, 583.3)])
def test_v2_complexity(scale, expected):
  assert _mflops("shufflenet_v2", scale=scale) == pytest.approx(expected, abs=0.05)


def test_counting_matches_hand_formula_for_one_conv():
  # conv1 of v1 at 224: 112*112 outputs x 24 channels x 3*3*3 inputs.
  model = get_model("shufflenet_v1", groups=3, abstract=True, conv_impl="xla")
  rows = {r["name"]: r for r in complexity.layer_table(model)}
  assert rows["conv1"]["macs"] == 112 * 112 * 24 * 27
  assert rows["conv1"]["params"] == 3 * 3 * 3 * 24 + 2 * 24  # kernel + BN scale/bias
  assert rows["fc"]["macs"] == 960 * 1000
  assert rows["maxpool"]["macs"] == rows["global_pool"]["macs"] == 0


def test_grouped_conv_counts_one_group_of_inputs():
  # 1x1 conv, 12 -> 6 channels, groups=3, 4x4 output: 16 * 6 * (12/3) MACs, both implementations.
  x = jax.ShapeDtypeStruct((1, 4, 4, 12), "float32")
  k = jax.ShapeDtypeStruct((1, 1, 4, 6), "float32")
  for impl in ("xla", "matmul"):
    macs = complexity.function_macs(lambda x, k, impl=impl: conv2d(x, k, groups=3, impl=impl), x, k)
    assert macs == 16 * 6 * 4, impl
