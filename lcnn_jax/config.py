"""The run configuration: every key a run can set, with its default, and the presets that ship with lcnn_jax.

Config files (the presets in ``lcnn_jax/configs/``) start from :func:`default_config` for their model and change
what their run needs. A misspelt key on the command line (``--config.train.batch_size=64``) is rejected by
ml_collections with the key's name; :func:`check_keys` rejects one set in a file, a key of another model and the
flat dictionary keys of earlier versions (naming today's); :func:`validate` checks values that have a meaning beyond
their type. :func:`from_dict` reads a saved config back (``config.json`` of a run), translating the earlier flat keys
with a logged note.

Each model brings its own keys under ``model``: one :class:`ModelFamily` registration (:func:`register_model`) names
a CNN and its LCNN twin, the builders of both, their keys (``model.depth`` of ResNet, ``model.width`` of the small
nets, ...) and ``model.dictionary``, the dictionary sizes of the LCNN's lookup layers in the paper's words:
AlexNet-LCNN ``{first, convs, fc, classifier}``, ResNet-LCNN ``{first, stage1..stage4}``, the digits and 28×28 LCNNs
``{first, convs, classifier}``. A CNN takes its LCNN twin's keys and ignores the dictionary sizes: it is that LCNN with every
layer dense, the baseline the paper compares with. A key of another model is an error naming its owner.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Any, Callable, Mapping

import ml_collections
from absl import logging
from ml_collections import config_dict

SPARSITY_RULES = ("prox", "threshold")
LR_SCHEDULES = ("alexnet", "resnet", "cosine", "constant")
HEADS = ("average", "flatten")
COMMON_MODEL_KEYS = ("name", "dictionary", "initial_sparsity")
"""The keys under ``model`` that every model has; the rest are its registration's (:attr:`ModelFamily.keys`)."""

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
# The small nets' own keys: key -> (default, meaning).
_SMALL_KEYS = {
    "dropout": (0.5, "Dropout rate before the classifier."),
    "width": (32, "Base width: conv1..conv3 are w, 2w and 4w wide."),
    "convs_per_stage": (1, "3×3 convolutions at each width w, 2w, 4w (1 = conv1..conv3)."),
    "head": ("average", "The classifier reads the global average of conv3 or every pixel (flatten)."),
}


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  """One model of lcnn_jax: a CNN and its LCNN twin (the dense baseline the paper compares it with), registered
  with :func:`register_model`.

  Attributes:
    cnn: the CNN's ``model.name`` (the original's ``netType``).
    lcnn: the LCNN's ``model.name``.
    builders: the builders of the CNN and of the LCNN, each ``builder(model_config, *, num_classes, input_shape,
      rngs) -> nnx.Module``, given as the function or as ``"module:function"`` (:func:`lcnn_jax.models.create_model`
      imports it; the schema stays free of model code).
    keys: the model's own keys under ``model`` beside ``name``, ``dictionary`` and ``initial_sparsity``:
      key -> (default, meaning). Both twins take them; another model's config has none of them.
    dictionary: ``model.dictionary``, the LCNN's dictionary sizes: key -> (default, the layers it sizes).
    check: raises ValueError naming the key when a value of ``keys`` is out of its domain (None: no check).
  """
  cnn: str
  lcnn: str
  builders: tuple[str | Callable[..., Any], str | Callable[..., Any]]
  keys: Mapping[str, tuple[Any, str]]
  dictionary: Mapping[str, tuple[Any, str]]
  check: Callable[[ml_collections.ConfigDict], None] | None = None

  @property
  def names(self) -> tuple[str, str]:
    """The two models' names, the LCNN first."""
    return self.lcnn, self.cnn

  def builder(self, model: str) -> str | Callable[..., Any]:
    """The builder of ``model`` (one of :attr:`names`)."""
    return self.builders[0] if model == self.cnn else self.builders[1]


FAMILIES: list[ModelFamily] = []
"""Every registered model, in the order of registration (:func:`register_model`)."""


def register_model(new: ModelFamily) -> ModelFamily:
  """Adds ``new`` (a CNN and its LCNN twin) to the models a config can name; returns it. Raises ValueError when
  one of its names is taken or one of its keys is a key every model has."""
  taken = sorted(set(new.names) & set(model_names()))
  if taken:
    raise ValueError(f"model.name {', '.join(taken)}: already registered; a model needs a name of its own.")
  shared = sorted(set(new.keys) & set(COMMON_MODEL_KEYS))
  if shared:
    raise ValueError(f"model.{{{', '.join(shared)}}}: every model has these keys; a model's own keys are others.")
  FAMILIES.append(new)
  return new


