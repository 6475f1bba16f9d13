"""The run configuration: every key a run can set, with its default.

Config files in ``configs/`` start from :func:`default_config` and change what their run needs, so a
misspelt key in a file or on the command line (``--config.train.batch_size=64``) is rejected by
ml_collections with the key's name. :func:`validate` checks values that have a meaning beyond their type.
"""

from __future__ import annotations

import ml_collections

SPARSITY_RULES = ("prox", "threshold")
LR_SCHEDULES = ("alexnet", "resnet", "cosine", "constant")


def default_config() -> ml_collections.ConfigDict:
  """Returns the full schema with defaults (the original's where it had one)."""
  c = ml_collections.ConfigDict()
  c.seed = 2  # The original's default seed.
  c.restore = ""  # A checkpoint step directory (or a workdir) to evaluate or start from.

  c.model = ml_collections.ConfigDict()
  c.model.name = "digits-lcnn"  # The original's `netType` names: alexnet, alexnet-lcnn, resnet, resnet-lcnn, ...
  c.model.depth = 18  # ResNet depth: 8, 18 or 34.
  c.model.first_pool = 3  # Dictionary size of the first (RGB) layer.
  c.model.pool_size = 30  # Dictionary size of the convs after the first (alexnet-lcnn, digits-lcnn); 0 = dense.
  # Per-conv sizes overriding pool_size: alexnet-lcnn conv2..conv5 (4 values), digits-lcnn conv2, conv3 (2).
  c.model.pool_sizes = ml_collections.config_dict.placeholder(tuple)
  c.model.fc_pool = 0  # Dictionary size of fc6/fc7; 0 keeps them dense.
  c.model.classifier_pool = 0  # Dictionary size of the classifier; 0 keeps it dense.
  c.model.pool1 = 0  # ResNet-LCNN dictionary sizes of stages 1..4; 0 (or >= out·kh·kw) keeps a stage dense.
  c.model.pool2 = 0  # ResNet-LCNN stage 2 (see pool1).
  c.model.pool3 = 0  # ResNet-LCNN stage 3 (see pool1).
  c.model.pool4 = 0  # ResNet-LCNN stage 4 (see pool1).
  c.model.initial_sparsity = 0.01  # tau = initial_sparsity / sqrt(kh * kw * k).
  c.model.dropout = 0.5  # Dropout rate before the fully connected layers (AlexNet, digits nets).
  c.model.width = 32  # Base width of the small digits nets.
  c.model.convs_per_stage = 1  # Digits nets: 3×3 convolutions at each width w, 2w, 4w (1 = conv1..conv3).

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # digits | folder | tfds:<name> | idx | fashion_mnist | synthetic
  c.data.dir = ""  # ImageNet-style folder root, the TFDS data_dir, or the IDX files' directory.
  c.data.image_size = 0  # Crop size; 0 = natural: 8 digits, 28 idx, 224 folder/synthetic, tfds fixed size or 224.
  c.data.resize_size = 0  # Shortest side before cropping; 0 = image_size * 256 / 224 (photos only).
  c.data.mean = ml_collections.config_dict.placeholder(tuple)  # Per channel, pixels in [0, 1]; computed if unset.
  c.data.std = ml_collections.config_dict.placeholder(tuple)  # Per channel, as data.mean; computed if unset.
  c.data.stats_images = 2000  # Training images sampled to compute mean/std (cached in the workdir).
  c.data.train_split = ""  # Folder subdirectory or TFDS split; "" = train.
  c.data.eval_split = ""  # "" = val (folder); validation, else test (tfds).
  c.data.balanced = False  # Class-balanced sampling (uniform class, then uniform image), as the original.
  c.data.flip = ml_collections.config_dict.placeholder(bool)  # IDX training flips; unset: fashion_mnist only.
  c.data.fatal_corrupt = False  # A corrupt image stops the run instead of being skipped and counted.
  c.data.num_workers = 0  # grain worker processes for decoding (0 = in-process).
  c.data.prefetch = 2  # Batches prefetched per worker.
  c.data.num_classes = 0  # Synthetic data only: number of classes (0 = 1000).
  c.data.num_train = 0  # Synthetic data only: number of examples.
  c.data.num_eval = 0  # Synthetic data only: number of evaluation examples.
  c.data.classes = ml_collections.config_dict.placeholder(tuple)  # Keep these classes, relabelled 0..n-1 in order.
  c.data.examples_per_class = 0  # Keep the first n training records of each class (0 = all): few-shot runs.

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # Global batch, split across processes.
  c.train.break_batch = 1  # Split each batch into this many pieces and accumulate gradients.
  c.train.epochs = 55  # Training length in epochs of train.steps_per_epoch steps.
  c.train.steps_per_epoch = 10_000  # The original's epochSize, independent of batch size; 0 = one pass.
  c.train.num_steps = 0  # Overrides epochs * steps_per_epoch when > 0.
  c.train.lr_schedule = "alexnet"  # alexnet | resnet | cosine | constant
  c.train.learning_rate = 1.0  # The original's -LR: a multiplier on the schedule (the base LR for cosine/constant).
  c.train.warmup_steps = 0  # cosine only.
  c.train.weight_decay = -1.0  # < 0: the schedule's own (AlexNet 0, ResNet 5e-4 then 0); else constant.
  c.train.momentum = 0.9  # SGD momentum, Torch style: buf = momentum·buf + g.
  c.train.compute_dtype = "float32"  # float32 | bfloat16
  c.train.checkpoint_every = 1000  # Steps between checkpoints.
  c.train.keep_checkpoints = 3  # Newest checkpoints kept in workdir/checkpoints.
  c.train.log_every = 50  # Steps between training rows in metrics.jsonl, TensorBoard and the progress bar.
  c.train.eval_every = 0  # Steps between evaluations; 0 = at the end of each epoch.
  c.train.eval_batch_size = 0  # 0 = train.batch_size.
  c.train.freeze_dictionaries = False  # Train only the coefficients (dictionary transfer, few-iteration learning).
  c.train.train_only = ""  # Comma-separated parameter path prefixes (e.g. classifier): the rest stays fixed.
  c.train.init_from = ""  # A workdir or checkpoint whose dictionaries are copied in before training.

  c.sparsity = ml_collections.ConfigDict()
  c.sparsity.rule = "prox"  # prox (optax L1 proximal step) | threshold (the original's rule)
  c.sparsity.strength = 0.0  # The original's lambda: the L1 weight on P is strength * tau, per layer.
  # Operating points (lcnn_jax.operating_point): training steers the strength (starting from `strength`, or 1
  # when 0) and ends at the target by construction. 0 = off; set at most one.
  c.sparsity.target_speedup = 0.0  # Counted speedup over the CNN baseline at the end of training.
  c.sparsity.target_density = 0.0  # Fraction of P's entries (all lookup layers together) kept at the end.
  c.sparsity.project_at = 0.6  # Fraction of the steps after which P is projected onto the target, then fine-tuned.
  return c


