"""The run configuration: every key a run can set, with its default, and the presets that ship with lcnn_jax.

Config files (the presets in ``configs/``, shipped as ``lcnn_jax.configs``) start from
:func:`default_config` for their model and change what their run needs. A misspelt key on the command line
(``--config.train.batch_size=64``) is rejected by ml_collections with the key's name; :func:`check_keys` rejects
one set in a file, a key of another model and the flat dictionary keys of earlier versions (naming today's);
:func:`validate` checks values that have a meaning beyond their type. :func:`from_dict` reads a saved config back
(``config.json`` of a run), translating the earlier flat keys with a logged note.

``model.dictionary`` holds the dictionary sizes of the model's lookup layers in the paper's words, nested per
model (:data:`DICTIONARIES`): AlexNet-LCNN ``{first, convs, fc, classifier}``, ResNet-LCNN ``{first, stage1..stage4}``,
the digits and 28×28 LCNNs ``{first, convs, classifier}``. A CNN takes its LCNN twin's keys and ignores them: it is
that LCNN with every layer dense, the baseline the paper compares with.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import ml_collections
from absl import logging
from ml_collections import config_dict

SPARSITY_RULES = ("prox", "threshold")
LR_SCHEDULES = ("alexnet", "resnet", "cosine", "constant")
HEADS = ("average", "flatten")

# The dictionary sizes (atoms) each LCNN takes as model.dictionary: key -> (default, the layers it sizes). A size
# of 0 keeps those layers dense; the first layer's must be > 0.
_ALEXNET_DICTIONARY = {
    "first": (3, "conv1, the 11×11 convolution of the RGB image."),
    "convs": (30, "conv2..conv5: one size for the four, or 4 sizes (conv2, conv3, conv4, conv5)."),
    "fc": (0, "fc6 and fc7 (4096 wide); 0 keeps them dense."),
    "classifier": (0, "fc8, the classifier; 0 keeps it dense."),
}
_RESNET_DICTIONARY = {
    "first": (3, "conv1, the 7×7 stem on the RGB image."),
    **{f"stage{i}": (0, f"every 3×3 convolution of stage {i} ({w} wide); 0, or at least {w}·3·3 atoms (as many "
                        "as the vectors it codes), keeps them dense.")
       for i, w in zip(range(1, 5), (64, 128, 256, 512))},
}
_DIGITS_DICTIONARY = {
    "first": (3, "conv1, on the input image."),
    "convs": (30, "conv2 and conv3 (and the convolutions model.convs_per_stage adds after them): one size, or 2 "
                  "(conv2, conv3)."),
    "classifier": (0, "the classifier; 0 keeps it dense."),
}
DICTIONARIES: dict[str, dict[str, tuple[Any, str]]] = {
    "alexnet-lcnn": _ALEXNET_DICTIONARY,
    "resnet-lcnn": _RESNET_DICTIONARY,
    "digits-lcnn": _DIGITS_DICTIONARY,
    "mnist-lcnn": _DIGITS_DICTIONARY,
}
BASELINES = {"alexnet-lcnn": "alexnet", "resnet-lcnn": "resnet", "digits-lcnn": "digits", "mnist-lcnn": "mnist"}
"""Each LCNN's dense CNN twin, the baseline the paper compares it with."""
MODEL_NAMES = tuple(sorted({*BASELINES, *BASELINES.values()}))
"""The models (the original's ``netType`` names); :mod:`lcnn_jax.models` builds each."""

# The flat model keys of earlier versions (before model.dictionary) -> today's key under model.
RENAMED = {
    "first_pool": "dictionary.first",
    "pool_size": "dictionary.convs",
    "pool_sizes": "dictionary.convs",
    "fc_pool": "dictionary.fc",
    "classifier_pool": "dictionary.classifier",
    **{f"pool{i}": f"dictionary.stage{i}" for i in range(1, 5)},
}

PRESET_DIRS = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"),  # an installed package
               os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))  # a checkout


