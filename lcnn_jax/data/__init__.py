"""Input pipeline: image folders, TFDS array_record, IDX files (Fashion-MNIST, MNIST), scikit-learn digits, synthetic
data (docs/data.md).

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
    validate_config,
)
from lcnn_jax.data.transforms import CorruptImageError

__all__ = [
    "CorruptImageError",
    "DatasetInfo",
    "corrupt_count",
    "dataset_info",
    "make_eval_iterator",
    "make_train_iterator",
    "validate_config",
]