def digits_quickstart_config() -> ml_collections.ConfigDict:
  """The embedded default (``configs/quickstart.py``): the digits LCNN with the L1 proximal rule, about a
  minute on 2 CPU cores; the experiments on digits start from it."""
  c = default_config()
  c.model.name = "digits-lcnn"
  c.model.width = 32
  c.model.first_pool = 1
  c.model.pool_size = 8
  c.model.dropout = 0.2
  c.data.name = "digits"
  c.train.batch_size = 64
  c.train.epochs = 30
  c.train.steps_per_epoch = 0  # one pass over the training split
  c.train.lr_schedule = "cosine"
  c.train.learning_rate = 0.1
  c.train.warmup_steps = 50
  c.train.weight_decay = 5e-4
  c.train.checkpoint_every = 200
  c.train.log_every = 20
  c.train.eval_every = 0  # once per epoch
  c.sparsity.rule = "prox"
  c.sparsity.strength = 10.0
  return c


def fashion_mnist_config(lcnn: bool) -> ml_collections.ConfigDict:
  """``configs/fashion_mnist.py`` (the ``mnist`` CNN) or, with ``lcnn``, ``configs/fashion_mnist_lcnn.py`` (its
  LCNN twin, steered to a counted speedup of 10×): 10 epochs of the 60,000 Fashion-MNIST training images, ±2 pixel
  translations and horizontal flips, a cosine learning rate."""
  c = default_config()
  c.model.name = "mnist-lcnn" if lcnn else "mnist"
  c.model.width = 32
  c.model.first_pool = 1
  c.model.pool_size = 8
  c.model.dropout = 0.2
  c.data.name = "fashion_mnist"  # data.dir "" = /usr/share/datasets/fashion-mnist
  c.train.batch_size = 128
  c.train.epochs = 10
  c.train.steps_per_epoch = 0  # one pass over the 60,000 training images (468 steps)
  c.train.lr_schedule = "cosine"
  c.train.learning_rate = 0.1
  c.train.warmup_steps = 200
  c.train.weight_decay = 5e-4
  c.train.checkpoint_every = 1000
  c.train.log_every = 100
  c.train.eval_every = 0  # once per epoch
  c.train.eval_batch_size = 500
  c.sparsity.rule = "prox"
  c.sparsity.strength = 0.05 if lcnn else 0.0  # the LCNN's starting λ; the target then steers it
  c.sparsity.target_speedup = 10.0 if lcnn else 0.0
  return c


