"""The grain input pipeline: dataset info, normalisation statistics, train and eval iterators.

Training: ``range(n).seed(seed).shuffle().random_map(example)[process::processes].repeat()
.batch(local_batch).to_iter_dataset()``, then ``mp_prefetch`` when ``data.num_workers`` > 0. The
random map sits before the shard so that its random stream is indexed by the global position: every
process draws different crops (and, with ``data.balanced``, different samples), and epochs reshuffle.

Unreadable images (zero bytes, truncated or non-image data under an image name, unreadable files)
cannot be dropped by a map, so: in training, an unreadable record is replaced by the next readable
one (index + 1, + 2, …, with that record's label); in evaluation, its slot is masked out. Either way
an absl warning names the file and :func:`corrupt_count` counts it (counted in the main process,
as batches are delivered, so it also counts what grain worker processes skipped).
``data.fatal_corrupt=True`` raises :class:`CorruptImageError` naming the file instead.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

import ml_collections
import numpy as np
from absl import flags
from absl import logging

from lcnn_jax.data import registry
from lcnn_jax.data import sources
from lcnn_jax.data import transforms
from lcnn_jax.data.transforms import CorruptImageError

if TYPE_CHECKING:  # annotations only: grain is imported where a pipeline is built (_grain)
  import grain

STATS_FILE = "data_stats.json"
MAX_CONSECUTIVE_CORRUPT = 64  # More unreadable records in a row than this is not a skippable accident.
_SKIPPED = "skipped"  # Per-example count of unreadable records, summed and removed before delivery.

_skipped_total = 0
_skipped_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and trainer need to know about a dataset."""
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (height, width, channels) of a batch's images.
  num_train: int
  num_eval: int
  class_names: list[str] | None
  mean: tuple[float, ...]  # Per channel, of pixels scaled to [0, 1].
  std: tuple[float, ...]
  resize_size: int | None = None  # Shortest side before the evaluation crop; None: not known (made without data).

  def preprocessing(self) -> dict[str, Any] | None:
    """How an image is prepared for the model (:func:`preprocessing`), saved with the run's dataset facts; None
    when ``resize_size`` is not known."""
    if self.resize_size is None:
      return None
    return _preprocessing(self.image_shape, self.resize_size, self.mean, self.std)


