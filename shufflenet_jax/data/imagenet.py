"""ImageNet (ILSVRC 2012) from the manual download, prepared as tfds array_record without TF.

tfds's own `imagenet2012` builder needs TensorFlow to prepare (tf.io.gfile); this one reads the
same two files with `tarfile` and writes the same splits (train 1,281,167 / validation 50,000) and
labels (tfds's synset list and validation labels), keeping each JPEG's bytes as they are:

  ~/imagenet_download/ILSVRC2012_img_train.tar   (138 GB: one n0xxxxxxx.tar per class)
  ~/imagenet_download/ILSVRC2012_img_val.tar     (6.3 GB: ILSVRC2012_val_000xxxxx.JPEG)

CMYK and PNG-in-JPEG files (about 23 in train) are handled at decode time by PIL.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import tensorflow_datasets as tfds

from shufflenet_jax.data import preprocess
from shufflenet_jax.data.image_folder import encoded_image_features

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"


def _tfds_text(relative: str) -> list[str]:
  return Path(tfds.core.tfds_path(relative)).read_text().strip().splitlines()


def synsets() -> list[str]:
  return _tfds_text("datasets/imagenet2012/labels.txt")


def validation_labels(val_tar: Path) -> dict[str, str]:
  """tfds's validation labels are in the sorted order of the validation file names."""
  labels = _tfds_text("datasets/imagenet2012/validation_labels.txt")
  with tarfile.open(val_tar) as tar:
    names = sorted(tar.getnames())
  return dict(zip(names, labels))


class Imagenet2012Tars(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download {TRAIN_TAR} and {VAL_TAR} from image-net.org (ILSVRC 2012) into one folder and "
      "pass it as --config.data_dir")

  def __init__(self, *, shrink: tuple | None = None, **kwargs):
    self.shrink = tuple(shrink) if shrink else None  # (shorter side, JPEG quality) for train
    super().__init__(**kwargs)
    self._original_state.update(shrink=self.shrink)  # grain's workers unpickle the builder

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=encoded_image_features(synsets()))

  def _split_generators(self, dl_manager):
    manual = Path(dl_manager.manual_dir)
    return {"train": self._generate_examples(manual / TRAIN_TAR, "train"),
            "validation": self._generate_examples(manual / VAL_TAR, "validation")}

  def _generate_examples(self, path: Path, split: str):
    if split == "train":
      yield from self._train_examples(path)
    else:
      yield from self._validation_examples(path)

  def _train_examples(self, path: Path):
    with tarfile.open(path) as outer:
      for member in outer:
        if not member.name.endswith(".tar"):
          continue
        synset = Path(member.name).stem
        inner_bytes = io.BytesIO(outer.extractfile(member).read())
        with tarfile.open(fileobj=inner_bytes) as inner:
          for image in inner:
            if image.isfile():
              data = inner.extractfile(image).read()
              if self.shrink:
                data = preprocess.shrink_jpeg(data, *self.shrink)
              yield image.name, {"image": data, "label": synset, "file_name": image.name}

  def _validation_examples(self, path: Path):
    labels = validation_labels(path)
    with tarfile.open(path) as tar:
      for member in tar:
        if member.isfile():
          yield member.name, {"image": tar.extractfile(member).read(),
                              "label": labels[member.name], "file_name": member.name}


def imagenet_builder(tfds_dir: str, manual_dir: str,
                     shrink: tuple | None = None) -> Imagenet2012Tars:
  """The builder; before the one-off preparation, checks that both tars are in `manual_dir`.
  With `shrink` (shorter side, quality) the train images are stored re-encoded, in their own
  directory beside the originals' (validation stays as it is)."""
  if shrink:
    tfds_dir = str(Path(tfds_dir) / f"stored_shorter{shrink[0]}_q{shrink[1]}")
  builder = Imagenet2012Tars(data_dir=tfds_dir, file_format="array_record", shrink=shrink)
  prepared = (Path(builder.data_dir) / "dataset_info.json").exists()
  missing = [name for name in (TRAIN_TAR, VAL_TAR)
             if not (Path(manual_dir).expanduser() / name).is_file()]
  if missing and not prepared:
    raise FileNotFoundError(f"ImageNet files {missing} not found in {str(manual_dir)!r}. "
                            f"{Imagenet2012Tars.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return builder