def model_names() -> tuple[str, ...]:
  """The models (the original's ``netType`` names), sorted; :mod:`lcnn_jax.models` builds each."""
  return tuple(sorted(name for family in FAMILIES for name in family.names))


def family(model: str) -> ModelFamily:
  """The registration of ``model``; raises ValueError listing the models when there is none."""
  for candidate in FAMILIES:
    if model in candidate.names:
      return candidate
  raise ValueError(f"model.name={model!r}: expected one of {list(model_names())}.")


def baseline(model: str) -> str:
  """The dense CNN the paper compares ``model`` with: an LCNN's twin, a CNN itself."""
  return family(model).cnn


def _check_dropout(model_config: ml_collections.ConfigDict) -> None:
  if not 0 <= model_config.dropout < 1:
    raise ValueError(f"model.dropout={model_config.dropout}: must be in [0, 1).")


def _check_small(model_config: ml_collections.ConfigDict) -> None:
  _check_dropout(model_config)
  if model_config.head not in HEADS:
    raise ValueError(f"model.head={model_config.head!r}: expected one of {HEADS}.")
  if model_config.width <= 0 or model_config.convs_per_stage < 1:
    raise ValueError(f"model.width={model_config.width}, model.convs_per_stage={model_config.convs_per_stage}: the "
                     "width must be positive and there is at least 1 convolution per width.")


register_model(ModelFamily(
    cnn="alexnet", lcnn="alexnet-lcnn",
    builders=("lcnn_jax.models.alexnet:alexnet", "lcnn_jax.models.alexnet:alexnet_lcnn"),
    keys={"dropout": (0.5, "Dropout rate before fc6 and fc7.")},
    dictionary=_ALEXNET_DICTIONARY, check=_check_dropout))
register_model(ModelFamily(
    cnn="resnet", lcnn="resnet-lcnn",
    builders=("lcnn_jax.models.resnet:resnet", "lcnn_jax.models.resnet:resnet_lcnn"),
    keys={"depth": (18, "ResNet depth: 8, 18 or 34.")},
    dictionary=_RESNET_DICTIONARY))
register_model(ModelFamily(
    cnn="digits", lcnn="digits-lcnn",
    builders=("lcnn_jax.models.small:digits", "lcnn_jax.models.small:digits_lcnn"),
    keys=_SMALL_KEYS, dictionary=_DIGITS_DICTIONARY, check=_check_small))
register_model(ModelFamily(
    cnn="mnist", lcnn="mnist-lcnn",
    builders=("lcnn_jax.models.small:mnist", "lcnn_jax.models.small:mnist_lcnn"),
    keys=_SMALL_KEYS, dictionary=_DIGITS_DICTIONARY, check=_check_small))

# The flat model keys of earlier versions (before model.dictionary) -> today's key under model.
RENAMED = {
    "first_pool": "dictionary.first",
    "pool_size": "dictionary.convs",
    "pool_sizes": "dictionary.convs",
    "fc_pool": "dictionary.fc",
    "classifier_pool": "dictionary.classifier",
    **{f"pool{i}": f"dictionary.stage{i}" for i in range(1, 5)},
}

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
"""The presets: ``lcnn_jax/configs``, one file per family of runs, its variants by argument."""
RENAMED_PRESETS = {
    "alexnet_fast": "alexnet:fast",
    "alexnet_accurate": "alexnet:accurate",
    "resnet18_fast": "resnet18:fast",
    "resnet18_accurate": "resnet18:accurate",
    "fashion_mnist_lcnn": "fashion_mnist:lcnn",
}
"""The presets' names before their families took variants -> today's; both load the same config."""


def default_config(model: str = "digits-lcnn") -> ml_collections.ConfigDict:
  """Returns the full schema with defaults (the original's where it had one) for ``model``: the sections every run
  has and, under ``model``, the keys of ``model``'s registration (:class:`ModelFamily`)."""
  c = ml_collections.ConfigDict()
  c.seed = 2  # The original's default seed.
  c.restore = ""  # A checkpoint step directory (or a workdir) to evaluate or start from.

  c.model = ml_collections.ConfigDict()
  c.model.name = model  # The original's `netType` names: alexnet, alexnet-lcnn, resnet, resnet-lcnn, ...
  c.model.initial_sparsity = 0.01  # tau = initial_sparsity / sqrt(kh * kw * k).
  c.model.dictionary = dictionary_config(model)  # Dictionary sizes of the lookup layers, and each model's own keys.
  for key, (default, _) in family(model).keys.items():
    c.model[key] = default

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
  check_values(config.model)


