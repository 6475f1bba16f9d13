"""The data sources by ``data.name``: one :class:`Source` each, registered once.

A source is one unit: how to open its records, their transform, the input it implies without data, whether it
reads files, whether evaluation sees each image whole, and what its grey images look like. Every module that needs
to know something about a source asks its :class:`Source` (``get_source(config.data.name)``): the pipeline opens,
checks, transforms and normalises through it, the inspection counts an untrained config with its
``input_facts``, the exporter derives an old run's resize rule from it, the prediction command reads its
``polarity``, the main command its ``reads_files``. Adding a source is its unit plus one line::

    register_source(Source(name="mine", open=open_mine, transform=..., input_facts=..., reads_files=True))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_collections

from lcnn_jax.data import sources
from lcnn_jax.data import transforms

FAMILY = ":"  # A registered name ending in it ("tfds:") stands for every "<prefix><dataset>" not registered itself.
IMAGENET_SIZE = (1_281_167, 50_000, 1000)  # Synthetic defaults: train and eval examples, classes.
PHOTO_RESIZE = 256 / 224  # data.resize_size 0: the shortest side is image_size · 256 / 224 before the crop.

InputFacts = tuple[int, tuple[int, int, int]]  # (num_classes, one image's (h, w, c))


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """The ``config.data`` keys that choose a source's records and transform, frozen: a source is opened once per
  process for each distinct value (the pipeline caches on it)."""
  name: str
  dir: str
  train_split: str
  eval_split: str
  image_size: int
  resize_size: int
  num_train: int
  num_eval: int
  num_classes: int
  flip: bool | None

  @classmethod
  def of(cls, data: ml_collections.ConfigDict) -> SourceConfig:
    """The frozen view of ``config.data``."""
    return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Source:
  """One data source, as every module that needs to know about it sees it.

  Attributes:
    name: its ``data.name``; a name ending in ":" (``"tfds:"``) is a family matching ``"tfds:<dataset>"``.
    open: the source's records, ``SourceConfig -> sources.Splits`` (raises ValueError or FileNotFoundError naming
      what is missing and how to get it).
    transform: ``(SourceConfig, Splits, image_size, resize_size) ->`` an object with ``train(raw, rng)`` and
      ``eval(raw)`` giving unnormalised (image_size, image_size, channels) images (:mod:`.transforms`).
    input_facts: ``config.data -> (num_classes, (h, w, c))``, the input the config implies without data (an
      untrained config is counted with it).
    reads_files: whether ``data.dir`` is read (otherwise a set ``data.dir`` is ignored, with a warning).
    evaluated_whole: whether evaluation sees each stored image whole, only resized to ``image_size``; otherwise
      its shortest side is resized to ``resize_size`` and the centre ``image_size`` crop is evaluated.
    polarity: what a grey image of the source looks like, for users preparing their own; None when unknown.
    statistics: the exact per-channel (mean, std) of its pixels in [0, 1], when known without data; None: they
      are computed from a sample of training images (and cached).
    takes_flip: whether ``data.flip`` applies (it is rejected for the other sources).
    check: the source's own checks of ``config.data`` (raising ValueError naming the key), or None.
  """
  name: str
  open: Callable[[SourceConfig], sources.Splits]
  transform: Callable[[SourceConfig, sources.Splits, int, int], Any]
  input_facts: Callable[[ml_collections.ConfigDict], InputFacts]
  reads_files: bool
  evaluated_whole: bool = False
  polarity: str | None = None
  statistics: tuple[tuple[float, ...], tuple[float, ...]] | None = None
  takes_flip: bool = False
  check: Callable[[ml_collections.ConfigDict], None] | None = None

  def resize_size(self, data: ml_collections.ConfigDict | SourceConfig, image_size: int) -> int:
    """The shortest side before the evaluation crop: ``image_size`` for a source evaluated whole, else
    ``data.resize_size`` or ``image_size`` · 256 / 224."""
    if self.evaluated_whole:
      return image_size
    return data.resize_size or round(image_size * PHOTO_RESIZE)


REGISTRY: dict[str, Source] = {}


def register_source(source: Source) -> Source:
  """Makes ``source`` known by its name (replacing a source registered under it) and returns it."""
  REGISTRY[source.name] = source
  return source


def find_source(name: str) -> Source | None:
  """The source registered as ``name``, else the family whose prefix ``name`` extends, else None."""
  if name in REGISTRY and not name.endswith(FAMILY):  # A family's own name is no dataset.
    return REGISTRY[name]
  prefix, colon, dataset = name.partition(FAMILY)
  return REGISTRY.get(prefix + colon) if colon and dataset else None


def source_names(where: Callable[[Source], bool] = lambda source: True) -> tuple[str, ...]:
  """The names a user may give (a family as ``"tfds:<name>"``, its registered members left out), sorted."""
  families = [name for name in REGISTRY if name.endswith(FAMILY)]
  return tuple(sorted(name + "<name>" if name in families else name for name, source in REGISTRY.items()
                      if where(source) and not any(name.startswith(f) and name != f for f in families)))


def get_source(name: str) -> Source:
  """The source of ``data.name`` ``name``; ValueError naming it and the known names when there is none."""
  source = find_source(name)
  if source is None:
    raise ValueError(f"data.name={name!r}: expected one of {source_names()}.")
  return source


# ------------------------------------------------------------------ the sources of this package


def _square(size: int, channels: int, classes: int, *, fixed_classes: bool = False):
  """``input_facts`` of ``classes`` classes (``data.num_classes`` overrides unless fixed) of ``size``-square images
  of ``channels`` channels (``data.image_size`` overrides the size)."""
  def input_facts(data: ml_collections.ConfigDict) -> InputFacts:
    side = data.image_size or size
    return (classes if fixed_classes else data.num_classes or classes), (side, side, channels)
  return input_facts


def _photo_transform(config: SourceConfig, splits: sources.Splits, image_size: int, resize_size: int):
  return transforms.PhotoTransform(image_size, resize_size, splits.channels)


def _check_digits(data: ml_collections.ConfigDict) -> None:
  if 0 < data.image_size < transforms.DIGIT_SIZE:
    raise ValueError(f"data.image_size={data.image_size}: digits are 8×8; use 0 (8) or a larger size to upsample.")


def _check_idx(data: ml_collections.ConfigDict) -> None:
  if data.train_split or data.eval_split or data.resize_size:
    raise ValueError(f"data.train_split={data.train_split!r}, data.eval_split={data.eval_split!r}, "
                     f"data.resize_size={data.resize_size}: {data.name!r} reads the fixed train and t10k files "
                     f"and is evaluated whole; leave them unset (\"\", 0).")


def _idx_transform(default_flip: bool):
  """IDX images flipped for training as ``data.flip`` says, by default ``default_flip`` (clothing is
  mirror-symmetric; digits and letters are not)."""
  def transform(config: SourceConfig, splits: sources.Splits, image_size: int, resize_size: int):
    flip = default_flip if config.flip is None else config.flip
    return transforms.IdxTransform(image_size, splits.natural_size, flip)
  return transform


def _open_synthetic(config: SourceConfig) -> sources.Splits:
  return sources.open_synthetic(config.image_size or 224, config.num_train or IMAGENET_SIZE[0],
                                config.num_eval or IMAGENET_SIZE[1], config.num_classes or IMAGENET_SIZE[2])


def _open_tfds(config: SourceConfig) -> sources.Splits:
  return sources.open_tfds(config.name.partition(FAMILY)[2], config.dir or None, config.train_split or "train",
                           config.eval_split)


BRIGHT_STROKES = "white (bright) strokes on a black background"
BRIGHT_GARMENT = "a bright garment on a black background: invert photos on a white background first"

register_source(Source(
    name="digits", open=lambda config: sources.open_digits(),
    transform=lambda config, splits, image_size, resize_size: transforms.DigitsTransform(image_size),
    input_facts=_square(transforms.DIGIT_SIZE, 1, 10, fixed_classes=True), reads_files=False,
    evaluated_whole=True, check=_check_digits,
    polarity=f"{BRIGHT_STROKES}, like scikit-learn's digits: invert black-on-white drawings first"))
register_source(Source(
    name="idx", open=lambda config: sources.open_idx(config.dir), transform=_idx_transform(False),
    input_facts=_square(28, 1, 10), reads_files=True, evaluated_whole=True, takes_flip=True, check=_check_idx,
    polarity="bright strokes or objects on a black background, as in MNIST-style IDX files: invert dark-on-light "
             "images first"))
register_source(Source(
    name="fashion_mnist", open=lambda config: sources.open_fashion_mnist(config.dir), transform=_idx_transform(True),
    input_facts=_square(28, 1, 10), reads_files=True, evaluated_whole=True, takes_flip=True, check=_check_idx,
    polarity=BRIGHT_GARMENT))
register_source(Source(
    name="folder",
    open=lambda config: sources.open_folder(config.dir, config.train_split or "train", config.eval_split or "val"),
    transform=_photo_transform, input_facts=_square(224, 3, 1000), reads_files=True))
TFDS = register_source(Source(name="tfds:", open=_open_tfds, transform=_photo_transform,
                              input_facts=_square(224, 3, 1000), reads_files=True))
register_source(dataclasses.replace(TFDS, name="tfds:mnist",
                                    polarity=f"{BRIGHT_STROKES}: invert black-on-white drawings first"))
register_source(dataclasses.replace(TFDS, name="tfds:fashion_mnist", polarity=BRIGHT_GARMENT))
register_source(Source(
    name="synthetic", open=_open_synthetic,
    transform=lambda config, splits, image_size, resize_size: transforms.SyntheticTransform(),
    input_facts=_square(224, 3, IMAGENET_SIZE[2]), reads_files=False,
    statistics=((0.5,) * 3, (math.sqrt((256**2 - 1) / 12) / 255,) * 3)))  # Uniform over 0..255, scaled by 1/255.
