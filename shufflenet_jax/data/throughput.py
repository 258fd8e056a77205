"""How fast this machine's cores run a config's train transform: the host side of the plans.

`launch.py compile` and `sweep --plan` estimate how many images per second a TPU host must
deliver; this module times the configured transform (decode + crop + flip [+ jitter]) on one core
here, on generated photo-like JPEGs of ImageNet's typical size, to turn that into cores.
"""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

# ImageNet's typical train image: 500x375 (its mean is about 470x390).
TYPICAL_IMAGENET_SIZE = (500, 375)


def photo_like_jpegs(width: int, height: int, count: int = 8, seed: int = 0) -> list[bytes]:
  """Smooth random images: they compress (~40 KB at 500x375, quality 90) and decode like photos."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    base = rng.integers(0, 255, (max(1, height // 16), max(1, width // 16), 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(base).resize((width, height), Image.BICUBIC).save(buffer, "JPEG", quality=90)
    out.append(buffer.getvalue())
  return out


def per_core_rate(config, seconds: float = 1.0) -> float:
  """img/s one core of this machine delivers with the config's train transform."""
  from shufflenet_jax.data import pipeline
  rng = np.random.default_rng(0)
  if config.augment == "imagenet":
    jpegs = photo_like_jpegs(*TYPICAL_IMAGENET_SIZE)
    step = lambda i: pipeline.augment_batch(config, [jpegs[i % len(jpegs)]], np.array([i]), 0)
    images_per_call = 1
  else:  # small images: one call augments a whole batch
    images_per_call = 256
    images = list(rng.integers(0, 256, (images_per_call, config.input_size, config.input_size,
                                        config.in_channels), np.uint8))
    step = lambda i: pipeline.augment_batch(config, images,
                                            np.arange(images_per_call) + i * images_per_call, 0)
  step(0)
  calls, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    step(calls)
    calls += 1
  return calls * images_per_call / (time.perf_counter() - start)
