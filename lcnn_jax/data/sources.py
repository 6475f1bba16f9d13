"""Random-access sources of (image, label) records: an image folder, TFDS array_record, IDX files
(Fashion-MNIST, MNIST and their family), digits, synthetic.

A source is a split of a dataset: ``len(source)``, ``source[i] -> (raw image, label)`` and
``source.describe(i)`` (where record i lives, for messages), plus ``labels`` (int32, one per record)
for class-balanced sampling. The raw image is the encoded file for photographs (decoded by
:class:`~lcnn_jax.data.transforms.PhotoTransform`), an array for IDX, digits and synthetic data. Sources are
picklable, so grain worker processes can read them.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import os
from typing import NamedTuple, Sequence

import numpy as np
from absl import logging

from lcnn_jax.data.transforms import CorruptImageError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # Compared case-insensitively.
DIGITS_EVAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # Fixed: the digits split does not depend on the run's seed.
SYNTHETIC_SEED = 20170721  # Synthetic images depend on (this, split, index) only.
_SCAN_THREADS = 16  # Directory listings and TFDS label reads are I/O bound.


class Splits(NamedTuple):
  """A dataset's training and evaluation sources and what they share."""
  train: object
  eval: object
  num_classes: int
  class_names: list[str] | None
  channels: int
  natural_size: int  # The crop size used when data.image_size is 0.


# ------------------------------------------------------------------ image folder


def _layout(root: str, train_split: str, eval_split: str) -> str:
  return (f"expected {root}/{train_split}/<class>/*.JPEG and {root}/{eval_split}/<class>/*.JPEG "
          f"(.jpeg, .jpg or .png, any case; the same class folders in both); pass --config.data.dir")


class FolderSource:
  """Images of one split of an ImageNet-style folder: ``split_dir/<class>/<file>``."""

  def __init__(self, split_dir: str, class_names: Sequence[str], filenames: np.ndarray,
               labels: np.ndarray):
    self.split_dir = split_dir
    self.class_names = list(class_names)
    self.filenames = filenames  # (n,) bytes, file names inside their class folder.
    self.labels = labels  # (n,) int32

  def __len__(self) -> int:
    return len(self.labels)

  def describe(self, index: int) -> str:
    return os.path.join(self.split_dir, self.class_names[self.labels[index]],
                        os.fsdecode(self.filenames[index]))

  def __getitem__(self, index: int) -> tuple[bytes, int]:
    path = self.describe(index)
    try:
      with open(path, "rb") as f:
        return f.read(), int(self.labels[index])
    except OSError as error:
      raise CorruptImageError(f"{type(error).__name__}: {error}") from error


def _class_folders(split_dir: str) -> list[str]:
  with os.scandir(split_dir) as entries:
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: str) -> tuple[list[str], int]:
  """The image files of a class folder, sorted, and how many other files it holds."""
  images, others = [], 0
  with os.scandir(class_dir) as entries:
    for entry in entries:
      if not entry.is_file() or entry.name.startswith("."):
        continue
      if entry.name.lower().endswith(IMAGE_EXTENSIONS):
        images.append(entry.name)
      else:
        others += 1
  return sorted(images), others


def _scan_split(root: str, split: str, class_names: Sequence[str], layout: str) -> FolderSource:
  split_dir = os.path.join(root, split)
  class_dirs = [os.path.join(split_dir, name) for name in class_names]
  with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
    listings = list(pool.map(_image_files, class_dirs))
  filenames, labels, ignored = [], [], 0
  for label, (class_dir, (images, others)) in enumerate(zip(class_dirs, listings)):
    if not images:
      raise ValueError(f"Class folder {class_dir} holds no images: {layout}.")
    filenames.extend(os.fsencode(name) for name in images)
    labels.extend([label] * len(images))
    ignored += others
  if ignored:
    logging.warning("%s: ignored %d files without an image extension %s.", split_dir, ignored,
                    IMAGE_EXTENSIONS)
  return FolderSource(split_dir, class_names, np.array(filenames), np.array(labels, np.int32))


