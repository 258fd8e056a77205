"""Per-example preprocessing in numpy/PIL: deterministic given an rng (or key) made from
(seed, the example's position in the training stream), so a resumed run, or the same run on
another number of processes, reproduces the same augmentations."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGENET_MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255
FASHION_MNIST_MEAN = np.array([0.2860], np.float32) * 255
FASHION_MNIST_STD = np.array([0.3530], np.float32) * 255
INPUT_FORMATS = ("rgb_normalized", "bgr_255")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # RGB -> grey (ITU-R BT.601)


class BadImageError(ValueError):
  """An image that cannot be decoded."""


def decode(image) -> np.ndarray:
  """uint8 HWC array from an array (passed through) or encoded JPEG/PNG bytes (to RGB)."""
  if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
    return image
  try:
    with Image.open(io.BytesIO(bytes(image))) as img:
      return np.asarray(img.convert("RGB"))
  except Exception as e:  # PIL raises many types for corrupt data
    raise BadImageError(f"cannot decode image ({len(bytes(image))} bytes): {e}") from e


def shrink_jpeg(data: bytes, shorter_side: int, quality: int) -> bytes:
  """Encoded image bytes with the shorter side at most `shorter_side`: larger images are resized
  (antialiased) and re-encoded as JPEG at `quality`, smaller ones kept byte for byte. Storing
  train images so (config stored_shorter_side) makes every later decode cheaper (BENCHMARKS.md)."""
  with Image.open(io.BytesIO(bytes(data))) as img:
    width, height = img.size
    if min(width, height) <= shorter_side:
      return bytes(data)
    scale = shorter_side / min(width, height)
    size = (max(shorter_side, round(width * scale)), max(shorter_side, round(height * scale)))
    img.draft("RGB", size)  # libjpeg decodes at the largest DCT scale still above `size`
    out = io.BytesIO()
    img.convert("RGB").resize(size, Image.BICUBIC).save(out, "JPEG", quality=quality)
  return out.getvalue()


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  squeeze = image.shape[-1] == 1
  img = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(img.resize((width, height), Image.BILINEAR))
  return out[..., None] if squeeze else out


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """A bijective mix of uint64s (SplitMix64's finaliser): nearby inputs give unrelated outputs."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def position_keys(seed: int, positions: np.ndarray) -> np.ndarray:
  """One random uint64 per example from (seed, stream position), vectorised: a generator per
  example would cost more than the small-image augmentation it drives."""
  seed_key = _splitmix64(np.array([seed], np.uint64))
  return _splitmix64(np.asarray(positions).astype(np.uint64) ^ seed_key)


def pad_crop_flip(images: np.ndarray, keys: np.ndarray, pad: int = 2) -> np.ndarray:
  """Small-image augmentation of an (N, H, W, C) batch: zero-pad, random crop, random flip;
  example i's crop offsets and flip come from the bits of keys[i] (position_keys)."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  span = np.uint64(2 * pad + 1)
  tops = (keys % span).astype(np.int64)
  lefts = ((keys >> np.uint64(16)) % span).astype(np.int64)
  flips = ((keys >> np.uint64(32)) & np.uint64(1)).astype(bool)
  out = np.empty_like(images)
  for i in range(n):
    crop = padded[i, tops[i]:tops[i] + h, lefts[i]:lefts[i] + w]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


def crop_box(height: int, width: int, rng: np.random.Generator,
             area: tuple[float, float] = (0.08, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Inception-style crop (torchvision's RandomResizedCrop rule: 10 tries, then the central
  square): (top, left, crop height, crop width) in the full-resolution image."""
  log_ratio = np.log(ratio)
  for _ in range(10):
    target_area = height * width * rng.uniform(*area)
    aspect = np.exp(rng.uniform(*log_ratio))
    cw = int(round(np.sqrt(target_area * aspect)))
    ch = int(round(np.sqrt(target_area / aspect)))
    if 0 < cw <= width and 0 < ch <= height:
      top = int(rng.integers(0, height - ch + 1))
      left = int(rng.integers(0, width - cw + 1))
      return top, left, ch, cw
  side = min(height, width)
  return (height - side) // 2, (width - side) // 2, side, side


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        area: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Random resized crop + flip of a decoded image (see crop_box)."""
  top, left, ch, cw = crop_box(*image.shape[:2], rng, area, ratio)
  out = _resize(image[top:top + ch, left:left + cw], size, size)
  return out[:, ::-1] if rng.random() < 0.5 else out


# libjpeg decodes at 1/2, 1/4 or 1/8 of the size in a fraction of the time (DCT scaling).
JPEG_SCALES = (8, 4, 2)


def decode_random_resized_crop(data, rng: np.random.Generator, size: int,
                               area: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """decode + random_resized_crop with the same crop box and flip for the same rng, decoding a
  JPEG at a reduced scale when the crop still has at least `size` pixels per side there (then
  the output differs from the full decode only by resampling)."""
  if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
    return random_resized_crop(data, rng, size, area, ratio)
  try:
    with Image.open(io.BytesIO(bytes(data))) as img:
      width, height = img.size
      top, left, ch, cw = crop_box(height, width, rng, area, ratio)
      scale = next((s for s in JPEG_SCALES if min(ch, cw) >= s * size), 1)
      if scale > 1 and img.format == "JPEG":
        img.draft("RGB", (width // scale, height // scale))
      img = img.convert("RGB")  # decodes
  except Exception as e:  # PIL raises many types for corrupt data
    raise BadImageError(f"cannot decode image ({len(bytes(data))} bytes): {e}") from e
  if img.size == (width, height):  # full decode: exactly random_resized_crop's pixels
    out = _resize(np.asarray(img)[top:top + ch, left:left + cw], size, size)
  else:
    sx, sy = img.width / width, img.height / height
    box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    out = np.asarray(img.resize((size, size), Image.BILINEAR, box=box))
  return out[:, ::-1] if rng.random() < 0.5 else out


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Brightness, contrast and saturation jitter by factors in [1-s, 1+s], in random order."""
  x = image.astype(np.float32)
  gray = lambda x: x @ LUMA if x.shape[-1] == 3 else x[..., 0]
  for op in rng.permutation(3):
    factor = rng.uniform(max(0.0, 1 - strength), 1 + strength)
    if op == 0:
      x = x * factor
    elif op == 1:
      x = (x - gray(x).mean()) * factor + gray(x).mean()
    else:
      x = (x - gray(x)[..., None]) * factor + gray(x)[..., None]
  return np.clip(x, 0, 255).astype(np.uint8)


def resize_center_crop(image: np.ndarray, resize: int, size: int) -> np.ndarray:
  """Eval: resize the shorter side to `resize`, then take the central `size` x `size` crop."""
  h, w = image.shape[:2]
  scale = resize / min(h, w)
  nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
  image = _resize(image, nh, nw)
  top, left = (nh - size) // 2, (nw - size) // 2
  return image[top:top + size, left:left + size]


def normalize(image: np.ndarray, input_format: str, mean: np.ndarray,
              std: np.ndarray) -> np.ndarray:
  """float32 model input: (x - mean) / std in RGB, or raw BGR 0-255 (official Megvii models)."""
  if input_format == "bgr_255":
    return image[..., ::-1].astype(np.float32)
  if input_format != "rgb_normalized":
    raise ValueError(f"input_format={input_format!r} is not one of {INPUT_FORMATS}")
  return (image.astype(np.float32) - mean) / std
