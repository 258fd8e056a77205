import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs import common
from shufflenet_jax import config_check

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


def _bad_value(key, default):
  """A value of the key's type that its rule in config_check.RULES rejects."""
  if isinstance(default, tuple):
    return (0.5, 0.1)
  if isinstance(default, str):
    return "5"
  candidates = [-1, 0, -2] if isinstance(default, int) else [-1.0, float("nan"), 1.5]
  rule = config_check.RULES[key][0]
  return next(c for c in candidates if not rule(c))


def test_every_shipped_config_passes_validation():
  for spec in CONFIG_FILES:
    config_check.validate(load(spec))
  config_check.validate(load("configs/shufflenet_v1.py:recipe=official"))
  config_check.validate(load("configs/default.py:smoke"))


@pytest.mark.parametrize("key", sorted(config_check.CHOICES))
def test_a_bad_choice_names_the_key_the_value_and_the_choices(key):
  config = load("configs/default.py")
  config[key] = "bogus"
  choices = re.escape(repr(config_check.CHOICES[key]))
  with pytest.raises(ValueError, match=rf"^config {key}='bogus' is not one of {choices}$"):
    config_check.validate(config)


@pytest.mark.parametrize("key", sorted(config_check.RULES))
def test_a_value_out_of_range_names_the_key_the_value_and_the_rule(key):
  config = load("configs/default.py")
  bad = _bad_value(key, config[key])
  config[key] = bad
  valid = re.escape(config_check.RULES[key][1])
  with pytest.raises(ValueError, match=rf"^config {key}={re.escape(repr(bad))} is not valid: "
                                       rf"must be {valid}$"):
    config_check.validate(config)


def test_epochs_that_train_nothing_are_refused():
  config = load("configs/default.py")
  config.num_epochs, config.total_steps = 0.0, 0
  with pytest.raises(ValueError, match="num_epochs=0.0 with total_steps=0 trains nothing"):
    config_check.validate(config)


@pytest.mark.parametrize("flag,message", [
    ("--config.total_steps=-1", "config total_steps=-1 is not valid: must be an integer >= 0 "
                               "(0: use num_epochs)"),
    ("--config.augment=flip", "config augment='flip' is not one of ('small', 'imagenet')"),
    ("--config.lr=nan", "config lr=nan is not valid: must be a finite number >= 0"),
    ("--config.conv_impl=fast", "config conv_impl='fast' is not one of ('auto', 'xla', "
                                "'matmul')"),
    ("--config.input_size=0", "config input_size=0 is not valid: must be an integer > 0"),
    ("--config.crop_area=(0.9,0.5)", "config crop_area=(0.9, 0.5) is not valid: must be (low, "
                                     "high) with 0 < low <= high <= 1"),
    ("--config.batch_size=-16", "config batch_size=-16 is not valid: must be an integer > 0"),
    ("--config.num_workers=-2", "config num_workers=-2 is not valid: must be an integer >= 0 "
                                "(0: decode in-process) or auto (-1: from the host's cores)"),
])
def test_launch_train_refuses_a_bad_value_in_one_line_and_writes_nothing(flag, message,
                                                                         tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, "launch.py", "train", "--config=configs/default.py",
                           f"--workdir={workdir}", flag], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == f"error: {message}", result.stderr
  assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
      f"error: {message}"]
  assert not workdir.exists()