# ------------------------------------------------------------------------------------------------ dictionaries


def dictionary_keys(model: str) -> Mapping[str, tuple[Any, str]]:
  """``model``'s dictionary sizes (its LCNN twin's for a CNN): key -> (default, the layers it sizes)."""
  return family(model).dictionary


def dictionary_config(model: str) -> ml_collections.ConfigDict:
  """``model.dictionary`` of ``model`` with its defaults; ``convs`` takes one size or a tuple of them."""
  c = ml_collections.ConfigDict()
  for key, (default, _) in dictionary_keys(model).items():
    c[key] = config_dict.FieldReference(default, field_type=object) if key == "convs" else default
  return c


def takes(model: str) -> str:
  """What ``model`` takes beside the keys every model has: ``"alexnet-lcnn takes model.dictionary.{first, convs,
  fc, classifier} and model.dropout"``."""
  own = list(family(model).keys)
  rest = "" if not own else f" and model.{own[0]}" if len(own) == 1 else f" and model.{{{', '.join(own)}}}"
  return f"{model} takes model.dictionary.{{{', '.join(dictionary_keys(model))}}}{rest}"


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
  file, a key or a dictionary size of another model (naming its owners), or a flat key of earlier versions
  (``model.pool_size`` -> ``model.dictionary.convs``), and every key the model takes that is missing."""
  family(config.model.name)
  _raise_key_problems(config, default_config(config.model.name), "")


def check_model(model_config: ml_collections.ConfigDict) -> None:
  """:func:`check_keys` and :func:`check_values` of the model section alone (``config.model``)."""
  family(model_config.name)
  _raise_key_problems(model_config, default_config(model_config.name).model, "model.")
  check_values(model_config)


def check_values(model_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key when a value of the model section is out of its domain: the dictionary sizes
  (:func:`check_dictionary`), ``initial_sparsity`` and the model's own keys (its registration's check)."""
  check_dictionary(model_config)
  if model_config.initial_sparsity < 0:
    raise ValueError(f"model.initial_sparsity={model_config.initial_sparsity}: must be >= 0.")
  check = family(model_config.name).check
  if check is not None:
    check(model_config)


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
    raise ValueError(f"{'; '.join(unknown + missing)}. {takes(name)}; a config file starts from "
                     f"lcnn_jax.config.default_config({name!r}), as the presets in lcnn_jax/configs/ do.")


def unknown_key(path: str, model: str) -> str:
  """What to say of a key (``model.pool_size``) the schema of ``model`` has not: its new name, the models whose key
  or dictionary size it is, or that there is no such key."""
  section, _, key = path.rpartition(".")
  if section in ("model", "model.dictionary") and key in RENAMED:  # the flat key, or its name misplaced
    new = RENAMED[key].split(".")[-1]
    taken = "" if new in dictionary_keys(model) else f", which {model} does not take"
    return f"model.{key} was renamed model.{RENAMED[key]}{taken}"
  if section == "model.dictionary":
    owners = [other.lcnn for other in FAMILIES if key in other.dictionary]
    if owners:
      return f"model.dictionary.{key} is a dictionary size of {', '.join(owners)}, not of {model}"
  if section == "model":
    owners = [name for other in FAMILIES if key in other.keys for name in other.names]
    if owners:
      return f"model.{key} is a key of {', '.join(owners)}, not of {model}"
  return f"there is no config key {path}"


# ------------------------------------------------------------------------------------------------ saved configs


def from_dict(values: Mapping[str, Any], source: str = "a saved config") -> ml_collections.ConfigDict:
  """The config of a run saved as a dict (``config.json``), completed with today's defaults for its model. The
  flat dictionary keys of earlier versions (``model.first_pool``, ``pool_size``, ``pool_sizes``, ``fc_pool``,
  ``classifier_pool``, ``pool1``..``pool4``) become ``model.dictionary`` with a logged note; the keys of other
  models that runs saved before each model had its own keys hold are left out with a logged note; other keys this
  version has not are ignored with a warning."""
  values = dict(values)
  model = dict(values.get("model", {}))
  name = model.get("name", "digits-lcnn")
  config = default_config(name)
  foreign = [key for key in model if key not in config.model and any(key in other.keys for other in FAMILIES)]
  for key in foreign:
    del model[key]
  if foreign:
    logging.info("%s holds keys of other models than %s (saved before each model had its own): left out %s.",
                 source, name, ", ".join(f"model.{key}" for key in foreign))
  values["model"] = model
  flat = {key: model.pop(key) for key in RENAMED if key in model}
  if flat:
    model["dictionary"] = _translated(flat, name)
    logging.info("%s has the flat dictionary keys of earlier versions: read %s as model.dictionary = %s.", source,
                 ", ".join(f"model.{key}={value!r}" for key, value in flat.items()), model["dictionary"])
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
  """The directory of the presets, ``lcnn_jax/configs`` (:data:`PRESET_DIR`)."""
  return PRESET_DIR


