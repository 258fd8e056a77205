import jax
import pytest

from shufflenet_jax import complexity, summary
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


def test_se_models_reach_the_papers_complexity_within_2_percent():
  """V1 paper Table 5 (2x g=3 with SE: 527M) and V2 paper Table 8 (2x with SE: 597M); the SE
  layers' own MACs are those of their two layers (hand formula)."""
  v1 = _mflops("shufflenet_v1", groups=3, scale=2.0, se=True)
  v2 = _mflops("shufflenet_v2", scale=2.0, layout="official", se=True)
  assert v1 == pytest.approx(527, rel=0.02) and v2 == pytest.approx(597, rel=0.02)
  # SENet's block, reduction 16: 2 * C * C/16 per unit on the branch's C output channels.
  branch = [480 - 48] + [480] * 3 + [960 - 480] + [960] * 7 + [1920 - 960] + [1920] * 3
  se_macs = sum(2 * c * (c // 16) for c in branch)
  assert v1 * 1e6 - _mflops("shufflenet_v1", groups=3, scale=2.0) * 1e6 == pytest.approx(se_macs)
  # Megvii's SELayer, reduction 4, on the main branch (official layout: stride-2 units make
  # out - in channels there, stride-1 units out / 2).
  main = [244 - 24] + [122] * 3 + [488 - 244] + [244] * 7 + [976 - 488] + [488] * 3
  se_macs = sum(2 * c * (c // 4) for c in main)
  plain = _mflops("shufflenet_v2", scale=2.0, layout="official")
  assert v2 * 1e6 - plain * 1e6 == pytest.approx(se_macs)
  # The config args the README gives for these rows build these models.
  from configs import common
  for spec, expected in (("configs/shufflenet_v1.py:groups=3,scale=2.0,se=true", v1),
                         ("configs/shufflenet_v2.py:scale=2.0,se=true,recipe=official", v2)):
    model = summary.abstract_model(common.load_config(spec))
    assert complexity.model_macs(model) / 1e6 == pytest.approx(expected)
  with pytest.raises(ValueError, match=r"se_style='x' is not one of \('senet', 'official'\)"):
    get_model("shufflenet_v2", se=True, se_style="x", abstract=True)


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
