"""Input pipeline: image folders, TFDS array_record, IDX files (Fashion-MNIST, MNIST), scikit-learn digits, synthetic
data (docs/data.md), each a :class:`Source` registered by its ``data.name`` (:mod:`lcnn_jax.data.registry`).

::

  info = data.dataset_info(config.data, cache_dir=workdir)
  train = data.make_train_iterator(config.data, info, global_batch_size=b, seed=s,
                                   process_index=p, process_count=n)
  for batch in data.make_eval_iterator(config.data, info, global_batch_size=b,
                                       process_index=p, process_count=n): ...
  data.corrupt_count()
"""

from lcnn_jax.data.pipeline import (
    DatasetInfo,
    corrupt_count,
    dataset_info,
    make_eval_iterator,
    make_train_iterator,
    preprocessing,
    validate_config,
)
from lcnn_jax.data.registry import (Source, SourceConfig, find_source, get_source, register_source,
                                     source_names)
from lcnn_jax.data.transforms import CorruptImageError

__all__ = [
    "CorruptImageError",
    "DatasetInfo",
    "Source",
    "SourceConfig",
    "corrupt_count",
    "dataset_info",
    "find_source",
    "get_source",
    "make_eval_iterator",
    "make_train_iterator",
    "preprocessing",
    "register_source",
    "source_names",
    "validate_config",
]