def _preprocessing(image_shape, resize_size: int, mean, std) -> dict[str, Any]:
  image_size, _, channels = image_shape
  return {"image_size": int(image_size), "resize_size": int(resize_size), "channels": int(channels),
          "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def preprocessing(data: ml_collections.ConfigDict, dataset: dict[str, Any]) -> dict[str, Any]:
  """How a run's images were prepared for evaluation: ``image_size`` (the centre crop), ``resize_size`` (the
  shortest side before it), ``channels``, per-channel ``mean`` and ``std`` of pixels in [0, 1].

  The run's saved dataset facts (``dataset``, from config.json) hold it since they were first written with it;
  for an older run it is derived once by the resize rule of its source (the dataset's ``name``) from its ``data``
  config.
  """
  if dataset.get("preprocessing"):
    return dict(dataset["preprocessing"])
  image_size = dataset["image_shape"][0]
  resize_size = registry.get_source(dataset["name"]).resize_size(data, image_size)
  return _preprocessing(dataset["image_shape"], resize_size, dataset["mean"], dataset["std"])


def corrupt_count() -> int:
  """How many unreadable images this process's iterators have skipped (or masked) so far."""
  return _skipped_total


def validate_config(data: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the ``data.*`` key whose value is out of its domain."""
  source = registry.get_source(data.name)
  for key in ("image_size", "resize_size", "num_workers", "prefetch", "num_classes", "num_train",
              "num_eval", "examples_per_class"):
    if data[key] < 0:
      raise ValueError(f"data.{key}={data[key]}: must be >= 0.")
  if data.examples_seed < -1:
    raise ValueError(f"data.examples_seed={data.examples_seed}: expected -1 (the first data.examples_per_class "
                     "records of each class) or a seed >= 0 (that many drawn at random).")
  if data.stats_images <= 0:
    raise ValueError(f"data.stats_images={data.stats_images}: must be > 0.")
  if source.check is not None:
    source.check(data)
  if data.flip is not None and not source.takes_flip:
    raise ValueError(f"data.flip={data.flip}: only the sources {registry.source_names(lambda s: s.takes_flip)} "
                     f"take it (photographs are always flipped, digits never).")
  if data.resize_size and data.resize_size < data.image_size:
    raise ValueError(f"data.resize_size={data.resize_size} is smaller than data.image_size="
                     f"{data.image_size}: the crop must fit in the resized image.")
  if (data.mean is None) != (data.std is None):
    raise ValueError(f"data.mean={data.mean} and data.std={data.std}: give both or neither.")
  if data.std is not None and any(s <= 0 for s in data.std):
    raise ValueError(f"data.std={tuple(data.std)}: every channel's std must be > 0.")


# ------------------------------------------------------------------ sources and transforms


class _Opened(NamedTuple):
  splits: sources.Splits
  image_size: int
  resize_size: int
  transform: Any  # The source's: train(raw, rng) and eval(raw) (registry.Source.transform).


@functools.lru_cache(maxsize=4)
def _open_cached(config: registry.SourceConfig, classes: tuple[int, ...] | None, examples_per_class: int,
                 examples_seed: int) -> _Opened:
  source = registry.get_source(config.name)
  splits = sources.select(source.open(config), classes, examples_per_class, seed=examples_seed)
  image_size = config.image_size or splits.natural_size
  resize_size = source.resize_size(config, image_size)
  return _Opened(splits, image_size, resize_size, source.transform(config, splits, image_size, resize_size))


def _open(data: ml_collections.ConfigDict) -> _Opened:
  """The dataset's sources and transform, opened (and a folder indexed) once per process."""
  classes = None if data.classes is None else tuple(int(c) for c in data.classes)
  return _open_cached(registry.SourceConfig.of(data), classes, data.examples_per_class, data.examples_seed)


# ------------------------------------------------------------------ unreadable images


def _report_corrupt(source, index: int, error: CorruptImageError, fatal: bool) -> None:
  if fatal:
    raise CorruptImageError(
        f"Unreadable image {source.describe(index)} ({error}). data.fatal_corrupt=True stops here: "
        f"remove or replace the file, or set --config.data.fatal_corrupt=False to skip and count it.")
  logging.warning("Skipping unreadable image %s (%s); counted by lcnn_jax.data.corrupt_count().",
                  source.describe(index), error)


def _read_replacing_corrupt(source, index: int, transform: Callable, fatal: bool):
  """(image, label, skipped): record ``index``, or the next readable one after ``skipped`` bad ones."""
  for skipped in range(min(MAX_CONSECUTIVE_CORRUPT, len(source))):
    position = (index + skipped) % len(source)
    try:
      raw, label = source[position]
      return transform(raw), label, skipped
    except CorruptImageError as error:
      _report_corrupt(source, position, error, fatal)
  raise CorruptImageError(f"{MAX_CONSECUTIVE_CORRUPT} unreadable records in a row from "
                          f"{source.describe(index)}: the dataset looks damaged; check it.")


def _count_skipped(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes the per-example skip counts from a delivered batch and adds them to the total."""
  global _skipped_total
  batch = dict(batch)
  skipped = int(batch.pop(_SKIPPED).sum())
  if skipped:
    with _skipped_lock:
      _skipped_total += skipped
  return batch


# ------------------------------------------------------------------ normalisation statistics


def _stats_key(data: ml_collections.ConfigDict, opened: _Opened) -> dict[str, Any]:
  key = {"name": data.name, "dir": os.path.abspath(data.dir) if data.dir else "",
         "train_split": data.train_split, "num_train": len(opened.splits.train),
         "image_size": opened.image_size, "resize_size": opened.resize_size,
         "stats_images": data.stats_images}
  if data.classes is not None or data.examples_per_class:  # A subset has statistics of its own.
    key.update(classes=None if data.classes is None else [int(c) for c in data.classes],
               examples_per_class=data.examples_per_class, examples_seed=data.examples_seed)
  return key


def _compute_mean_std(data: ml_collections.ConfigDict, opened: _Opened):
  """Per-channel mean and std of eval-transformed training images (a fixed sample of at most
  ``data.stats_images`` of them), pixels scaled to [0, 1]."""
  source = opened.splits.train
  count = min(len(source), data.stats_images)
  indices = np.sort(np.random.default_rng(0).choice(len(source), count, replace=False))
  logging.info("Computing the per-channel mean/std of %d training images.", count)

  def image(index):
    try:
      return opened.transform.eval(source[index][0])
    except CorruptImageError as error:
      _report_corrupt(source, index, error, data.fatal_corrupt)
      return None

  total = np.zeros(opened.splits.channels)
  total_sq = np.zeros(opened.splits.channels)
  pixels = 0
  with concurrent.futures.ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4)) as pool:
    for x in pool.map(image, indices):
      if x is None:
        continue
      x = x.reshape(-1, x.shape[-1]).astype(np.float64) / (255.0 if x.dtype == np.uint8 else 1.0)
      total += x.sum(0)
      total_sq += np.square(x).sum(0)
      pixels += x.shape[0]
  if not pixels:
    raise ValueError(f"None of the {count} sampled training images could be read: check the dataset.")
  mean = total / pixels
  std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _mean_std(data: ml_collections.ConfigDict, opened: _Opened, cache_dir: str | None):
  """The configured mean/std, else cached ones in ``cache_dir/data_stats.json``, else computed."""
  channels = opened.splits.channels
  if data.mean is not None:
    if len(data.mean) != channels or len(data.std) != channels:
      raise ValueError(f"data.mean={tuple(data.mean)}, data.std={tuple(data.std)}: expected "
                       f"{channels} values each for {data.name!r}.")
    return tuple(map(float, data.mean)), tuple(map(float, data.std))
  statistics = registry.get_source(data.name).statistics
  if statistics is not None:
    return statistics
  key = _stats_key(data, opened)
  path = os.path.join(cache_dir, STATS_FILE) if cache_dir else None
  if path and os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get("key") == key:
      return tuple(cached["mean"]), tuple(cached["std"])
    logging.info("%s was computed for another dataset (%s); recomputing.", path, cached.get("key"))
  mean, std = _compute_mean_std(data, opened)
  logging.info("Data mean %s, std %s.", ", ".join(f"{v:.4f}" for v in mean), ", ".join(f"{v:.4f}" for v in std))
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"  # Processes sharing a workdir write the same content.
    with open(temporary, "w") as f:
      json.dump({"key": key, "mean": mean, "std": std}, f, indent=2)
    os.replace(temporary, path)
  return mean, std


def _load_tfds_labels(source: sources.TfdsSource, cache_dir: str | None) -> None:
  """Reads (or loads from ``cache_dir``) the labels of a TFDS split once, for balanced sampling."""
  path = cache_dir and os.path.join(
      cache_dir, f"labels_{source.name}_{source.split}.npy".replace("/", "_"))
  if path and os.path.exists(path):
    labels = np.load(path)
    if len(labels) == len(source):
      source.labels = labels
      return
  labels = source.labels
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path, labels)


def dataset_info(data: ml_collections.ConfigDict, cache_dir: str | None = None) -> DatasetInfo:
  """Checks the config and the dataset (a folder's layout first), and describes the dataset.

  Cheap for digits and synthetic data. For a folder or TFDS dataset without ``data.mean``/``std``,
  the first call computes them from a sample of training images and caches them in
  ``cache_dir/data_stats.json`` (pass the run's workdir); later calls read that file.
  """
  validate_config(data)
  opened = _open(data)
  mean, std = _mean_std(data, opened, cache_dir)
  if data.balanced and isinstance(opened.splits.train, sources.TfdsSource):
    _load_tfds_labels(opened.splits.train, cache_dir)
  return DatasetInfo(
      name=data.name, num_classes=opened.splits.num_classes,
      image_shape=(opened.image_size, opened.image_size, opened.splits.channels),
      num_train=len(opened.splits.train), num_eval=len(opened.splits.eval),
      class_names=opened.splits.class_names, mean=mean, std=std, resize_size=opened.resize_size)


# ------------------------------------------------------------------ iterators


class ClassIndex:
  """Class-balanced sampling, as the original: a uniform class, then a uniform image of it."""

  def __init__(self, labels: np.ndarray):
    self.order = np.argsort(labels, kind="stable")  # Record indices grouped by class.
    counts = np.bincount(labels)
    self.classes = np.flatnonzero(counts)  # Classes with at least one record.
    self.counts = counts[self.classes]
    self.starts = (np.cumsum(counts) - counts)[self.classes]

  def sample(self, rng: np.random.Generator) -> int:
    which = rng.integers(len(self.classes))
    return int(self.order[self.starts[which] + rng.integers(self.counts[which])])


class _TrainExample:
  """Record index → one augmented, normalised training example (grain random_map)."""

  def __init__(self, source, transform, normalize, class_index: ClassIndex | None, fatal: bool):
    self.source, self.transform, self.normalize = source, transform, normalize
    self.class_index, self.fatal = class_index, fatal

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if self.class_index is not None:
      index = self.class_index.sample(rng)
    image, label, skipped = _read_replacing_corrupt(
        self.source, int(index), lambda raw: self.transform.train(raw, rng), self.fatal)
    return {"image": self.normalize(image), "label": np.int32(label), _SKIPPED: np.int32(skipped)}


class _EvalSlot:
  """Position in this process's eval stream → global eval index (≥ num_eval: padding)."""

  def __init__(self, global_batch: int, local_batch: int, process_index: int):
    self.global_batch, self.local_batch, self.process_index = global_batch, local_batch, process_index

  def __call__(self, position: int) -> int:
    batch, offset = divmod(position, self.local_batch)
    return batch * self.global_batch + self.process_index * self.local_batch + offset


class _EvalExample:
  """Global eval index → a normalised example with ``mask``; padding and unreadable images masked."""

  def __init__(self, source, transform, normalize, image_shape, fatal: bool):
    self.source, self.transform, self.normalize = source, transform, normalize
    self.image_shape, self.fatal = image_shape, fatal

  def _masked(self, skipped: int) -> dict[str, np.ndarray]:
    return {"image": np.zeros(self.image_shape, np.float32), "label": np.int32(0),
            "mask": np.bool_(False), _SKIPPED: np.int32(skipped)}

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    if index >= len(self.source):
      return self._masked(0)
    try:
      raw, label = self.source[index]
      image = self.transform.eval(raw)
    except CorruptImageError as error:
      _report_corrupt(self.source, index, error, self.fatal)
      return self._masked(1)
    return {"image": self.normalize(image), "label": np.int32(label), "mask": np.bool_(True),
            _SKIPPED: np.int32(0)}


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}: expected "
                     f"0 <= process_index < process_count.")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"Global batch size {global_batch_size} must be positive and divisible by the "
                     f"process count {process_count}: change train.batch_size (or "
                     f"train.eval_batch_size).")
  return global_batch_size // process_count


def _grain():
  """grain, imported where a pipeline is built: the trainer's step (and ``python -m lcnn_jax.devicecheck``'s
  training measurement) runs without it."""
  try:
    import grain  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("The input pipeline needs grain: pip install grain (docs/accelerators.md shows how to "
                      "install it from carried wheels on a machine without a package index).") from e
  return grain


def _deliver(dataset: grain.MapDataset, data: ml_collections.ConfigDict) -> grain.DatasetIterator:
  """Reading threads, worker processes when asked, skip counting in this process."""
  grain = _grain()
  reading = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=data.prefetch, prefetch_buffer_size=data.prefetch))
  if data.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library caller has none.
      flags.FLAGS.mark_as_parsed()
    reading = reading.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.num_workers, per_worker_buffer_size=max(1, data.prefetch)))
  return iter(reading.map(_count_skipped))