def _preset_files() -> dict[str, str]:
  """name -> path of every preset: each file under :data:`PRESET_DIR` that defines ``get_config``."""
  files = {}
  for directory, _, names in os.walk(PRESET_DIR):
    for file_name in names:
      path = os.path.join(directory, file_name)
      if file_name.endswith(".py") and any(isinstance(node, ast.FunctionDef) and node.name == "get_config"
                                           for node in _parsed(path).body):
        files[os.path.relpath(path, PRESET_DIR)[:-3].replace(os.sep, "/")] = path
  return files


def _parsed(path: str) -> ast.Module:
  with open(path) as f:
    return ast.parse(f.read(), filename=path)


def variants(name: str) -> dict[str, str]:
  """The variants of the preset ``name`` (``alexnet``: ``cnn``, ``fast``, ``accurate``) with what each is, the
  default first, from the file's ``VARIANTS``; ``{}`` for a preset without variants."""
  path = _preset_files()[name]
  for node in _parsed(path).body:
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "VARIANTS" for t in node.targets):
      return dict(ast.literal_eval(node.value))
  return {}


def check_variant(preset: str, variant: str, known: dict[str, str], example: str) -> None:
  """Raises ValueError naming the variants of ``preset`` (its file's ``VARIANTS``, ``known``) when ``variant`` is
  not one of them, with ``--config PRESET:EXAMPLE`` as the way to ask for one."""
  if variant not in known:
    raise ValueError(f"{preset}:{variant}: expected one of {', '.join(known)}, e.g. --config {preset}:{example}.")


def presets() -> list[str]:
  """Every run config by name: each preset (``alexnet``, ``experiments/spectrum``, its default variant) and each of
  its other variants (``alexnet:fast``)."""
  names = []
  for name in _preset_files():
    names += [name, *(f"{name}:{variant}" for variant in list(variants(name))[1:])]
  return sorted(names)


def resolve(path_or_name: str) -> str:
  """The config file ``path_or_name`` names, as ``--config`` takes it (``FILE`` or ``FILE:VARIANT``): an existing
  file as it is; else a preset by name (``alexnet``, ``alexnet:fast``, ``experiments/spectrum_fashion:full``;
  ``configs/alexnet_fast.py`` from any directory too; the earlier names of :data:`RENAMED_PRESETS`). Raises
  ValueError listing the presets, or the preset's variants, when it is neither."""
  path, colon, variant = path_or_name.partition(":")
  if os.path.isfile(path):
    return path_or_name
  name = path.replace(os.sep, "/")
  name = name[len("configs/"):] if name.startswith("configs/") else name
  name = name[:-3] if name.endswith(".py") else name
  if name in RENAMED_PRESETS:
    if colon:
      raise ValueError(f"--config {path_or_name}: {name} is the preset {RENAMED_PRESETS[name]}; pass "
                       f"--config {RENAMED_PRESETS[name].partition(':')[0]}:VARIANT for another variant.")
    name, colon, variant = RENAMED_PRESETS[name].partition(":")
  files = _preset_files()
  if name not in files:
    raise ValueError(f"--config {path_or_name}: no such file, and no preset of that name. Pass a config file (a path "
                     f"relative to the current directory, or absolute) or a preset: {', '.join(presets())}.")
  choices = variants(name)
  if colon and variant not in choices:
    expected = (f"its variants are {', '.join(f'{name}:{v} ({what})' for v, what in choices.items())}"
                if choices else f"{name} has no variants")
    raise ValueError(f"--config {path_or_name}: {name} has no variant {variant!r}; {expected}.")
  return files[name] + colon + variant


def load(path_or_name: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file or preset (:func:`resolve`); ``get_config(VARIANT)`` for ``FILE:VARIANT``."""
  path, colon, variant = resolve(path_or_name).partition(":")
  spec = importlib.util.spec_from_file_location(f"lcnn_jax_config_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if colon else module.get_config()