def imagenet_config(model_name: str, *, batch_size: int, lr_schedule: str) -> ml_collections.ConfigDict:
  """The original's ImageNet recipe (REFERENCE §5) for ``model_name``: an ImageNet folder at 224×224 with
  class-balanced sampling, 55 epochs of 10,000 steps, the architecture's learning-rate schedule."""
  c = default_config()
  c.model.name = model_name
  c.data.name = "folder"
  c.data.image_size = 224
  c.data.balanced = True
  c.train.batch_size = batch_size
  c.train.lr_schedule = lr_schedule
  c.train.epochs = 55  # Training length in epochs of train.steps_per_epoch steps.
  c.train.steps_per_epoch = 10_000
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key when a value is out of its domain."""
  if config.sparsity.rule not in SPARSITY_RULES:
    raise ValueError(f"sparsity.rule={config.sparsity.rule!r}: expected one of {SPARSITY_RULES}.")
  if config.sparsity.strength < 0:
    raise ValueError(f"sparsity.strength={config.sparsity.strength}: must be >= 0.")
  if config.sparsity.target_speedup < 0 or not 0 <= config.sparsity.target_density < 1:
    raise ValueError(f"sparsity.target_speedup={config.sparsity.target_speedup}, sparsity.target_density="
                     f"{config.sparsity.target_density}: a speedup must be > 1 and a density in (0, 1); 0 = off.")
  if config.sparsity.target_speedup and config.sparsity.target_density:
    raise ValueError(f"sparsity.target_speedup={config.sparsity.target_speedup} and sparsity.target_density="
                     f"{config.sparsity.target_density}: set one of them.")
  if not 0 < config.sparsity.project_at <= 1:
    raise ValueError(f"sparsity.project_at={config.sparsity.project_at}: must be in (0, 1], the fraction of the "
                     "steps after which P is projected onto the target.")
  if config.train.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"train.lr_schedule={config.train.lr_schedule!r}: expected one of {LR_SCHEDULES}.")
  if config.train.batch_size <= 0:
    raise ValueError(f"train.batch_size={config.train.batch_size}: must be positive.")
  if config.train.break_batch <= 0 or config.train.batch_size % config.train.break_batch:
    raise ValueError(
        f"train.break_batch={config.train.break_batch} must be positive and divide "
        f"train.batch_size={config.train.batch_size}.")
  for key in ("first_pool", "pool_size", "fc_pool", "classifier_pool", "pool1", "pool2", "pool3", "pool4"):
    value = config.model[key]
    if value < 0:
      raise ValueError(f"model.{key}={value}: a dictionary size must be > 0 (or 0 where 0 means dense).")
  if config.model.first_pool == 0:
    raise ValueError("model.first_pool=0: the first layer's dictionary size must be > 0.")
  if config.model.pool_sizes is not None and any(int(k) <= 0 for k in config.model.pool_sizes):
    raise ValueError(f"model.pool_sizes={tuple(config.model.pool_sizes)}: every dictionary size must be > 0.")
  from lcnn_jax import models  # Imported here: the schema itself needs no JAX.
  if config.model.name not in models.MODELS:
    raise ValueError(f"model.name={config.model.name!r}: expected one of {sorted(models.MODELS)}.")
  if config.model.depth not in models.RESNET_DEPTHS:
    raise ValueError(f"model.depth={config.model.depth}: expected one of {models.RESNET_DEPTHS}.")
  if not 0 <= config.model.dropout < 1:
    raise ValueError(f"model.dropout={config.model.dropout}: must be in [0, 1).")
  if config.model.initial_sparsity < 0 or config.model.width <= 0:
    raise ValueError(f"model.initial_sparsity={config.model.initial_sparsity} must be >= 0 and "
                     f"model.width={config.model.width} > 0.")