def make_train_iterator(data: ml_collections.ConfigDict, info: DatasetInfo, *,
                        global_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """An endless iterator of this process's training batches.

  Each batch is ``{'image': float32 (local_batch, h, w, c) normalised, 'label': int32 (local_batch,)}``
  with local_batch = global_batch_size / process_count. Each process reads its own shard of every
  epoch's shuffle. The iterator's ``get_state()``/``set_state()`` (or orbax, through
  ``grain.checkpoint.CheckpointSave``/``CheckpointRestore``) resume it exactly.
  """
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  opened = _open(data)
  source = opened.splits.train
  class_index = ClassIndex(source.labels) if data.balanced else None
  example = _TrainExample(source, opened.transform, transforms.Normalize(info.mean, info.std),
                          class_index, data.fatal_corrupt)
  dataset = (_grain().MapDataset.range(len(source)).seed(seed).shuffle().random_map(example)
             [process_index::process_count].repeat().batch(local_batch, drop_remainder=True))
  return _deliver(dataset, data)


def _closing(iterator: grain.DatasetIterator) -> Iterator[dict[str, np.ndarray]]:
  """Yields the iterator's batches, then stops its reading threads and worker processes."""
  try:
    yield from iterator
  finally:
    iterator.close()


def make_eval_iterator(data: ml_collections.ConfigDict, info: DatasetInfo, *,
                       global_batch_size: int, process_index: int = 0,
                       process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """A finite iterator over every evaluation image exactly once, in order.

  Global batch i holds eval indices [i·b, (i+1)·b); process p gets its b / process_count slice, so
  every process yields ceil(num_eval / b) batches. Batches are ``{'image', 'label', 'mask'}``; mask
  is False on padding past the end (and on unreadable images). Workers stop when it is exhausted.
  """
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  opened = _open(data)
  num_batches = -(-info.num_eval // global_batch_size)
  example = _EvalExample(opened.splits.eval, opened.transform,
                         transforms.Normalize(info.mean, info.std), info.image_shape,
                         data.fatal_corrupt)
  dataset = (_grain().MapDataset.range(num_batches * local_batch)
             .map(_EvalSlot(global_batch_size, local_batch, process_index)).map(example)
             .batch(local_batch))
  return _closing(_deliver(dataset, data))