def open_folder(root: str, train_split: str, eval_split: str) -> Splits:
  """Indexes ``root/train_split/<class>/*`` and ``root/eval_split/<class>/*``, checking the layout.

  Raises:
    FileNotFoundError: ``root`` or a split folder does not exist.
    ValueError: no class folders, an empty class folder, or different class folders in the splits.
  """
  layout = _layout(root or "DIR", train_split, eval_split)
  if not root:
    raise ValueError(f"data.name='folder' needs data.dir: {layout}.")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"Image folder {root} does not exist: {layout}.")
  classes = {}
  for split in (train_split, eval_split):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      raise FileNotFoundError(f"Split folder {split_dir} does not exist: {layout}.")
    classes[split] = _class_folders(split_dir)
    if not classes[split]:
      loose = _image_files(split_dir)[0]
      hint = (f" It holds {len(loose)} images directly; sort them into class folders (ImageNet's "
              f"flat val/ is sorted by the usual valprep.sh).") if loose else ""
      raise ValueError(f"Split folder {split_dir} has no class folders: {layout}.{hint}")
  train_classes, eval_classes = classes[train_split], classes[eval_split]
  if train_classes != eval_classes:
    only_train = sorted(set(train_classes) - set(eval_classes))
    only_eval = sorted(set(eval_classes) - set(train_classes))
    raise ValueError(
        f"The class folders of {os.path.join(root, train_split)} and {os.path.join(root, eval_split)} "
        f"differ: {len(only_train)} only in {train_split} {only_train[:5]}, {len(only_eval)} only in "
        f"{eval_split} {only_eval[:5]}: {layout}.")
  train = _scan_split(root, train_split, train_classes, layout)
  evaluation = _scan_split(root, eval_split, train_classes, layout)
  logging.info("Image folder %s: %d classes, %d %s and %d %s images.", root, len(train_classes),
               len(train), train_split, len(evaluation), eval_split)
  return Splits(train, evaluation, len(train_classes), train_classes, channels=3, natural_size=224)


# ------------------------------------------------------------------ TFDS array_record


class TfdsSource:
  """One split of a TFDS dataset prepared in array_record, read with ``tfds.data_source``.

  Images come back encoded (``SkipDecoding``); :class:`PhotoTransform` decodes them, so a JPEG is
  decoded once, at reduced scale where possible.
  """

  def __init__(self, name: str, split: str, data_dir: str | None, image_key: str, label_key: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name, self.split = name, split
    self.image_key, self.label_key = image_key, label_key
    self._records = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                     decoders={image_key: tfds.decode.SkipDecoding()})
    self._labels = None

  def __len__(self) -> int:
    return len(self._records)

  def describe(self, index: int) -> str:
    return f"tfds:{self.name} split {self.split!r} record {index}"

  def __getitem__(self, index: int) -> tuple[bytes, int]:
    record = self._records[index]
    return record[self.image_key], int(record[self.label_key])

  def _read_labels(self, indices: range) -> np.ndarray:
    records = self._records.__getitems__(list(indices))
    return np.array([int(r[self.label_key]) for r in records], np.int32)

  @property
  def labels(self) -> np.ndarray:
    """The label of every record: one pass over the split (images are not decoded), then memoised."""
    if self._labels is None:
      logging.info("Reading the labels of the %d records of %s (once).", len(self), self.describe(0))
      chunk = 4096
      chunks = [range(s, min(s + chunk, len(self))) for s in range(0, len(self), chunk)]
      with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
        self._labels = np.concatenate([np.zeros(0, np.int32), *pool.map(self._read_labels, chunks)])
    return self._labels

  @labels.setter
  def labels(self, value: np.ndarray) -> None:
    self._labels = np.asarray(value, np.int32)


