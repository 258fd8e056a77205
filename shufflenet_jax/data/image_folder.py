"""Users' own images, `root/{train,val}/<class>/*.jpg|jpeg|png`, prepared as tfds array_record.

Images are stored as their encoded bytes (decoded and augmented per example in the pipeline).
Files that cannot be decoded fail the preparation, or with `on_bad_image=skip` are left out and
counted in `<tfds dir>/.../skipped_images.txt`.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from shufflenet_jax.data import preprocess

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLITS = ("train", "val")
BAD_IMAGE_POLICIES = ("fail", "skip")


def encoded_image_features(class_names) -> tfds.features.FeaturesDict:
  """Encoded image bytes + label; shared by the image-folder and ImageNet builders."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),
      "label": tfds.features.ClassLabel(names=list(class_names)),
      "file_name": tfds.features.Tensor(shape=(), dtype=np.object_),
  })


def check_image(data: bytes, name: str) -> None:
  """Raises ValueError naming the file if PIL cannot fully decode it."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
  except Exception as e:  # PIL raises many exception types for corrupt files
    raise ValueError(f"unreadable image {name}: {type(e).__name__}: {e}") from e


def class_names(root: Path) -> list[str]:
  train = root / "train"
  if not train.is_dir():
    raise FileNotFoundError(f"image folder {str(root)!r} has no train/ directory; expected "
                            "root/train/<class>/*.jpg and root/val/<class>/*.jpg")
  names = sorted(p.name for p in train.iterdir() if p.is_dir())
  if not names:
    raise FileNotFoundError(f"{train} has no class directories (root/train/<class>/*.jpg)")
  return names


def _files(split_dir: Path) -> list[Path]:
  return sorted(p for p in split_dir.rglob("*") if p.suffix.lower() in EXTENSIONS)


class LocalImageFolder(tfds.core.GeneratorBasedBuilder):
  """Reads one folder; `image_folder_builder` gives each folder its own prepared directory."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, root: str, on_bad_image: str = "fail", shrink: tuple | None = None,
               **kwargs):
    if on_bad_image not in BAD_IMAGE_POLICIES:
      raise ValueError(f"on_bad_image={on_bad_image!r} is not one of {BAD_IMAGE_POLICIES}")
    self.root = Path(root).expanduser().absolute()
    self.names = class_names(self.root)
    self.on_bad_image = on_bad_image
    self.shrink = tuple(shrink) if shrink else None  # (shorter side, JPEG quality) for train/
    super().__init__(**kwargs)
    # tfds rebuilds an unpickled builder from `_original_state`: grain's worker processes
    # receive the data source (and this builder with it) pickled.
    self._original_state.update(root=str(self.root), on_bad_image=on_bad_image,
                                shrink=self.shrink)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=encoded_image_features(self.names),
                                          description=f"Image folder {self.root}")

  def _split_generators(self, dl_manager):
    for split in SPLITS:
      if not (self.root / split).is_dir():
        raise FileNotFoundError(f"image folder {str(self.root)!r} has no {split}/ directory")
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    skipped = []
    for path in _files(self.root / split):
      label = path.relative_to(self.root / split).parts[0]
      if label not in self.names:
        raise ValueError(f"{path}: class {label!r} is not among train/'s classes {self.names}")
      data = path.read_bytes()
      try:
        check_image(data, str(path))
      except ValueError as e:
        if self.on_bad_image == "fail":
          raise ValueError(f"{e} (set --config.on_bad_image=skip to leave such files out)") from e
        skipped.append(str(path))
        continue
      key = str(path.relative_to(self.root))
      if self.shrink and split == "train":
        data = preprocess.shrink_jpeg(data, *self.shrink)
      yield key, {"image": data, "label": label, "file_name": key}
    if skipped:
      logging.warning("Skipped %d unreadable image(s) in %s/%s: %s", len(skipped), self.root,
                      split, skipped[:5])
      print(f"WARNING: skipped {len(skipped)} unreadable image(s) in {self.root / split}",
            flush=True)


def image_folder_builder(tfds_dir: str, root: str, on_bad_image: str = "fail",
                         shrink: tuple | None = None) -> LocalImageFolder:
  """A builder whose prepared files live under a hash of the folder's path and class list (and
  the stored size `shrink`: each setting is prepared once, beside the others)."""
  resolved = Path(root).expanduser().absolute()
  setting = f"|{tuple(shrink)}" if shrink else ""
  digest = hashlib.sha1(f"{resolved}|{class_names(resolved)}|{on_bad_image}{setting}".encode())
  data_dir = Path(tfds_dir) / "image_folders" / digest.hexdigest()[:12]
  return LocalImageFolder(root=str(resolved), on_bad_image=on_bad_image, shrink=shrink,
                          data_dir=str(data_dir), file_format="array_record")
