import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs import common

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.py")
                      if p.name not in ("__init__.py", "common.py"))


def load(spec: str):
  return common.load_config(str(ROOT / spec))


def test_parse_arg_types_and_bare_flags():
  args = common.parse_arg("groups=8,scale=0.5,shuffle=false,smoke,name=x",
                          groups=3, scale=1.0, shuffle=True, smoke=False, name="a")
  assert args.to_dict() == dict(groups=8, scale=0.5, shuffle=False, smoke=True, name="x")
  assert common.parse_arg(None, groups=3).groups == 3


@pytest.mark.parametrize("arg,message", [
    ("grups=3", r"unknown config arg 'grups'; valid args: \['groups', 'scale'\]"),
    ("groups=three", "config arg groups='three' is not a valid int"),
    ("scale=big", "config arg scale='big' is not a valid float"),
])
def test_parse_arg_errors_name_the_bad_value(arg, message):
  with pytest.raises(ValueError, match=message):
    common.parse_arg(arg, groups=3, scale=1.0)


def test_bool_error_lists_valid_words():
  with pytest.raises(ValueError, match="shuffle='maybe' is not a valid one of"):
    common.parse_arg("shuffle=maybe", shuffle=True)


@pytest.mark.parametrize("spec,message", [
    ("configs/shufflenet_v1.py:groups=5", r"groups=5 is not one of \(1, 2, 3, 4, 8\)"),
    ("configs/shufflenet_v1.py:recipe=fast", "recipe='fast' is not one of"),
    ("configs/shufflenet_v2.py:scale=0.75", "scale=0.75 is not one of"),
    ("configs/shufflenet_v1.py:bn_mode=sync", "bn_mode='sync' is not one of"),
])
def test_config_files_reject_bad_values(spec, message):
  with pytest.raises(ValueError, match=message):
    load(spec)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_config_builds_with_and_without_smoke(path):
  from shufflenet_jax.models import MODELS
  paper_config = "proxy=false" in (ROOT / path).read_text()
  for arg in ("", "smoke") + (("proxy",) if paper_config else ()):
    config = load(f"{path}:{arg}")
    assert config.model in MODELS
    assert config.batch_size > 0
  if paper_config:  # proxy = the same model on Fashion-MNIST: minutes on a CPU
    proxy = load(f"{path}:proxy")
    assert (proxy.dataset, proxy.input_size, proxy.in_channels) == ("fashion_mnist", 28, 1)
    assert proxy.model_kwargs.stem == "imagenet"  # same model, cost / 64
  assert "python launch.py train" in (ROOT / path).read_text()  # docstring shows the launch


def test_paper_and_official_recipes():
  paper = load("configs/shufflenet_v1.py:groups=3,scale=0.5")
  assert (paper.batch_size, paper.lr, paper.total_steps, paper.weight_decay) == (
      1024, 0.5, 300_000, 4e-5)
  assert paper.lr_schedule == "linear" and tuple(paper.crop_area) == (0.49, 1.0)
  official = load("configs/shufflenet_v1.py:recipe=official")
  assert official.label_smoothing == 0.1 and official.input_format == "bgr_255"
  assert official.model_kwargs.shuffle_order == "official"


def test_summary_cli_prints_table_and_json():
  out = subprocess.run(
      [sys.executable, "launch.py", "summary",
       "--config=configs/shufflenet_v1.py:groups=8,scale=0.5", "--json"],
      cwd=ROOT, capture_output=True, text=True, check=True, timeout=120).stdout
  lines = out.strip().splitlines()
  assert any(line.startswith("stage3") for line in lines)
  summary = json.loads(lines[-1])
  assert summary["model"] == "shufflenet_v1" and summary["input_size"] == 224
  assert summary["macs"] == pytest.approx(40e6, rel=0.015)
  assert summary["params"] > 0
