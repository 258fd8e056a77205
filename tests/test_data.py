import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import common
from shufflenet_jax import config_check, config_files, train
from shufflenet_jax.data import fashion_mnist, pipeline, preprocess
from tests import fake_data


def _imagenet_style_config(tmp_path, dataset, data_dir):
  config = common.load_config("configs/shufflenet_v1.py:groups=2,scale=0.25,smoke")
  config.dataset = dataset
  config.data_dir = str(data_dir)
  config.tfds_data_dir = str(tmp_path / "tfds")
  config.input_size = 32
  config.eval_resize = 36
  config.batch_size = 8
  config.eval_batch_size = 8
  return config


def test_idx_reader_roundtrip_and_errors(tmp_path, fashion_dir):
  images, labels = fashion_mnist.read_split(fashion_dir, "test")
  assert images.shape == (37, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (37,) and labels.max() < 10
  (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05")
  with pytest.raises(ValueError, match="truncated"):
    fashion_mnist.read_idx(tmp_path / "train-images-idx3-ubyte")
  with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
    fashion_mnist.check_files(tmp_path)


def test_fashion_mnist_source_and_train_batches_are_deterministic(tiny_config):
  dataset = pipeline.load_dataset(tiny_config)
  assert len(dataset.train) == 96 and len(dataset.eval) == 37
  assert dataset.class_names[9] == "Ankle boot"
  first = [next(iter(pipeline.train_loader(tiny_config, dataset, 8, seed=1))) for _ in range(2)]
  np.testing.assert_array_equal(first[0]["image"], first[1]["image"])
  # uint8 pixels go to the device (a quarter of float32's bytes); the step normalises them.
  assert first[0]["image"].shape == (8, 28, 28, 1) and first[0]["image"].dtype == np.uint8
  other = next(iter(pipeline.train_loader(tiny_config, dataset, 8, seed=2)))
  assert not np.array_equal(first[0]["image"], other["image"])


def test_iterator_state_resumes_the_same_batches(tiny_config):
  dataset = pipeline.load_dataset(tiny_config)
  iterator = iter(pipeline.train_loader(tiny_config, dataset, 8, seed=0))
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator)["label"] for _ in range(20)]  # crosses epoch boundaries
  resumed = iter(pipeline.train_loader(tiny_config, dataset, 8, seed=0))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["label"], want)


def test_a_global_batch_is_the_same_on_any_number_of_processes_and_workers(tiny_config,
                                                                          absl_flags_parsed):
  """The stream behind a 2-process x 2-device job is the 1 x 4 job's: each process's batches are
  its slice of the same global batches, augmentations included, across epochs (96 examples,
  global batch 16: batch 6 is the first of epoch 2), with or without a grain worker."""
  dataset = pipeline.load_dataset(tiny_config)

  def batches(count, index, workers=0, steps=8):
    tiny_config.num_workers = workers
    loader = pipeline.train_loader(tiny_config, dataset, 16 // count, seed=3,
                                   process_index=index, process_count=count)
    iterator = iter(loader)
    return [next(iterator) for _ in range(steps)]

  one = batches(1, 0)
  two = [batches(2, i) for i in range(2)]
  for step, whole in enumerate(one):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([two[0][step][key], two[1][step][key]]),
                                    whole[key])
  for got, want in zip(batches(1, 0, workers=1), one):
    np.testing.assert_array_equal(got["image"], want["image"])
  # Every epoch visits every example once, each in a new order; the crops are random.
  labels = np.concatenate([b["label"] for b in one[:6]])
  assert np.bincount(labels, minlength=10).tolist() == np.bincount(
      [int(dataset.train[i]["label"]) for i in range(96)], minlength=10).tolist()
  source = pipeline.GlobalBatches(dataset.train, 16, 3, 0, 1)
  assert not np.array_equal(source.permutation(0), source.permutation(1))
  assert sorted(source.permutation(1)) == list(range(96))
  raw = np.stack(source[0]["image"])
  assert not np.array_equal(one[0]["image"], raw)
  with pytest.raises(ValueError, match="global batch 15 is not divisible by 2 processes"):
    pipeline.GlobalBatches(dataset.train, 15, 3, 0, 2)