def default_config(model: str = "digits-lcnn") -> ml_collections.ConfigDict:
  """Returns the full schema with defaults (the original's where it had one) for ``model``."""
  c = ml_collections.ConfigDict()
  c.seed = 2  # The original's default seed.
  c.restore = ""  # A checkpoint step directory (or a workdir) to evaluate or start from.

  c.model = ml_collections.ConfigDict()
  c.model.name = model  # The original's `netType` names: alexnet, alexnet-lcnn, resnet, resnet-lcnn, ...
  c.model.depth = 18  # ResNet depth: 8, 18 or 34.
  c.model.dictionary = dictionary_config(model)  # Dictionary sizes of the lookup layers, per model (below).
  c.model.initial_sparsity = 0.01  # tau = initial_sparsity / sqrt(kh * kw * k).
  c.model.dropout = 0.5  # Dropout rate before the fully connected layers (AlexNet, digits nets).
  c.model.width = 32  # Base width of the small digits nets.
  c.model.convs_per_stage = 1  # Digits nets: 3×3 convolutions at each width w, 2w, 4w (1 = conv1..conv3).
  c.model.head = "average"  # Digits nets: the classifier reads the global average or every pixel (flatten).

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
  c.data.examples_seed = -1  # -1: those n are the first; >= 0: drawn at random per class with this seed.

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
  c = default_config("digits-lcnn")
  c.model.width = 32
  c.model.dictionary.first = 1
  c.model.dictionary.convs = 8
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
  LCNN twin, steered to a counted speedup of 10×): 12 epochs of the 60,000 Fashion-MNIST training images, ±2 pixel
  translations and horizontal flips, a cosine learning rate, the classifier on every pixel of conv3."""
  c = default_config("mnist-lcnn" if lcnn else "mnist")
  c.model.width = 32
  c.model.dictionary.first = 1  # the CNN ignores the dictionary sizes (its LCNN twin's)
  c.model.dictionary.convs = 8
  c.model.dropout = 0.2
  c.model.head = "flatten"
  c.data.name = "fashion_mnist"  # data.dir "" = /usr/share/datasets/fashion-mnist
  c.train.batch_size = 128
  c.train.epochs = 12
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
  c = default_config(model_name)
  c.data.name = "folder"
  c.data.image_size = 224
  c.data.balanced = True
  c.train.batch_size = batch_size
  c.train.lr_schedule = lr_schedule
  c.train.epochs = 55  # Training length in epochs of train.steps_per_epoch steps.
  c.train.steps_per_epoch = 10_000
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key when a key is not the schema's (:func:`check_keys`) or a value is out of its
  domain."""
  check_keys(config)
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
  check_dictionary(config.model)
  if config.model.head not in HEADS:
    raise ValueError(f"model.head={config.model.head!r}: expected one of {HEADS}.")
  if not 0 <= config.model.dropout < 1:
    raise ValueError(f"model.dropout={config.model.dropout}: must be in [0, 1).")
  if config.model.initial_sparsity < 0 or config.model.width <= 0:
    raise ValueError(f"model.initial_sparsity={config.model.initial_sparsity} must be >= 0 and "
                     f"model.width={config.model.width} > 0.")


# ------------------------------------------------------------------------------------------------ dictionaries


def dictionary_keys(model: str) -> dict[str, tuple[Any, str]]:
  """``model``'s dictionary sizes (its LCNN twin's for a CNN): key -> (default, the layers it sizes)."""
  _check_name(model)
  lcnn = next((lcnn for lcnn, cnn in BASELINES.items() if model in (lcnn, cnn)))
  return DICTIONARIES[lcnn]


def dictionary_config(model: str) -> ml_collections.ConfigDict:
  """``model.dictionary`` of ``model`` with its defaults; ``convs`` takes one size or a tuple of them."""
  c = ml_collections.ConfigDict()
  for key, (default, _) in dictionary_keys(model).items():
    c[key] = config_dict.FieldReference(default, field_type=object) if key == "convs" else default
  return c


