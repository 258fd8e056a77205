"""Datasets -> numpy batches for this process: tfds builder -> array_record -> grain.

Training batches come from a grain DataLoader whose iterator state is checkpointed with the
model (exact resume). Evaluation reads each process's contiguous share of the split, padded to
whole batches with `mask`=0 examples, so every example counts exactly once on any device count.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from shufflenet_jax import config_files
from shufflenet_jax.data import preprocess
from shufflenet_jax.data.fashion_mnist import FashionMnistIdx, check_files
from shufflenet_jax.data.image_folder import image_folder_builder
from shufflenet_jax.data.imagenet import imagenet_builder

DATASETS = ("fashion_mnist", "imagenet2012", "image_folder")
SPLITS = {  # (train split, eval split)
    "fashion_mnist": ("train", "test"),
    "imagenet2012": ("train", "validation"),
    "image_folder": ("train", "val"),
}


@dataclasses.dataclass
class Dataset:
  train: object          # random-access source: len() and [i] -> {"image", "label"}
  eval: object
  class_names: list[str]
  mean: np.ndarray
  std: np.ndarray


def _prepare(make_builder, manual_dir: str):
  """Prepares the array_record files once: process 0 first (a shared disk is written once), then
  every other process (a no-op on a shared disk, a local preparation otherwise)."""
  config = tfds.download.DownloadConfig(manual_dir=str(Path(manual_dir).expanduser()))
  if jax.process_index() == 0:
    builder = make_builder()
    builder.download_and_prepare(download_config=config)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dataset prepared")
    if jax.process_index() != 0:
      builder = make_builder()  # a builder made before the files existed would not see them
      builder.download_and_prepare(download_config=config)
  return builder


def mean_std(dataset: str) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel input normalisation of a dataset (0-255 scale); image folders use ImageNet's."""
  if dataset == "fashion_mnist":
    return preprocess.FASHION_MNIST_MEAN, preprocess.FASHION_MNIST_STD
  return preprocess.IMAGENET_MEAN_RGB, preprocess.IMAGENET_STD_RGB


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """The config's dataset as two random-access sources (train, eval) plus its class names."""
  name = config.dataset
  if name not in DATASETS:
    raise ValueError(f"dataset={name!r} is not one of {DATASETS}")
  tfds_dir = str(Path(config.tfds_data_dir).expanduser())
  decoders = None
  if name == "fashion_mnist":
    check_files(config.data_dir)
    make_builder = lambda: FashionMnistIdx(data_dir=tfds_dir, file_format="array_record")
  elif name == "imagenet2012":
    make_builder = lambda: imagenet_builder(tfds_dir, config.data_dir)
    decoders = {"image": tfds.decode.SkipDecoding()}  # JPEG bytes: we decode and crop
  else:
    make_builder = lambda: image_folder_builder(tfds_dir, config.data_dir, config.on_bad_image)
    decoders = {"image": tfds.decode.SkipDecoding()}
  mean, std = mean_std(name)
  builder = _prepare(make_builder, config.data_dir)
  train_split, eval_split = SPLITS[name]
  sources = [builder.as_data_source(split=s, decoders=decoders) for s in (train_split,
                                                                            eval_split)]
  names = list(builder.info.features["label"].names)
  if len(names) != config.num_classes:
    raise ValueError(f"num_classes={config.num_classes} but {name} in {config.data_dir!r} has "
                     f"{len(names)} classes; set --config.num_classes={len(names)}")
  return Dataset(*sources, class_names=names, mean=mean, std=std)


AUGMENTS = ("small", "imagenet")
AUTO_WORKERS = config_files.AUTO_WORKERS  # num_workers=auto (launch.py: the word -> -1)


def worker_count(num_workers: int) -> int:
  """grain worker processes for this process: num_workers, or for `auto` every core this
  process may run on (its CPU affinity: a scheduler's per-task share) but one, which runs the
  training loop. On the CPU platform the model computes on the same cores, so `auto` takes one
  worker: decoding overlaps the step without taking XLA's cores (BENCHMARKS.md measures it)."""
  if num_workers != AUTO_WORKERS:
    return num_workers
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if jax.devices()[0].platform == "cpu":
    return min(1, cores - 1)
  return max(0, cores - 1)