def test_a_train_iterator_resumes_with_another_worker_and_process_count(tiny_config,
                                                                      absl_flags_parsed):
  """A checkpoint's iterator state (grain refuses one of another worker count) resumes the same
  global batches with any num_workers and process count: what a resume of a 2-process job on
  one process, or with --config.num_workers changed, reads next."""
  dataset = pipeline.load_dataset(tiny_config)

  def iterator(workers, count=1, index=0, seed=3):
    tiny_config.num_workers = workers
    return pipeline.TrainIterator(pipeline.train_loader(
        tiny_config, dataset, 16 // count, seed=seed, process_index=index, process_count=count))

  whole = iterator(0)
  stream = [next(whole)["label"] for _ in range(9)]  # crosses an epoch (6 steps each)
  for saved_workers, count, resumed_workers, steps in [(2, 1, 0, 5), (0, 1, 2, 4), (2, 2, 1, 7)]:
    saving = iterator(saved_workers, count)
    for _ in range(steps):
      next(saving)
    state = saving.get_state()
    assert pipeline.loader_position(json.loads(state)) == steps
    saving.close()
    resumed = iterator(resumed_workers)  # one process reads the whole global batch
    resumed.set_state(state)
    for want in stream[steps:steps + 2]:
      np.testing.assert_array_equal(next(resumed)["label"], want)
    resumed.close()
  for workers in range(4):
    state = json.loads(iterator(workers).get_state())
    assert [pipeline.loader_position(pipeline.loader_state(state, p)) for p in range(9)] == list(
        range(9))
  with pytest.raises(pipeline.DataStreamMismatchError, match="the config is wrong"):
    iterator(0, seed=4).set_state(whole.get_state())


def test_preprocessing_shapes_and_determinism():
  rng_image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)
  a = preprocess.random_resized_crop(rng_image, np.random.default_rng(5), 32, (0.08, 1.0))
  b = preprocess.random_resized_crop(rng_image, np.random.default_rng(5), 32, (0.08, 1.0))
  assert a.shape == (32, 32, 3) and np.array_equal(a, b)
  crop = preprocess.resize_center_crop(rng_image, 36, 32)
  assert crop.shape == (32, 32, 3)
  batch = np.stack([rng_image[:28, :28, :1]] * 4)
  keys = preprocess.position_keys(0, np.arange(4))
  small = preprocess.pad_crop_flip(batch, keys)
  assert small.shape == (4, 28, 28, 1)
  np.testing.assert_array_equal(small, preprocess.pad_crop_flip(batch, keys.copy()))
  assert not np.array_equal(small[0], small[1]) or not np.array_equal(small[1], small[2])
  jittered = preprocess.color_jitter(rng_image, np.random.default_rng(0), 0.4)
  assert jittered.shape == rng_image.shape and jittered.dtype == np.uint8
  bgr = preprocess.normalize(rng_image, "bgr_255", None, None)
  np.testing.assert_array_equal(bgr[..., 0], rng_image[..., 2])
  with pytest.raises(preprocess.BadImageError, match="cannot decode image"):
    preprocess.decode(b"garbage")


def test_imagenet_tars_prepare_without_tensorflow(tmp_path, absl_flags_parsed):
  data_dir = fake_data.write_imagenet_tars(tmp_path / "download")
  config = _imagenet_style_config(tmp_path, "imagenet2012", data_dir)
  dataset = pipeline.load_dataset(config)
  assert len(dataset.train) == 6 and len(dataset.eval) == 5
  assert len(dataset.class_names) == 1000 and dataset.class_names[0] == "n01440764"
  train_labels = sorted(int(dataset.train[i]["label"]) for i in range(6))
  assert train_labels == [0, 0, 0, 1, 1, 1]  # n01440764, n01443537 are classes 0 and 1
  # Validation labels follow tfds's list for the sorted file names (first one: n01751748 = 65).
  labels = {dataset.eval[i]["file_name"]: int(dataset.eval[i]["label"]) for i in range(5)}
  assert labels[b"ILSVRC2012_val_00000001.JPEG"] == 65
  batch = next(iter(pipeline.train_loader(config, dataset, 4, seed=0)))
  assert batch["image"].shape == (4, 32, 32, 3)
  # Train images stored at shorter side 16 (a directory of their own), read by a grain worker.
  config.stored_shorter_side, config.num_workers = 16, 1
  stored = pipeline.load_dataset(config)
  assert all(min(preprocess.decode(stored.train[i]["image"]).shape[:2]) == 16 for i in range(6))
  assert [stored.eval[i]["image"] for i in range(5)] == [dataset.eval[i]["image"]
                                                         for i in range(5)]
  batch = next(iter(pipeline.train_loader(config, stored, 4, seed=0)))
  assert batch["image"].shape == (4, 32, 32, 3)


def test_imagenet_missing_tars_is_a_clear_error(tmp_path):
  config = _imagenet_style_config(tmp_path, "imagenet2012", tmp_path / "empty")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar"):
    pipeline.load_dataset(config)


def test_image_folder_trains_and_evaluates_exactly(tmp_path, absl_flags_parsed):
  root = fake_data.write_image_folder(tmp_path / "images")
  config = _imagenet_style_config(tmp_path, "image_folder", root)
  config.num_classes = 3
  config.total_steps = 2
  config.eval_every_steps = 2
  config.num_workers = 1  # the builder travels to grain's worker pickled (it once could not)
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["eval/num_examples"] == 9  # 3 classes x 3 val images, none dropped


def test_image_folder_bad_images_fail_or_are_skipped(tmp_path):
  root = fake_data.write_image_folder(tmp_path / "images", corrupt=2)
  config = _imagenet_style_config(tmp_path, "image_folder", root)
  config.num_classes = 3
  with pytest.raises(Exception, match="unreadable image .*broken0.jpg.*on_bad_image=skip"):
    pipeline.load_dataset(config)
  config.on_bad_image = "skip"
  config.tfds_data_dir = str(tmp_path / "tfds_skip")
  dataset = pipeline.load_dataset(config)
  assert len(dataset.train) == 15  # the two broken files left out


def test_stored_shorter_side_reencodes_the_larger_train_images_once_and_keeps_eval(tmp_path):
  root = fake_data.write_image_folder(tmp_path / "images")  # sides 36-59
  config = _imagenet_style_config(tmp_path, "image_folder", root)
  config.num_classes = 3
  originals = pipeline.load_dataset(config)
  config.stored_shorter_side, config.stored_quality = 40, 85
  stored = pipeline.load_dataset(config)  # prepared again, beside the originals
  assert len(stored.train) == len(originals.train) and len(stored.eval) == len(originals.eval)
  by_name = lambda source: {r["file_name"]: r["image"] for r in map(source.__getitem__,
                                                                      range(len(source)))}
  before, after = by_name(originals.train), by_name(stored.train)
  shrunk = 0
  for name, data in before.items():
    image, kept = preprocess.decode(data), preprocess.decode(after[name])
    if min(image.shape[:2]) <= 40:
      assert after[name] == data  # small enough: the very bytes
      continue
    shrunk += 1
    assert min(kept.shape[:2]) == 40
    ratio = image.shape[0] / image.shape[1]
    assert abs(kept.shape[0] / kept.shape[1] - ratio) < 0.05
    resized = np.asarray(Image.fromarray(image).resize(kept.shape[1::-1], Image.BICUBIC))
    assert np.abs(resized.astype(int) - kept).mean() < 6  # the same picture, JPEG q85
  assert 0 < shrunk < len(before)
  assert by_name(stored.eval) == by_name(originals.eval)  # eval images stay as they are
  config.stored_quality = 0
  with pytest.raises(ValueError, match=r"stored_quality=0 is not valid: must be an integer in"):
    train.train_and_evaluate(config, str(tmp_path / "never"))
  assert not (tmp_path / "never").exists()


def test_num_classes_mismatch_names_the_right_value(tmp_path):
  root = fake_data.write_image_folder(tmp_path / "images")
  config = _imagenet_style_config(tmp_path, "image_folder", root)
  with pytest.raises(ValueError, match="set --config.num_classes=3"):
    pipeline.load_dataset(config)


def _photo_like_jpeg(width: int, height: int, seed: int) -> bytes:
  """A smooth image (like a photo, unlike noise, resampling differences stay small)."""
  base = np.random.default_rng(seed).integers(0, 255, (height // 40, width // 40, 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(base).resize((width, height), Image.BICUBIC).save(buffer, "JPEG", quality=95)
  return buffer.getvalue()


def test_reduced_decode_keeps_todays_crop_boxes_and_flips():
  small, large = _photo_like_jpeg(120, 90, 0), _photo_like_jpeg(1600, 1200, 1)
  reduced = 0
  for seed in range(24):
    for data, size in ((small, 32), (large, 64)):
      today, before = np.random.default_rng(seed), np.random.default_rng(seed)
      out = preprocess.decode_random_resized_crop(data, today, size, (0.08, 1.0))
      full = preprocess.random_resized_crop(preprocess.decode(data), before, size, (0.08, 1.0))
      # The same draws in the same order: the same box, flip and every later draw.
      assert today.random() == before.random()
      assert out.shape == full.shape == (size, size, 3) and out.dtype == np.uint8
      _, _, ch, cw = preprocess.crop_box(*preprocess.decode(data).shape[:2],
                                         np.random.default_rng(seed), (0.08, 1.0))
      if min(ch, cw) < 2 * size:  # decoded in full: exactly today's pixels
        np.testing.assert_array_equal(out, full)
      else:  # decoded at 1/2..1/8: the same crop, resampled differently
        reduced += 1
        difference = np.abs(out.astype(np.float32) - full.astype(np.float32))
        assert difference.mean() < 2.0 and np.percentile(difference, 99) < 12, (
            seed, difference.mean(), difference.max())
  assert reduced >= 8  # the large image took the fast path often enough to be tested


def test_the_step_normalises_uint8_pixels_as_the_host_did():
  images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), np.uint8)
  for dataset, input_format in (("imagenet2012", "rgb_normalized"), ("image_folder", "bgr_255")):
    config = common.load_config("configs/shufflenet_v1.py:smoke")
    config.dataset, config.input_format = dataset, input_format
    mean, std = pipeline.mean_std(dataset)
    on_host = preprocess.normalize(images, input_format, mean, std)
    on_device = jax.jit(lambda x, c=config: pipeline.model_input(x, c))(jnp.asarray(images))
    assert on_device.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(on_device), on_host, rtol=1e-6, atol=1e-6)
  floats = jnp.ones((1, 2, 2, 1))
  assert pipeline.model_input(floats, config) is floats  # already normalised: untouched


def test_num_workers_auto_and_profile_steps_are_validated(tiny_config):
  assert pipeline.worker_count(3) == 3
  assert pipeline.worker_count(pipeline.AUTO_WORKERS) == 1  # CPU platform: one, to overlap
  assert config_files.integer_words(["--config.num_workers=auto", "--config.seed=1"]) == [
      "--config.num_workers=-1", "--config.seed=1"]
  for key, value, message in (
      ("num_workers", -2, "num_workers=-2 is not valid: must be an integer >= 0 (0: decode "
                          "in-process) or auto (-1: from the host's cores)"),
      ("profile_steps", "5", "profile_steps='5' is not valid: must be '' (off) or 'START:STOP'"),
      ("profile_steps", "9:3", "profile_steps='9:3' is not valid")):
    config = tiny_config.copy_and_resolve_references()
    config[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
      config_check.validate(config)
