"""`launch.py predict --workdir=W IMAGE...`: top-5 classes of image files (eval transform)."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from shufflenet_jax import parallel, train
from shufflenet_jax.data import fashion_mnist, pipeline, preprocess


def class_names(config) -> list[str] | None:
  """The dataset's class names; None when its prepared files are not on this machine."""
  if config.dataset == "fashion_mnist":
    return list(fashion_mnist.CLASS_NAMES)
  try:
    return pipeline.load_dataset(config).class_names
  except (FileNotFoundError, ValueError, OSError):
    return None


def model_input(config, path: str) -> np.ndarray:
  """One image file -> the model's float32 HWC input, exactly as evaluation preprocesses it."""
  data = Path(path).read_bytes()
  image = pipeline.eval_image(config, data)
  if image.shape[:2] != (config.input_size, config.input_size):
    image = preprocess.resize_center_crop(image, config.input_size, config.input_size)
  if config.in_channels == 1:
    image = np.round(image @ preprocess.LUMA).astype(np.uint8)[..., None]
  mean, std = pipeline.mean_std(config.dataset)
  return preprocess.normalize(image, config.input_format, mean, std)


def load_model(config: ml_collections.ConfigDict, workdir: str,
               ema: bool = False) -> tuple[int, nnx.Module]:
  """(step, model in eval mode) from the newest checkpoint of `workdir`, with the EMA of its
  weights when `ema`."""
  if ema:
    train.check_has_ema(config, workdir)
  restored = train.restore_train_state(config, workdir, parallel.make_mesh())
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {Path(workdir) / 'checkpoints'}; train or "
                            "import first")
  step, graphdef, state = restored
  weights = train.weights(state, ema)
  return step, nnx.merge(graphdef, weights["params"], weights["batch_stats"])


def predict(config: ml_collections.ConfigDict, workdir: str, paths: list[str],
            top: int = 5, ema: bool = False) -> list[list[tuple[str, float]]]:
  """Prints and returns the top classes with probabilities of every image in `paths` (with the
  run's EMA weights when `ema`)."""
  if not paths:
    raise ValueError("predict needs image files: launch.py predict --workdir=W IMAGE...")
  missing = [p for p in paths if not Path(p).is_file()]
  if missing:
    raise FileNotFoundError(f"image file(s) not found: {missing}")
  step, model = load_model(config, workdir, ema)
  names = class_names(config)
  images = np.stack([model_input(config, p) for p in paths])
  forward = jax.jit(lambda x: jax.nn.softmax(model(x)),
                    compiler_options=parallel.compiler_options())
  probabilities = np.asarray(forward(images))
  results = []
  for path, p in zip(paths, probabilities):
    best = np.argsort(-p)[:min(top, len(p))]
    labels = [names[i] if names else f"class {i}" for i in best]
    results.append([(label, float(p[i])) for label, i in zip(labels, best)])
    print(f"{path}: " + ", ".join(f"{label} {prob:.3f}" for label, prob in results[-1]))
  if names is None:
    print(f"(class names unavailable: {config.dataset} is not prepared under "
          f"{config.tfds_data_dir})")
  return results
