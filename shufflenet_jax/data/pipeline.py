"""Datasets -> numpy batches for this process: tfds builder -> array_record -> grain.

Training batches come from a grain DataLoader over GlobalBatches: what a global batch holds
depends on the seed alone, not on the process or worker count, and the loader's iterator state
is checkpointed with the model (exact resume). Evaluation reads each process's contiguous share
of the split, padded to whole batches with `mask`=0 examples, so every example counts exactly
once on any device count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
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
    make_builder = lambda: imagenet_builder(tfds_dir, config.data_dir, stored_size(config))
    decoders = {"image": tfds.decode.SkipDecoding()}  # JPEG bytes: we decode and crop
  else:
    make_builder = lambda: image_folder_builder(tfds_dir, config.data_dir, config.on_bad_image,
                                                stored_size(config))
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


def stored_size(config) -> tuple[int, int] | None:
  """(shorter side, JPEG quality) the train images are stored at, or None (as they are)."""
  side = config.get("stored_shorter_side", 0)
  return (side, config.get("stored_quality", 90)) if side else None


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


class GlobalBatches:
  """This process's slice of every global training batch: record t is its part of batch t.

  The batches cut an endless stream of positions into global batches of `global_batch`:
  position g is example permutation_e[g mod N] of epoch e = g // N (a fresh permutation of the N
  examples from (seed, e) every epoch), and process p of P reads positions
  [t*B + p*B/P, t*B + (p+1)*B/P) of batch t. Every example's augmentation is keyed by
  (seed, position) too (`augment_batch`), so neither the process count nor the number of grain
  workers changes what a global batch holds: 2 processes x 2 devices train on exactly the
  batches of 1 process x 4 devices, and a resumed run continues the same stream.
  """

  def __init__(self, source, global_batch: int, seed: int, process_index: int,
               process_count: int):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} is not divisible by {process_count} "
                       "processes")
    self.source, self.global_batch, self.seed = source, global_batch, seed
    self.process_index, self.process_count = process_index, process_count
    self.local_batch = global_batch // process_count
    self._permutations: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize  # endless

  def __repr__(self) -> str:  # grain checks it on resume: another stream is refused
    return (f"GlobalBatches({self.source!r}, global_batch={self.global_batch}, "
            f"seed={self.seed}, process={self.process_index}/{self.process_count})")

  def __getstate__(self):  # to grain's workers without the cache
    return {**self.__dict__, "_permutations": {}}

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) > 1:  # a batch spans at most two epochs
        self._permutations.pop(min(self._permutations))
      rng = np.random.default_rng([self.seed, PERMUTATION_STREAM, epoch])
      self._permutations[epoch] = rng.permutation(len(self.source))
    return self._permutations[epoch]

  def positions(self, step: int) -> np.ndarray:
    start = step * self.global_batch + self.process_index * self.local_batch
    return np.arange(start, start + self.local_batch, dtype=np.int64)

  def __getitem__(self, step: int) -> dict:
    positions = self.positions(step)
    epochs, offsets = np.divmod(positions, len(self.source))
    indices = [int(self.permutation(int(e))[o]) for e, o in zip(epochs, offsets)]
    if hasattr(self.source, "__getitems__"):  # array_record reads a batch in one call
      records = self.source.__getitems__(indices)
    else:
      records = [self.source[i] for i in indices]
    return {"image": [r["image"] for r in records],
            "label": np.array([r["label"] for r in records], np.int32), "position": positions}


# Independent random streams of one seed: the epochs' permutations and the examples' crops.
PERMUTATION_STREAM, AUGMENT_STREAM = 0, 1


def augment_batch(config, images: list, positions: np.ndarray, seed: int) -> np.ndarray:
  """The config's train augmentation of examples at these stream positions, as one uint8 batch:
  each example's randomness depends only on (seed, position)."""
  if config.augment == "small":
    keys = preprocess.position_keys(seed, positions)
    return preprocess.pad_crop_flip(np.stack(images), keys)
  if config.augment != "imagenet":
    raise ValueError(f"augment={config.augment!r} is not one of {AUGMENTS}")
  out = []
  for image, position in zip(images, positions):
    rng = np.random.default_rng([seed, AUGMENT_STREAM, int(position)])
    image = preprocess.decode_random_resized_crop(image, rng, config.input_size,
                                                  tuple(config.crop_area))
    if config.color_jitter:
      image = preprocess.color_jitter(image, rng, config.color_jitter)
    out.append(image)
  return np.stack(out)


