"""PyTorch weights in (without PyTorch), prediction, and StableHLO export round trips.

The fixture comes from tests/fixtures/make_torchvision_fixture.py, run once in a separate
PyTorch environment: torchvision's own ShuffleNetV2 0.5x, its state_dict, inputs and logits.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import common
from shufflenet_jax import predict
from shufflenet_jax.data import preprocess
from shufflenet_jax.interop import export, fold, megvii, torch_pickle, torchvision_v2
from shufflenet_jax.models import get_model, layers
from tests import jitted, processes

FIXTURES = Path(__file__).parent / "fixtures"
WEIGHTS = FIXTURES / "torchvision_v2_x0_5.pth"


@pytest.fixture(scope="module")
def fixture():
  return torch_pickle.load_state_dict(WEIGHTS), np.load(FIXTURES / "torchvision_v2_x0_5.npz")


@pytest.mark.parametrize("conv_impl", ["xla", "matmul"])
def test_torchvision_weights_give_torchvisions_logits(fixture, conv_impl):
  state_dict, expected = fixture
  kwargs = torchvision_v2.model_kwargs(state_dict)
  assert kwargs == {"scale": 0.5, "num_classes": 10, "in_channels": 3}
  model = get_model("shufflenet_v2", scale=0.5, num_classes=10, conv_impl=conv_impl)
  torchvision_v2.load_into(model, state_dict)
  logits = np.asarray(jitted.forward(model, expected["images_nchw"].transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(logits, expected["logits"], rtol=1e-4, atol=1e-5)
  assert np.abs(expected["logits"]).max() > 0.05  # a real signal, not all zeros


OFFICIAL = {  # fixture -> (model kwargs reader, loader, model, layout options)
    "megvii_v1_g3_0.5x": (megvii.v1_model_kwargs, megvii.load_v1_into, "shufflenet_v1",
                          dict(shuffle_order="official", fc_bias=False)),
    "megvii_v2_0.5x": (megvii.v2_model_kwargs, megvii.load_v2_into, "shufflenet_v2",
                       dict(layout="official")),
}


@pytest.mark.parametrize("conv_impl", ["xla", "matmul"])
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_megvii_weights_give_the_official_models_logits(name, conv_impl):
  read_kwargs, load_into, model_name, layout = OFFICIAL[name]
  state_dict = torch_pickle.load_state_dict(FIXTURES / f"{name}.pth")  # "module." keys
  kwargs = read_kwargs(state_dict)
  assert kwargs["scale"] == 0.5 and kwargs["num_classes"] == 10
  model = get_model(model_name, **kwargs, **layout, conv_impl=conv_impl)
  load_into(model, state_dict)
  expected = np.load(FIXTURES / f"{name}.npz")
  logits = np.asarray(jitted.forward(model, expected["images_bgr_nchw"].transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(logits, expected["logits"], rtol=1e-4, atol=2e-5)
  # The paper's channel order cannot hold these weights: the layout option is what makes them fit.
  if model_name == "shufflenet_v1":
    wrong = get_model(model_name, **kwargs, conv_impl=conv_impl)
    with pytest.raises(ValueError, match="shuffle_order='official'"):
      load_into(wrong, state_dict)


def test_official_recipe_evaluates_bgr_0_255_with_the_official_layouts(tmp_path):
  v1 = common.load_config("configs/shufflenet_v1.py:groups=3,scale=0.5,recipe=official")
  assert v1.model_kwargs.shuffle_order == "official" and v1.model_kwargs.fc_bias is False
  v2 = common.load_config("configs/shufflenet_v2.py:scale=0.5,recipe=official")
  assert v2.model_kwargs.layout == "official"
  image = np.random.default_rng(0).integers(0, 255, (300, 280, 3), dtype=np.uint8)
  path = tmp_path / "photo.png"
  Image.fromarray(image).save(path)
  expected = preprocess.resize_center_crop(image, 256, 224)[..., ::-1].astype(np.float32)
  np.testing.assert_array_equal(predict.model_input(v1, str(path)), expected)


def test_legacy_torch_save_format_reads_strided_tensors_and_scalars():
  state = torch_pickle.load_state_dict(FIXTURES / "legacy_format.pth")
  np.testing.assert_array_equal(state["weight"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
  assert state["count"] == 7 and state["count"].dtype == np.int64


def test_wrong_weights_are_refused_with_the_key(fixture):
  state_dict, _ = fixture
  model = get_model("shufflenet_v2", scale=0.5, num_classes=10)
  missing = {k: v for k, v in state_dict.items() if k != "conv5.1.running_var"}
  with pytest.raises(ValueError, match="conv5.1.running_var"):
    torchvision_v2.load_into(model, missing)
  extra = {**state_dict, "head.weight": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match="not used by the conversion: \\['head.weight'\\]"):
    torchvision_v2.load_into(model, extra)
  wrong_model = get_model("shufflenet_v2", scale=1.0, num_classes=10)
  with pytest.raises(ValueError, match="does not fit"):
    torchvision_v2.load_into(wrong_model, state_dict)


def _launch(*args):
  return subprocess.run([sys.executable, "launch.py", *args], cwd=processes.ROOT,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_import_predict_and_export_through_the_command_line(fixture, tmp_path):
  workdir = tmp_path / "imported"
  out = _launch("import", "--from=torchvision", f"--weights={WEIGHTS}", f"--workdir={workdir}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ShuffleNetV2 0.5x, 10 classes" in out.stdout
  again = _launch("import", f"--weights={WEIGHTS}", f"--workdir={workdir}")
  assert again.returncode == 1 and "already holds checkpoints" in again.stderr

  image = tmp_path / "photo.png"
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (300, 260, 3), dtype=np.uint8)).save(image)
  out = _launch("predict", f"--workdir={workdir}", str(image), str(image))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [line for line in out.stdout.splitlines() if line.startswith(str(image))]
  assert len(lines) == 2 and lines[0] == lines[1]
  probabilities = [float(item.split()[-1]) for item in lines[0].split(": ", 1)[1].split(", ")]
  assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
  assert 0 < sum(probabilities) <= 1.0001

  official = tmp_path / "official_v1"
  out = _launch("import", "--from=megvii_v1", f"--weights={FIXTURES / 'megvii_v1_g3_0.5x.pth'}",
                f"--workdir={official}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "megvii_v1 ShuffleNetV1 0.5x g=3, 10 classes" in out.stdout
  saved = (official / "config.json").read_text()
  assert '"input_format": "bgr_255"' in saved and '"shuffle_order": "official"' in saved

  artifact = tmp_path / "v2.stablehlo"
  out = _launch("export", f"--workdir={workdir}", "--format=stablehlo", f"--output={artifact}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "reloaded and checked" in out.stdout
  # The artifact runs without our code and matches the torchvision-converted model.
  state_dict, _ = fixture
  model = get_model("shufflenet_v2", scale=0.5, num_classes=10)
  torchvision_v2.load_into(model, state_dict)
  images = rng.normal(size=(3, 224, 224, 3)).astype(np.float32)
  exported = export.load_stablehlo(artifact)
  np.testing.assert_allclose(np.asarray(exported.call(images)),
                             np.asarray(jitted.forward(model, images)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, kwargs", [("shufflenet_v1", dict(groups=3, scale=0.5)),
                                          ("shufflenet_v1", dict(groups=8, scale=0.5,
                                                                 shuffle_order="official")),
                                          ("shufflenet_v2", dict(scale=0.5))])
def test_folded_bn_and_gather_shuffle_compute_the_same_function(name, kwargs):
  model = get_model(name, **kwargs)
  rng = np.random.default_rng(0)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, layers.ConvBN):  # non-trivial statistics, as after training
      module.bn.mean[...] = rng.uniform(-0.5, 0.5, module.bn.mean.shape)
      module.bn.var[...] = rng.uniform(0.5, 2.0, module.bn.var.shape)
  images = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
  expected = np.asarray(jitted.forward(model, images))
  assert fold.fold_batch_norm(model) > 40
  with layers.shuffle_as_gather():  # traced inside: the gather is what runs
    got = np.asarray(jitted.forward(model, images))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.slow
@pytest.mark.parametrize("source, weights", [("torchvision", "torchvision_v2_x0_5.pth"),
                                             ("megvii_v1", "megvii_v1_g3_0.5x.pth")])
def test_tflite_export_matches_the_jax_model(source, weights, tmp_path):
  python = os.environ.get("TFLITE_PYTHON", str(processes.ROOT / ".venv-tflite/bin/python"))
  assert Path(python).exists(), f"{python} is missing: `make setup-tflite` builds it"
  workdir = tmp_path / "w"
  out = _launch("import", f"--from={source}", f"--weights={FIXTURES / weights}",
                f"--workdir={workdir}")
  assert out.returncode == 0, out.stderr[-3000:]
  artifact = tmp_path / "model.tflite"
  out = subprocess.run([python, "launch.py", "export", f"--workdir={workdir}", "--format=tflite",
                        f"--output={artifact}"], cwd=processes.ROOT, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "reloaded and checked" in out.stdout  # export runs the interpreter against JAX
  ops = next(line for line in out.stdout.splitlines() if line.startswith("TFLite ops: "))
  assert "CONV_2D" in ops and "GATHER" in ops  # the shuffle as a 4-D gather
  assert "DELEGATE" in ops  # XNNPACK took (part of) the graph
