"""Image decoding and the original's transforms (REFERENCE §5), in NumPy and PIL.

Photographs (folder and TFDS sources): shortest side → ``resize_size`` (bilinear, antialiased), then a
random ``image_size`` crop and a horizontal flip for training, a centre crop for evaluation. Digits: a ±1
pixel random translation for training (zero padding, then a random 8×8 crop), no flip (digits are not
mirror-symmetric), and bilinear upsampling when ``image_size`` > 8. Synthetic images are generated at
``image_size``; training flips them. IDX images (28×28 grey, the MNIST family): a ±2 pixel random
translation for training (zero padding, then a random crop), a horizontal flip only where the classes are
mirror-symmetric (clothing: ``data.flip``), bilinear resizing when ``image_size`` differs. Every transform
returns an unnormalised image; :class:`Normalize` turns it into float32 (x − mean) / std with x in [0, 1].
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

DIGIT_SIZE = 8  # load_digits images are 8×8.
DIGIT_SHIFT = 1  # Training translation of digits, in pixels.
IDX_SHIFT = 2  # Training translation of 28×28 IDX images, in pixels (the object keeps ≥ 24 of 28 rows).

# What PIL raises on a file that is not a readable image: zero bytes or unknown format
# (UnidentifiedImageError, an OSError), truncated data (OSError), malformed headers (SyntaxError,
# ValueError, EOFError), and absurd sizes.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class CorruptImageError(Exception):
  """An image that cannot be read or decoded."""


def decode_image(data: bytes, channels: int, min_side: int = 0) -> Image.Image:
  """Decodes encoded image bytes (JPEG, PNG, ...) to an RGB (channels=3) or grey (channels=1) image.

  With ``min_side`` > 0 a JPEG is decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) whose both
  sides stay ≥ ``min_side`` (PIL's ``draft``): the later resize to ``min_side`` sees the same detail at
  a fraction of the decoding cost.

  Raises:
    CorruptImageError: ``data`` is not a decodable image.
  """
  mode = "RGB" if channels == 3 else "L"
  try:
    with Image.open(io.BytesIO(data)) as image:
      if min_side:
        image.draft(mode, (min_side, min_side))
      return image.convert(mode)
  except _DECODE_ERRORS as error:
    raise CorruptImageError(f"{type(error).__name__}: {error}") from error


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
  """Scales ``image`` so that its shorter side is ``size``, keeping the aspect ratio."""
  width, height = image.size
  if min(width, height) == size:
    return image
  scale = size / min(width, height)
  new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
  return image.resize(new_size, Image.BILINEAR)


def as_array(image: Image.Image) -> np.ndarray:
  """A PIL image as a (h, w, c) uint8 array (grey images get a channel axis)."""
  array = np.asarray(image)
  return array[..., None] if array.ndim == 2 else array


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """A uniformly placed size×size crop of a (h, w, c) image with h, w ≥ size."""
  top = rng.integers(0, image.shape[0] - size + 1)
  left = rng.integers(0, image.shape[1] - size + 1)
  return image[top:top + size, left:left + size]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central size×size crop of a (h, w, c) image with h, w ≥ size."""
  top = (image.shape[0] - size) // 2
  left = (image.shape[1] - size) // 2
  return image[top:top + size, left:left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """``image`` mirrored left–right with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


class PhotoTransform:
  """Encoded photograph → resized and cropped uint8 (image_size, image_size, channels)."""

  def __init__(self, image_size: int, resize_size: int, channels: int):
    self.image_size = image_size
    self.resize_size = resize_size
    self.channels = channels

  def _resized(self, data: bytes) -> np.ndarray:
    image = decode_image(data, self.channels, min_side=self.resize_size)
    return as_array(resize_shortest_side(image, self.resize_size))

  def train(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
    """Resize, random crop, random horizontal flip."""
    return random_flip(random_crop(self._resized(data), self.image_size, rng), rng)

  def eval(self, data: bytes) -> np.ndarray:
    """Resize, centre crop."""
    return center_crop(self._resized(data), self.image_size)


class DigitsTransform:
  """A float (8, 8, 1) digit in [0, 1] → float32 (image_size, image_size, 1); no flip."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def _upsampled(self, digit: np.ndarray) -> np.ndarray:
    if self.image_size == DIGIT_SIZE:
      return digit
    image = Image.fromarray(np.ascontiguousarray(digit[..., 0], dtype=np.float32))
    return np.asarray(image.resize((self.image_size, self.image_size), Image.BILINEAR))[..., None]

  def train(self, digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random translation by up to ±1 pixel (zero fill), then upsampling."""
    padded = np.pad(digit, ((DIGIT_SHIFT, DIGIT_SHIFT), (DIGIT_SHIFT, DIGIT_SHIFT), (0, 0)))
    return self._upsampled(random_crop(padded, DIGIT_SIZE, rng))

  def eval(self, digit: np.ndarray) -> np.ndarray:
    """Upsampling only."""
    return self._upsampled(digit)


class IdxTransform:
  """A uint8 (n, n, 1) IDX image → uint8 (image_size, image_size, 1); flipped for training when ``flip``."""

  def __init__(self, image_size: int, natural_size: int, flip: bool):
    self.image_size, self.natural_size, self.flip = image_size, natural_size, flip

  def _resized(self, image: np.ndarray) -> np.ndarray:
    if self.image_size == self.natural_size:
      return image
    resized = Image.fromarray(image[..., 0]).resize((self.image_size, self.image_size), Image.BILINEAR)
    return as_array(resized)

  def train(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random translation by up to ±2 pixels (zero fill), a random flip if ``flip``, then resizing."""
    padded = np.pad(image, ((IDX_SHIFT, IDX_SHIFT), (IDX_SHIFT, IDX_SHIFT), (0, 0)))
    shifted = random_crop(padded, self.natural_size, rng)
    return self._resized(random_flip(shifted, rng) if self.flip else shifted)

  def eval(self, image: np.ndarray) -> np.ndarray:
    """Resizing only (none at the natural size): the stored image as is."""
    return self._resized(image)


class SyntheticTransform:
  """A generated uint8 image, already at image_size: flipped for training, unchanged for evaluation."""

  def train(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return random_flip(image, rng)

  def eval(self, image: np.ndarray) -> np.ndarray:
    return image


class Normalize:
  """Per-channel (x − mean) / std as float32, with x = pixel / 255 for uint8 images, as is otherwise."""

  def __init__(self, mean: Sequence[float], std: Sequence[float]):
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)  # (channels,)
    self.scale = (1 / std).astype(np.float32)
    self.pixel_scale = (1 / (255 * std)).astype(np.float32)
    self.offset = (-mean / std).astype(np.float32)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    normalized = image.astype(np.float32)  # (h, w, channels), a copy
    normalized *= self.pixel_scale if image.dtype == np.uint8 else self.scale
    normalized += self.offset
    return normalized