def open_tfds(name: str, data_dir: str | None, train_split: str, eval_split: str) -> Splits:
  """Opens a TFDS image-classification dataset prepared in array_record format.

  ``eval_split`` "" picks ``validation``, else ``test``. Raises ValueError (what was found and how to
  build the dataset) when the dataset is missing, not in array_record, or not image classification.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets)"
  build = (f"build it once with `tfds build {name} --file_format=array_record --data_dir=DIR` "
           f"(needs TensorFlow) and pass --config.data.dir=DIR")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(f"TFDS dataset {name!r} not found in {where}: {build}.") from error
  if not builder.is_prepared():
    raise ValueError(f"TFDS dataset {name!r} is not prepared in {where} (looked in "
                     f"{builder.data_dir}): {build}.")
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if file_format != "array_record":
    raise ValueError(
        f"TFDS dataset {name!r} in {builder.data_dir} is stored as {file_format}; random access needs "
        f"array_record: convert it with `tfds convert_format --root_data_dir={builder.data_dir} "
        f"--out_file_format=array_record` or rebuild it with --file_format=array_record.")
  info = builder.info
  image_key, label_key = info.supervised_keys or ("image", "label")
  features = info.features
  if (image_key not in features or label_key not in features
      or not isinstance(features[image_key], tfds.features.Image)
      or not isinstance(features[label_key], tfds.features.ClassLabel)):
    raise ValueError(f"TFDS dataset {name!r} is not image classification: expected an Image feature "
                     f"{image_key!r} and a ClassLabel {label_key!r}, found {features}.")
  if not eval_split:
    eval_split = next((s for s in ("validation", "test") if s in info.splits), "")
    if not eval_split:
      raise ValueError(f"TFDS dataset {name!r} has no 'validation' or 'test' split "
                       f"(splits: {list(info.splits)}): pass --config.data.eval_split.")
  height, width, channels = features[image_key].shape
  channels = channels or 3
  if channels not in (1, 3):
    raise ValueError(f"TFDS dataset {name!r}: images with {channels} channels; expected 1 or 3.")
  splits = []
  for split in (train_split, eval_split):
    try:
      splits.append(TfdsSource(name, split, data_dir, image_key, label_key))
    except ValueError as error:
      raise ValueError(f"TFDS dataset {name!r}: split {split!r}: {error}; splits are "
                       f"{list(info.splits)} (pass --config.data.train_split/eval_split).") from error
  natural_size = min(height, width) if height and width else 224
  names = list(features[label_key].names)
  logging.info("TFDS %s from %s: %d classes, %d %s and %d %s records.", name, builder.data_dir,
               len(names), len(splits[0]), train_split, len(splits[1]), eval_split)
  return Splits(splits[0], splits[1], len(names), names, channels, natural_size)


# ------------------------------------------------------------------ IDX files (the MNIST family)

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")  # Each read as is, or with a .gz suffix.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package.
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
# The IDX type byte → big-endian NumPy dtype.
IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _idx_path(directory: str, name: str) -> str | None:
  """``directory/name`` or ``directory/name.gz``, whichever exists (the plain file first), else None."""
  for candidate in (name, f"{name}.gz"):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def read_idx(path: str) -> np.ndarray:
  """The array stored in an IDX file (gzip-compressed when ``path`` ends in .gz), in native byte order.

  The header is 0, 0, a type byte (see ``IDX_DTYPES``), the number of dimensions, then each dimension
  as a big-endian uint32; the data follows, big-endian, row-major, and must fill the file exactly.

  Raises:
    ValueError: naming the file, when it is not gzip data (for .gz), has a bad magic number or type,
      is shorter than its header says (truncated) or longer (trailing bytes).
  """
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        data = f.read()
    else:
      with open(path, "rb") as f:
        data = f.read()
  except (gzip.BadGzipFile, EOFError, OSError) as error:  # EOFError: a truncated .gz stream.
    raise ValueError(f"IDX file {path} cannot be read ({type(error).__name__}: {error}); replace it.") from error
  if len(data) < 4:
    raise ValueError(f"IDX file {path} holds {len(data)} bytes, shorter than the 4-byte magic number: "
                     f"it is truncated; replace it.")
  zero, zero2, type_byte, ndim = data[:4]
  if zero or zero2 or type_byte not in IDX_DTYPES or ndim == 0:
    raise ValueError(f"IDX file {path} starts with bytes {data[:4].hex()}, not an IDX magic number "
                     f"(00 00, a type in {sorted(f'{t:02x}' for t in IDX_DTYPES)}, at least 1 dimension): "
                     f"not an IDX file (a .gz file not named .gz?); replace it.")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"IDX file {path} is truncated inside its header ({len(data)} bytes, the "
                     f"{ndim} dimensions need {header}); replace it.")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
  dtype = IDX_DTYPES[type_byte]
  expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) != expected:
    what = "truncated" if len(data) < expected else "longer than its header says (trailing bytes)"
    raise ValueError(f"IDX file {path} is {what}: shape {shape} of {dtype.name} needs {expected} bytes, "
                     f"the file holds {len(data)}; replace it.")
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_split(images_path: str, labels_path: str, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
  """(n, h, w, 1) uint8 images and (n,) int32 labels of one split, their shapes and counts checked."""
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise ValueError(f"IDX file {images_path} holds {images.dtype.name} of shape {images.shape}; images "
                     f"should be uint8 (count, rows, columns).")
  if labels.ndim != 1 or labels.dtype != np.uint8:
    raise ValueError(f"IDX file {labels_path} holds {labels.dtype.name} of shape {labels.shape}; labels "
                     f"should be uint8 (count,).")
  if len(images) != len(labels):
    raise ValueError(f"IDX files {images_path} and {labels_path} disagree: {len(images)} images but "
                     f"{len(labels)} labels.")
  if not len(labels):
    raise ValueError(f"IDX file {labels_path} holds no records.")
  if num_classes is not None and labels.max() >= num_classes:
    raise ValueError(f"IDX file {labels_path} holds label {labels.max()}; expected labels 0..{num_classes - 1}.")
  return images[..., None], labels.astype(np.int32)


def open_idx(directory: str, *, name: str = "idx", class_names: Sequence[str] | None = None,
             get_them: str = "") -> Splits:
  """The four standard IDX files of ``directory`` (each plain or .gz): train and t10k images and labels.

  Images are uint8 (n, h, w, 1), square; the number of classes is ``len(class_names)`` when given, else
  the largest label + 1. ``get_them`` adds to the message for missing files (where to get them).

  Raises:
    FileNotFoundError: naming the directory, the files expected and ``get_them``.
    ValueError: a file that is not IDX, truncated, of the wrong shape or type, or splits that disagree.
  """
  if not directory:
    raise ValueError(f"data.name={name!r} needs data.dir: a directory holding {', '.join(IDX_FILES)} "
                     f"(each plain or .gz).")
  paths = [_idx_path(directory, file) for file in IDX_FILES]
  if None in paths:
    missing = [f"{file}[.gz]" for file, path in zip(IDX_FILES, paths) if path is None]
    where = ("does not exist" if not os.path.isdir(directory) else f"lacks {', '.join(missing)}")
    raise FileNotFoundError(
        f"IDX directory {directory} {where}: expected the four files {', '.join(IDX_FILES)} (each plain "
        f"or .gz){get_them}; pass --config.data.dir=DIR.")
  num_classes = len(class_names) if class_names else None
  train_images, train_labels = _idx_split(paths[0], paths[1], num_classes)
  eval_images, eval_labels = _idx_split(paths[2], paths[3], num_classes)
  if train_images.shape[1:] != eval_images.shape[1:] or train_images.shape[1] != train_images.shape[2]:
    raise ValueError(f"IDX images of {paths[0]} are {train_images.shape[1:3]} and of {paths[2]} "
                     f"{eval_images.shape[1:3]}: expected the same square size in both.")
  if num_classes is None:
    num_classes = int(max(train_labels.max(), eval_labels.max())) + 1
    class_names = [str(c) for c in range(num_classes)]
  logging.info("IDX %s from %s: %d classes, %d train and %d eval images of %dx%d.", name, directory,
               num_classes, len(train_labels), len(eval_labels), *train_images.shape[1:3])
  return Splits(ArraySource(f"{paths[0]} image", train_images, train_labels),
                ArraySource(f"{paths[2]} image", eval_images, eval_labels), num_classes,
                list(class_names), channels=1, natural_size=train_images.shape[1])


def open_fashion_mnist(directory: str) -> Splits:
  """Fashion-MNIST's IDX files, from ``directory`` or Debian's ``dataset-fashion-mnist`` location."""
  get_them = (f"; install them with `apt-get install dataset-fashion-mnist` (into {FASHION_MNIST_DIR}) or "
              f"download the four .gz files from {FASHION_MNIST_URL} into a directory")
  return open_idx(directory or FASHION_MNIST_DIR, name="fashion_mnist",
                  class_names=FASHION_MNIST_CLASSES, get_them=get_them)


# ------------------------------------------------------------------ digits


class ArraySource:
  """Images held in memory: (n, h, w, c) with their (n,) labels."""

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray):
    self.name = name
    self.images = images
    self.labels = labels  # (n,) int32

  def __len__(self) -> int:
    return len(self.labels)

  def describe(self, index: int) -> str:
    return f"{self.name}[{index}]"

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.images[index], int(self.labels[index])


def open_digits() -> Splits:
  """scikit-learn's handwritten digits: 1,797 8×8 images with values 0–16, as floats in [0, 1].

  The 80/20 train/eval split is stratified by class with a fixed seed, independent of the run's seed.
  """
  import sklearn.datasets  # pylint: disable=g-import-not-at-top
  import sklearn.model_selection  # pylint: disable=g-import-not-at-top
  digits = sklearn.datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
  labels = digits.target.astype(np.int32)
  train, evaluation = sklearn.model_selection.train_test_split(
      np.arange(len(labels)), test_size=DIGITS_EVAL_FRACTION, stratify=labels,
      random_state=DIGITS_SPLIT_SEED)
  train, evaluation = np.sort(train), np.sort(evaluation)
  names = [str(d) for d in range(10)]
  return Splits(ArraySource("digits train", images[train], labels[train]),
                ArraySource("digits eval", images[evaluation], labels[evaluation]),
                10, names, channels=1, natural_size=8)


# ------------------------------------------------------------------ synthetic


class SyntheticSource:
  """Random uint8 (size, size, 3) images; image and label are functions of (split, index) only."""

  def __init__(self, split: int, size: int, num_examples: int, num_classes: int):
    self.split, self.size = split, size
    self.num_examples, self.num_classes = num_examples, num_classes

  def __len__(self) -> int:
    return self.num_examples

  def describe(self, index: int) -> str:
    return f"synthetic split {self.split} example {index}"

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng((SYNTHETIC_SEED, self.split, index))
    image = np.frombuffer(rng.bytes(self.size * self.size * 3), np.uint8)
    return image.reshape(self.size, self.size, 3), index % self.num_classes

  @property
  def labels(self) -> np.ndarray:
    return (np.arange(self.num_examples) % self.num_classes).astype(np.int32)


def open_synthetic(size: int, num_train: int, num_eval: int, num_classes: int) -> Splits:
  """ImageNet-shaped random data for throughput work (defaults: ImageNet's sizes)."""
  return Splits(SyntheticSource(0, size, num_train, num_classes),
                SyntheticSource(1, size, num_eval, num_classes),
                num_classes, None, channels=3, natural_size=224)


# ------------------------------------------------------------------ class and example subsets


class SubsetSource:
  """Records ``indices`` of another source, with labels renumbered by ``relabel`` (old label → new)."""

  def __init__(self, source, indices: np.ndarray, relabel: dict[int, int]):
    self.source = source
    self.indices = indices  # (n,) int64, positions in ``source``.
    self.relabel = relabel
    self.labels = np.array([relabel[int(l)] for l in np.asarray(source.labels)[indices]], np.int32)  # (n,)

  def __len__(self) -> int:
    return len(self.indices)

  def describe(self, index: int) -> str:
    return self.source.describe(int(self.indices[index]))

  def __getitem__(self, index: int):
    raw, label = self.source[int(self.indices[index])]
    return raw, self.relabel[int(label)]


def select(splits: Splits, classes: Sequence[int] | None, examples_per_class: int, seed: int = -1) -> Splits:
  """Keeps ``classes`` (relabelled 0..n-1 in the given order) and the first ``examples_per_class``
  training records of each class, in record order; None and 0 keep everything. With ``seed`` >= 0 the
  records of each class are drawn at random instead (a permutation of the class's records seeded by
  (``seed``, class), so that for one seed the records of a smaller n are among those of a larger one).

  Evaluation keeps every record of the kept classes. Raises ValueError naming a class outside the
  dataset, a repeated class, or a kept class with fewer training records than asked for.
  """
  if classes is None and not examples_per_class:
    return splits
  classes = list(range(splits.num_classes)) if classes is None else [int(c) for c in classes]
  if len(set(classes)) != len(classes) or any(not 0 <= c < splits.num_classes for c in classes):
    raise ValueError(f"data.classes={tuple(classes)}: expected distinct class indices in "
                     f"[0, {splits.num_classes}).")
  relabel = {old: new for new, old in enumerate(classes)}

  def keep(source, per_class: int) -> SubsetSource:
    labels = np.asarray(source.labels)
    chosen = []
    for old in classes:
      where = np.flatnonzero(labels == old)
      if per_class and len(where) < per_class:
        raise ValueError(f"data.examples_per_class={per_class}: class {old} has only {len(where)} "
                         f"training records in {source.describe(0)}; lower it.")
      if per_class and seed >= 0:
        where = np.random.default_rng([seed, old]).permutation(where)
      chosen.append(where[:per_class] if per_class else where)
    return SubsetSource(source, np.sort(np.concatenate(chosen)), relabel)

  names = [splits.class_names[c] for c in classes] if splits.class_names else None
  return Splits(keep(splits.train, examples_per_class), keep(splits.eval, 0), len(classes), names,
                splits.channels, splits.natural_size)