def model_input(images, config):
  """The model's float32 input from a batch: uint8 pixels (what the loaders ship: a quarter of
  float32's host-to-device bytes) are normalised here, inside the jitted step; float images are
  taken as already normalised (tests, users' own pipelines)."""
  if images.dtype != np.uint8:
    return images
  mean, std = mean_std(config.dataset)
  return preprocess.normalize(images, config.input_format, mean, std)


def eval_image(config, image) -> np.ndarray:
  """The eval transform (also used by prediction): resize + center crop for ImageNet-size data."""
  image = preprocess.decode(image)
  if config.augment == "imagenet":
    image = preprocess.resize_center_crop(image, config.eval_resize, config.input_size)
  return image


class _ImagenetAugment(grain.transforms.RandomMap):
  """Per example (images differ in size): decode, random resized crop, flip, colour jitter."""

  def __init__(self, config):
    self.config = config

  def random_map(self, record, rng: np.random.Generator):
    c = self.config
    image = preprocess.decode_random_resized_crop(record["image"], rng, c.input_size,
                                                  tuple(c.crop_area))
    if c.color_jitter:
      image = preprocess.color_jitter(image, rng, c.color_jitter)
    return {"image": np.ascontiguousarray(image), "label": np.int32(record["label"])}


class _SmallImageAugment(grain.transforms.RandomMap):
  """Per batch (one rng per batch: per-example generators cost more than the augmentation)."""

  def __init__(self, config):
    self.config = config

  def random_map(self, batch, rng: np.random.Generator):
    return {"image": preprocess.pad_crop_flip(batch["image"], rng),
            "label": batch["label"].astype(np.int32)}


def train_transform(config) -> grain.transforms.RandomMap:
  """The config's random train transform: per example (imagenet) or per batch (small)."""
  if config.augment == "small":
    return _SmallImageAugment(config)
  if config.augment == "imagenet":
    return _ImagenetAugment(config)
  raise ValueError(f"augment={config.augment!r} is not one of {AUGMENTS}")


def train_loader(config, dataset: Dataset, per_process_batch: int,
                 seed: int) -> grain.DataLoader:
  """Endless shuffled training batches for this process (its shard of every epoch)."""
  sampler = grain.samplers.IndexSampler(
      num_records=len(dataset.train),
      shard_options=grain.sharding.ShardOptions(
          shard_index=jax.process_index(), shard_count=jax.process_count(),
          drop_remainder=True),
      shuffle=True, num_epochs=None, seed=seed)
  batch = grain.transforms.Batch(per_process_batch, drop_remainder=True)
  transform = train_transform(config)
  operations = [batch, transform] if config.augment == "small" else [transform, batch]
  return grain.DataLoader(data_source=dataset.train, sampler=sampler, operations=operations,
                          worker_count=worker_count(config.num_workers))


def eval_batches(config, dataset: Dataset, per_process_batch: int) -> Iterator[dict]:
  """This process's share of the eval split, padded to whole batches; `mask` marks real ones.

  Every process yields the same number of batches, so the jitted eval step runs in lockstep.
  """
  n, count, index = len(dataset.eval), jax.process_count(), jax.process_index()
  share = math.ceil(n / count)
  start, stop = min(n, index * share), min(n, (index + 1) * share)
  num_batches = math.ceil(share / per_process_batch)

  pad = {"image": np.zeros((config.input_size, config.input_size, config.in_channels),
                           np.uint8), "label": np.int32(0), "mask": np.float32(0)}

  def load(position: int):  # never None: grain would drop it
    i = start + position
    if i >= stop:
      return pad
    record = dataset.eval[i]
    return {"image": np.ascontiguousarray(eval_image(config, record["image"])),
            "label": np.int32(record["label"]), "mask": np.float32(1)}

  batches = grain.MapDataset.range(num_batches * per_process_batch).map(load).batch(
      per_process_batch)
  iterator = batches.to_iter_dataset()
  workers = worker_count(config.num_workers)
  if workers:
    iterator = iterator.mp_prefetch(grain.MultiprocessingOptions(workers))
  yield from iterator
