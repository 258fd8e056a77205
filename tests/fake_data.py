"""Tiny generated datasets in the real on-disk formats (IDX files, image folders, ImageNet tars)."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def _write_idx(path: Path, array: np.ndarray) -> None:
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def learnable_images(num: int, num_classes: int, size: int, channels: int, seed: int):
  """Images whose class is a bright square at a class-specific position, plus noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num)
  images = rng.integers(0, 60, (num, size, size, channels)).astype(np.uint8)
  cell = max(1, size // 4)
  for i, label in enumerate(labels):
    r, c = divmod(int(label) % 16, 4)
    images[i, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 230
  return images, labels


def write_fashion_mnist(directory: Path, num_train: int = 96, num_test: int = 37) -> Path:
  """The four Fashion-MNIST IDX files (gzipped), 28x28 uint8, 10 classes."""
  directory.mkdir(parents=True, exist_ok=True)
  for prefix, num, seed in (("train", num_train, 0), ("t10k", num_test, 1)):
    images, labels = learnable_images(num, 10, 28, 1, seed)
    _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
    _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
  return directory


def jpeg_bytes(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "JPEG", quality=95)
  return buffer.getvalue()


def write_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=(5, 3),
                       corrupt: int = 0) -> Path:
  """root/{train,val}/<class>/*.jpg with sizes that vary; `corrupt` broken files in train."""
  rng = np.random.default_rng(0)
  for split, count in zip(("train", "val"), per_class):
    for index, name in enumerate(classes):
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(count):
        h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
        image, _ = learnable_images(1, len(classes), max(h, w), 3, seed=index)
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(image[0, :h, :w]))
  for i in range(corrupt):
    (root / "train" / classes[0] / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_imagenet_tars(directory: Path, synsets=("n01440764", "n01443537"), per_class: int = 3,
                        num_val: int = 5) -> Path:
  """ILSVRC2012_img_train.tar (a tar per synset) and ILSVRC2012_img_val.tar, tiny JPEGs."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  image = lambda: jpeg_bytes(rng.integers(0, 255, (int(rng.integers(40, 70)),
                                                   int(rng.integers(40, 70)), 3), np.uint8))
  with tarfile.open(directory / "ILSVRC2012_img_train.tar", "w") as outer:
    for synset in synsets:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
        for i in range(per_class):
          _add(inner, f"{synset}_{i}.JPEG", image())
      _add(outer, f"{synset}.tar", inner_bytes.getvalue())
  with tarfile.open(directory / "ILSVRC2012_img_val.tar", "w") as tar:
    for i in range(num_val):
      _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", image())
  return directory