class _Augment(grain.transforms.Map):
  """Per batch, in grain's workers: a batch's images decoded and augmented (augment_batch)."""

  def __init__(self, config, seed: int):  # augment_batch checks config.augment
    self.config, self.seed = config, seed

  def map(self, batch):
    return {"image": augment_batch(self.config, batch["image"], batch["position"], self.seed),
            "label": batch["label"]}


def train_loader(config, dataset: Dataset, per_process_batch: int, seed: int, *,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.DataLoader:
  """Endless training batches for this process: its slice of every global batch (GlobalBatches;
  the process defaults to this JAX process), checkpointable for exact resume."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  batches = GlobalBatches(dataset.train, per_process_batch * count, seed, index, count)
  return grain.DataLoader(data_source=batches,
                          sampler=grain.samplers.SequentialSampler(num_records=len(batches)),
                          operations=[_Augment(config, seed)],
                          worker_count=worker_count(config.num_workers))


class DataStreamMismatchError(ValueError):
  """A checkpoint's data-iterator state is of another stream (seed, batch, dataset) than the
  config's: the config is wrong, not the checkpoint."""


# The process slice of a GlobalBatches repr: every process reads the same record (step) of one
# stream, so a state saved by any process of any process count positions this one.
_PROCESS_SLICE = re.compile(r", process=\d+/\d+\)$")


def loader_position(state: dict) -> int:
  """The record (= training step) a grain DataLoader state reads next, for any worker count.
  grain's v2 state: worker w of W reads records w, w+W, ...; last_seen_indices[w] is the last it
  gave (w - W before its first); with 0 workers, last_seen_indices["0"] is the last record."""
  workers, last_seen = state["worker_count"], state["last_seen_indices"]
  if workers == 0:
    return last_seen["0"] + 1
  return sum((last_seen[str(w)] - w) // workers + 1 for w in range(workers))


def loader_state(state: dict, position: int) -> dict:
  """`state` (of this loader: its worker count, sampler and source) moved to read `position`
  next: the inverse of loader_position."""
  workers = state["worker_count"]
  if workers == 0:
    return {**state, "last_seen_indices": {"0": position - 1}, "last_worker_index": -1}
  last_seen = {str(w): w + ((position - w + workers - 1) // workers - 1) * workers
               for w in range(workers)}
  return {**state, "last_seen_indices": last_seen, "last_worker_index": position % workers - 1}


class TrainIterator:
  """The train loader's iterator, whose checkpointed state resumes with any number of grain
  workers or processes: grain refuses a state of another worker count, but each record is one
  whole step (GlobalBatches), so its position is all a resume needs."""

  def __init__(self, loader: grain.DataLoader):
    self._iterator = iter(loader)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def get_state(self) -> bytes:
    return self._iterator.get_state()

  def set_state(self, saved: bytes) -> None:
    saved_state, state = json.loads(saved.decode()), json.loads(self._iterator.get_state())
    for key in ("sampler", "data_source"):
      theirs, ours = (_PROCESS_SLICE.sub(")", s[key]) for s in (saved_state, state))
      if theirs != ours:
        raise DataStreamMismatchError(
            f"the checkpoint's data iterator reads {saved_state[key]}, this config's "
            f"{state[key]}: the config is wrong, not the checkpoint (nothing was moved)")
    position = loader_position(saved_state)
    self._iterator.set_state(json.dumps(loader_state(state, position)).encode())

  def start_prefetch(self) -> None:
    self._iterator.start_prefetch()

  def close(self) -> None:
    """Stops the worker processes and prefetch threads now (on an error too), so none is left
    holding shared memory or blocking the interpreter's exit."""
    dataset_iterator = getattr(self._iterator, "_iterator", None)  # grain's DataLoaderIterator
    if hasattr(dataset_iterator, "close"):
      dataset_iterator.close()


def train_iterator(config, dataset: Dataset, per_process_batch: int, seed: int) -> TrainIterator:
  """train_loader's batches for this process, resumable across worker and process counts."""
  return TrainIterator(train_loader(config, dataset, per_process_batch, seed))


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