def _check_name(model: str) -> None:
  if model not in MODEL_NAMES:
    raise ValueError(f"model.name={model!r}: expected one of {list(MODEL_NAMES)}.")


def _takes(model: str) -> str:
  return f"{model} takes model.dictionary.{{{', '.join(dictionary_keys(model))}}}"


def check_dictionary(model_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key unless every dictionary size of ``model_config`` is a size: an int >= 0
  (0 = dense; the first layer's > 0), ``convs`` also a tuple of ints > 0. How many ``convs`` sizes a model takes
  is the model's to check when it is built."""
  for key, value in model_config.dictionary.items():
    sizes = tuple(value) if key == "convs" and isinstance(value, (tuple, list)) else (value,)
    if not sizes or not all(isinstance(k, int) and not isinstance(k, bool) for k in sizes):
      raise ValueError(f"model.dictionary.{key}={value!r}: a dictionary size is a whole number of atoms"
                       + (" (convs: one, or a tuple of them)." if key == "convs" else "."))
    if min(sizes) < 0 or (len(sizes) > 1 and min(sizes) == 0):
      raise ValueError(f"model.dictionary.{key}={value!r}: a dictionary size must be > 0 (or 0 where 0 means dense).")
  if model_config.dictionary.get("first", 1) == 0:
    raise ValueError("model.dictionary.first=0: the first layer's dictionary size must be > 0.")


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming every key of ``config`` that the schema of its model has not: a misspelt key set in a
  file, a dictionary size of another model, or a flat key of earlier versions (``model.pool_size`` ->
  ``model.dictionary.convs``), and every dictionary size the model takes that is missing."""
  _check_name(config.model.name)
  _raise_key_problems(config, default_config(config.model.name), "")


def check_model(model_config: ml_collections.ConfigDict) -> None:
  """:func:`check_keys` and :func:`check_dictionary` of the model section alone (``config.model``)."""
  _check_name(model_config.name)
  _raise_key_problems(model_config, default_config(model_config.name).model, "model.")
  check_dictionary(model_config)


def _raise_key_problems(values: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str) -> None:
  name = values.name if prefix == "model." else values.model.name
  unknown, missing = [], []

  def compare(values, schema, prefix):
    for key in values:
      if key not in schema:
        message = unknown_key(prefix + key, name)
        if message.endswith(f"was renamed model.{RENAMED.get(key)}") and values[key] is not None:
          message += f" (set model.{RENAMED[key]} = {values[key]!r})"
        unknown.append(message)
      elif isinstance(schema[key], ml_collections.ConfigDict):
        if isinstance(values[key], ml_collections.ConfigDict):
          compare(values[key], schema[key], f"{prefix}{key}.")
        else:
          unknown.append(f"{prefix}{key} is a section of keys, not a value")
    missing.extend(f"{prefix}{key} is missing" for key in schema if key not in values)

  compare(values, schema, prefix)
  if unknown or missing:
    raise ValueError(f"{'; '.join(unknown + missing)}. {_takes(name)}; a config file starts from "
                     f"lcnn_jax.config.default_config({name!r}), as the presets in configs/ do.")


def unknown_key(path: str, model: str) -> str:
  """What to say of a key (``model.pool_size``) the schema of ``model`` has not: its new name, the models whose
  dictionary size it is, or that there is no such key."""
  section, _, key = path.rpartition(".")
  if section in ("model", "model.dictionary") and key in RENAMED:  # the flat key, or its name misplaced
    new = RENAMED[key].split(".")[-1]
    taken = "" if new in dictionary_keys(model) else f", which {model} does not take"
    return f"model.{key} was renamed model.{RENAMED[key]}{taken}"
  if section == "model.dictionary":
    owners = [m for m in BASELINES if key in DICTIONARIES[m]]
    if owners:
      return f"model.dictionary.{key} is a dictionary size of {', '.join(owners)}, not of {model}"
  return f"there is no config key {path}"


# ------------------------------------------------------------------------------------------------ saved configs


def from_dict(values: Mapping[str, Any], source: str = "a saved config") -> ml_collections.ConfigDict:
  """The config of a run saved as a dict (``config.json``), completed with today's defaults for its model. The
  flat dictionary keys of earlier versions (``model.first_pool``, ``pool_size``, ``pool_sizes``, ``fc_pool``,
  ``classifier_pool``, ``pool1``..``pool4``) become ``model.dictionary`` with a logged note; keys this version
  has not are ignored with a warning."""
  values = dict(values)
  model = dict(values.get("model", {}))
  name = model.get("name", "digits-lcnn")
  config = default_config(name)
  flat = {key: model.pop(key) for key in RENAMED if key in model}
  if flat:
    model["dictionary"] = _translated(flat, name)
    logging.info("%s has the flat dictionary keys of earlier versions: read %s as model.dictionary = %s.", source,
                 ", ".join(f"model.{key}={value!r}" for key, value in flat.items()), model["dictionary"])
    values["model"] = model
  _merge(config, values)
  return config


def _translated(flat: dict[str, Any], model: str) -> dict[str, Any]:
  """``model.dictionary`` from the flat keys of earlier versions; sizes ``model`` never read are left out."""
  dictionary = {}
  for key, value in flat.items():
    new = RENAMED[key].split(".")[-1]
    if new in dictionary_keys(model) and not (key == "pool_sizes" and value is None):
      dictionary.setdefault(new, value)  # pool_sizes overrode pool_size: set first when both are there
  if flat.get("pool_sizes") is not None and "convs" in dictionary:
    dictionary["convs"] = tuple(flat["pool_sizes"])
  return dictionary


def _merge(config: ml_collections.ConfigDict, values: Mapping[str, Any], prefix: str = "") -> None:
  for key, value in values.items():
    if key not in config:
      logging.warning("Ignoring config key %r from a saved config: this version has no such key.", prefix + key)
    elif isinstance(value, dict):
      _merge(config[key], value, f"{prefix}{key}.")
    else:
      with config.ignore_type():
        config[key] = tuple(value) if isinstance(value, list) else value


# ------------------------------------------------------------------------------------------------ presets


def preset_dir() -> str:
  """The directory of the presets: ``lcnn_jax/configs`` in an installed package, ``configs/`` in a checkout."""
  installed, checkout = PRESET_DIRS
  if os.path.isdir(installed) or not os.path.exists(os.path.join(os.path.dirname(checkout), "setup.cfg")):
    return installed
  return checkout


def presets() -> list[str]:
  """The names of the presets (``alexnet_fast``, ``experiments/spectrum``, ...)."""
  root, names = preset_dir(), []
  for directory, _, files in os.walk(root):
    names += [os.path.relpath(os.path.join(directory, f), root)[:-3].replace(os.sep, "/") for f in files
              if f.endswith(".py") and f != "__init__.py"]
  return sorted(names)


def resolve(path_or_name: str) -> str:
  """The config file ``path_or_name`` names: an existing file as it is, else a preset by name (``alexnet_fast``,
  ``experiments/spectrum``; ``configs/alexnet_fast.py`` too, from any directory). Raises ValueError listing the
  presets when it is neither."""
  if os.path.isfile(path_or_name):
    return path_or_name
  name = path_or_name.replace(os.sep, "/")
  name = name[len("configs/"):] if name.startswith("configs/") else name
  name = name[:-3] if name.endswith(".py") else name
  path = os.path.join(preset_dir(), *name.split("/")) + ".py"
  if name in presets():
    return path
  raise ValueError(f"--config {path_or_name}: no such file, and no preset of that name. Pass a config file (a path "
                   f"relative to the current directory, or absolute) or a preset: {', '.join(presets())}.")


def load(path_or_name: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file or preset (:func:`resolve`)."""
  path = resolve(path_or_name)
  spec = importlib.util.spec_from_file_location(f"lcnn_jax_config_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
