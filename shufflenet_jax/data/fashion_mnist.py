"""Fashion-MNIST from its four IDX files, prepared once as a tfds array_record dataset."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = ("Install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist: "
              "/usr/share/datasets/fashion-mnist) or put the four IDX files "
              "(train/t10k-images-idx3-ubyte, train/t10k-labels-idx1-ubyte, .gz or not) there "
              "and set --config.data_dir")


def find_idx_file(data_dir: str | os.PathLike, name: str) -> Path:
  for candidate in (Path(data_dir) / f"{name}.gz", Path(data_dir) / name):
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(f"Fashion-MNIST file {name}[.gz] not found in {data_dir!r}. {HOW_TO_GET}")


def check_files(data_dir: str | os.PathLike) -> None:
  """Fails early, naming the missing file and how to get the data."""
  if not Path(data_dir).is_dir():
    raise FileNotFoundError(
        f"Fashion-MNIST data_dir {str(data_dir)!r} does not exist. {HOW_TO_GET}")
  for names in FILES.values():
    for name in names:
      find_idx_file(data_dir, name)


def read_idx(path: Path) -> np.ndarray:
  """Reads an IDX file (magic: 0, 0, dtype 0x08 = uint8, ndim; then big-endian dims)."""
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path} is not a uint8 IDX file (header {data[:4]!r})")
  ndim = data[3]
  if len(data) < 4 + 4 * ndim:
    raise ValueError(f"{path} is truncated: its header names {ndim} dimensions")
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise ValueError(f"{path} is truncated: header says {dims}, found {body.size} bytes")
  return body.reshape(dims)


def read_split(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  images_name, labels_name = FILES[split]
  images = read_idx(find_idx_file(data_dir, images_name))
  labels = read_idx(find_idx_file(data_dir, labels_name))
  if len(images) != len(labels):
    raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels in {data_dir}")
  return images[..., None], labels.astype(np.int64)


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """tfds builder whose source is the IDX files in the manual dir (no download)."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(dl_manager.manual_dir, split) for split in FILES}

  def _generate_examples(self, data_dir, split):
    images, labels = read_split(data_dir, split)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": image, "label": int(label)}
