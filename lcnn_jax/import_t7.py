r"""The original's trained Torch7 models (``.t7``) as lcnn_jax runs (docs/pretrained.md).

    python -m lcnn_jax.import_t7 alexnet-lcnn-fast.t7 --workdir runs/alexnet-lcnn-fast \
        --meanstd cache/imagenet_meanstdCache.t7 --classes cache/imagenet_trainCache.t7

The original (``hessamb/lcnn``) saved its models with ``torch.save``: an ``nn.Sequential`` tree of
``cudnn.PooledSpatialConvolution`` (its lookup layer), ``cudnn``/``nn.SpatialConvolution``,
``nn.SpatialBatchNormalization``, ``ReLU``, ``nn.SpatialMaxPooling``, ``nn.Dropout``/``nn.SpatialDropout``,
``nn.View``/``nn.Reshape``, ``nn.Linear`` and ``nn.LogSoftMax``, with CPU or CUDA tensors. The importer reads the
tree (with the ``torchfile`` package, the ``t7`` extra), matches it module by module against the lcnn_jax model
of the same architecture (``alexnet`` or ``alexnet-lcnn``), and writes an ordinary run: ``config.json``,
``config.py`` (a config file that reads it back, for ``lcnn_jax.main --config``) and ``checkpoints/0``.

The original's lookup layer holds two convolutions and a threshold:

* ``poolconv``: the dictionary, a bias-free 1×1 convolution m → k (weight (k, m, 1, 1)) that carries the
  layer's zero padding;
* ``alignconv``: the coefficients P, a kh×kw convolution k → n (weight (n, k, kh, kw)) with the layer's stride,
  no padding, and the layer's bias;
* ``sparseTh``: τ = initialSparsity / √(kh·kw·k). Its forward sets P ← 0 where |P| ≤ τ before convolving;
  lcnn_jax applies the same τ on every forward, from ``model.initial_sparsity``.

Torch's OIHW kernels become HWIO, BatchNorm's running mean and variance become its batch statistics, and a
dropout that scales at evaluation (``nn.SpatialDropout``; ``nn.Dropout`` without ``v2``) is folded into the
weights of the layer after it, as far as the model's own dropout (the CNN's SpatialDropout) does not scale
alike. With ``--classes``, the classifier's outputs are reordered to the sorted class names, the order of an
ImageNet folder in lcnn_jax.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from lcnn_jax import checkpoint, cli, config as config_lib, data, layers, train
from lcnn_jax.configs import imagenet
from lcnn_jax.models.alexnet import SpatialDropout

MISSING_READER = ("Reading .t7 files needs the torchfile package: pip install 'lcnn-jax[t7]' "
                  "(or pip install torchfile).")
CONTAINERS = ("nn.Sequential", "nn.DataParallelTable")  # a DataParallelTable's first replica is the model
KINDS = {
    "nn.SpatialConvolution": "conv", "cudnn.SpatialConvolution": "conv", "nn.SpatialConvolutionMM": "conv",
    "cudnn.PooledSpatialConvolution": "lookup", "nn.PooledSpatialConvolution": "lookup",
    "nn.Linear": "linear",
    "nn.SpatialBatchNormalization": "bn", "cudnn.SpatialBatchNormalization": "bn",
    "nn.ReLU": "relu", "cudnn.ReLU": "relu",
    "nn.SpatialMaxPooling": "pool", "cudnn.SpatialMaxPooling": "pool",
    "nn.Dropout": "dropout", "nn.SpatialDropout": "dropout",
    "nn.View": "view", "nn.Reshape": "view",
    "nn.LogSoftMax": "output", "cudnn.LogSoftMax": "output", "nn.SoftMax": "output", "cudnn.SoftMax": "output",
}
LAYER_KINDS = ("conv", "lookup", "linear")
ALEXNET_MODELS = ("alexnet", "alexnet-lcnn")
CONFIG_FILE = "config.py"
IMPORTED_STEP = 0
RELATIVE_TOLERANCE = 1e-5  # τ, BatchNorm epsilon: the file's doubles against the config's.

GENERATED_CONFIG = '''"""The config of the model imported from {source} by lcnn_jax.import_t7 (read from config.json beside it).

    python -m lcnn_jax.main --config {workdir}/config.py --config.data.dir /data/imagenet --workdir {workdir} --mode eval
"""

import os

from lcnn_jax import checkpoint


def get_config():
  return checkpoint.load_run_info(os.path.dirname(os.path.abspath(__file__)))[0]
'''


class T7ImportError(ValueError):
  """A .t7 file that cannot be imported as asked; the message names the module path and what was expected."""


# ------------------------------------------------------------------------------------------------ reading


STORAGE_TYPES = {"Byte": np.uint8, "Char": np.int8, "Short": np.int16, "Int": np.int32, "Long": np.int64,
                 "Float": np.float32, "Double": np.float64, "Half": np.float16}
# Tensor types torchfile cannot read: it has no reader for torch.CudaLongTensor (where cunn keeps
# SpatialMaxPooling's indices), whose numbers would then derail the rest of the file; its half readers raise.
MISSING_TENSOR_TYPES = {"torch.CudaLongTensor": np.int64, "torch.HalfTensor": np.float16,
                        "torch.CudaHalfTensor": np.float16}


class TruncatedFile(Exception):
  """A read that the file has too few bytes left for: the file ends early."""


class _ExactReads:
  """A .t7 file opened for torchfile, where a read of n bytes returns n bytes or raises :class:`TruncatedFile`.

  torchfile takes whatever a read returns: a string or a Lua function cut short by the end of the file would load
  as a shorter one. Every read of the reader goes through :meth:`read` or :meth:`readinto` here, which check the
  bytes left before reading (a damaged length never allocates more than the file holds).
  """

  def __init__(self, f):
    self._f = f
    self.size = os.fstat(f.fileno()).st_size
    self.position = 0

  def left(self) -> int:
    """The bytes after those read so far."""
    return self.size - self.position

  def _take(self, count: int) -> None:
    if count < 0:
      raise ValueError(f"a length of {count} bytes at byte {self.position}")
    if count > self.left():
      raise TruncatedFile(f"{count} bytes due at byte {self.position}, {self.left()} left")
    self.position += count

  def read(self, count: int) -> bytes:
    self._take(count)
    data = self._f.read(count)
    if len(data) != count:  # the file shrank while it was read
      raise TruncatedFile(f"{count} bytes due at byte {self.position - count}, {len(data)} read")
    return data

  def readinto(self, buffer) -> int:
    count = memoryview(buffer).nbytes
    self._take(count)
    got = self._f.readinto(buffer)
    if got != count:
      raise TruncatedFile(f"{count} bytes due at byte {self.position - count}, {got} read")
    return got


def _checked_storage_reader(dtype):
  """torchfile's storage reader, refusing a storage cut short (torchfile would return a shorter array, and the
  tensors viewing it would read past its end)."""
  itemsize = np.dtype(dtype).itemsize

  def read(reader, version):
    size = reader.read_long()
    if size < 0:
      raise ValueError(f"a storage of {size} values")
    if size * itemsize > reader.f.left():
      raise TruncatedFile(f"a storage of {size} values ends after {reader.f.left() // itemsize}")
    values = np.empty(size, dtype)
    reader.f.readinto(values)
    return values
  return read


def read_t7(path: str) -> Any:
  """The object saved in a Torch7 binary file (tables become dicts/lists, modules ``torchfile.TorchObject``).

  Every byte is read exactly once: a file that ends before its object does is truncated, and one that goes on
  after it holds more than torch.save wrote; both are a :class:`T7ImportError`.
  """
  try:
    import torchfile
  except ImportError as e:
    raise T7ImportError(MISSING_READER) from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} does not exist: pass the .t7 file (e.g. alexnet-lcnn-fast.t7).")
  handlers = dict(torchfile.type_handlers)  # torchfile's own, given back after reading
  try:
    for name, dtype in STORAGE_TYPES.items():
      for storage in (f"torch.{name}Storage", "torch.CudaStorage" if name == "Float" else f"torch.Cuda{name}Storage"):
        torchfile.type_handlers[storage.encode()] = _checked_storage_reader(dtype)
    for tensor, dtype in MISSING_TENSOR_TYPES.items():
      torchfile.add_tensor_reader(tensor.encode(), dtype)
    with open(path, "rb") as f:
      file = _ExactReads(f)
      obj = torchfile.T7Reader(file, utf8_decode_strings=True).read_obj()
  except TruncatedFile as e:
    raise T7ImportError(f"{path} is truncated: it ends early ({e}). An incomplete download? Fetch the file "
                        "again.") from e
  except Exception as e:  # torchfile raises whatever a damaged stream triggers
    raise T7ImportError(f"{path} is not a readable Torch7 binary file ({type(e).__name__}: {e}); expected a "
                        "file written by torch.save in binary mode, such as the original's model_<epoch>.t7.") from e
  finally:
    torchfile.type_handlers.clear()
    torchfile.type_handlers.update(handlers)
  if file.left():
    raise T7ImportError(f"{path} goes on for {file.left()} bytes after the object torch.save wrote (it ends at byte "
                        f"{file.position} of {file.size}): a damaged download, or two files joined? Fetch the file "
                        "again.")
  return obj


def _typename(obj) -> str | None:
  name = getattr(obj, "torch_typename", None)
  if not callable(name):
    return None
  name = name()
  return name.decode() if isinstance(name, bytes) else name


@dataclasses.dataclass
class Leaf:
  """One non-container module of the file, in forward order."""
  path: str  # Lua's way to reach it, e.g. 'model.modules[1].modules[5]'
  typename: str
  kind: str
  fields: Any  # the module's torchfile.TorchObject

  def get(self, name: str, default=None):
    value = self.fields[name]
    return default if value is None else value

  def describe(self) -> str:
    return f"{self.path} ({self.typename})"

  def tensor(self, name: str, owner: Any = None) -> np.ndarray:
    """The field ``name`` (of ``owner``, default the module) as float32; a clear error if it is missing."""
    value = (owner if owner is not None else self.fields)[name]
    if not isinstance(value, np.ndarray) or value.size == 0:
      raise T7ImportError(f"{self.describe()} has no tensor {name!r}; expected its trained weights.")
    return np.array(value, np.float32)


def flatten(obj, path: str = "model") -> list[Leaf]:
  """The modules of an ``nn.Sequential`` tree in forward order, each with its path; unknown modules raise."""
  typename = _typename(obj)
  if typename is None:
    what = "a Lua table" if isinstance(obj, (dict, list)) else f"a {type(obj).__name__}"
    raise T7ImportError(f"{path} is {what}, not a Torch module; expected the model saved by torch.save (an "
                        "nn.Sequential).")
  if typename in CONTAINERS:
    children = obj["modules"] or []
    if typename == "nn.DataParallelTable":
      children = children[:1]
    return [leaf for i, child in enumerate(children) for leaf in flatten(child, f"{path}.modules[{i + 1}]")]
  if typename not in KINDS:
    raise T7ImportError(f"{path} is a {typename}, which the importer does not know; it reads "
                        f"{', '.join(sorted(set(KINDS) | set(CONTAINERS)))}.")
  return [Leaf(path, typename, KINDS[typename], obj)]


def _pair(leaf: Leaf, height: str, width: str, default: int = 0) -> tuple[int, int]:
  return int(leaf.get(height, default)), int(leaf.get(width, default))


def _conv_weight(leaf: Leaf, owner, out_features: int, in_features: int, kernel: tuple[int, int]) -> np.ndarray:
  """A Torch convolution weight as (out, in, kh, kw); older files store it flattened to (out, in·kh·kw)."""
  weight = leaf.tensor("weight", owner)
  shape = (out_features, in_features, *kernel)
  if weight.size != math.prod(shape):
    raise T7ImportError(f"{leaf.describe()}: its weight has shape {weight.shape}, which does not hold "
                        f"{out_features}x{in_features}x{kernel[0]}x{kernel[1]} (out, in, kh, kw).")
  return weight.reshape(shape)


# ------------------------------------------------------------------------------------------------ layers


@dataclasses.dataclass
class TorchLayer:
  """A convolution, lookup or linear module read from the file, in Torch's layout."""
  leaf: Leaf
  in_features: int
  out_features: int
  kernel: tuple[int, int]  # (kh, kw)
  strides: tuple[int, int]
  padding: tuple[int, int]
  dictionary_size: int = 0  # 0: dense
  threshold: float = 0.0  # τ of a lookup layer
  weight: np.ndarray | None = None  # dense (out, in, kh, kw); a Linear's is (out, in) until fitted
  dictionary: np.ndarray | None = None  # (k, m)
  coefficients: np.ndarray | None = None  # (n, k, kh, kw)
  bias: np.ndarray | None = None  # (n,)
  strength: float | None = None  # the original's lambda

  @property
  def initial_sparsity(self) -> float:
    return self.threshold * math.sqrt(self.kernel[0] * self.kernel[1] * self.dictionary_size)

  def describe(self) -> str:
    shape = (f"{self.in_features}->{self.out_features}, {self.kernel[0]}x{self.kernel[1]}, stride "
             f"{self.strides[0]}, pad {self.padding[0]}")
    what = f"dictionary {self.dictionary_size}" if self.dictionary_size else "dense"
    return f"{self.leaf.describe()}: {shape}, {what}"


def _has_tensor(fields, name: str) -> bool:
  return isinstance(fields[name], np.ndarray) and fields[name].size > 0


def read_layer(leaf: Leaf, weights: bool = True) -> TorchLayer:
  """The geometry of a convolution, lookup or linear module, and its weights (float32 copies) unless
  ``weights`` is False."""
  if leaf.kind == "linear":
    shape = leaf.fields["weight"].shape if _has_tensor(leaf.fields, "weight") else ()
    if len(shape) != 2:
      raise T7ImportError(f"{leaf.describe()}: weight of shape {shape}; expected (out, in).")
    return TorchLayer(leaf, shape[1], shape[0], (1, 1), (1, 1), (0, 0),
                      weight=leaf.tensor("weight") if weights else None,
                      bias=leaf.tensor("bias") if weights and _has_tensor(leaf.fields, "bias") else None)
  kernel = _pair(leaf, "kH", "kW")
  strides = _pair(leaf, "dH", "dW", 1)
  padding = _pair(leaf, "padH", "padW")
  in_features, out_features = int(leaf.get("nInputPlane")), int(leaf.get("nOutputPlane"))
  if leaf.kind == "conv":
    if int(leaf.get("groups", 1)) != 1:
      raise T7ImportError(f"{leaf.describe()}: groups={leaf.get('groups')}; the importer reads ungrouped "
                          "convolutions only.")
    if not weights:
      return TorchLayer(leaf, in_features, out_features, kernel, strides, padding)
    return TorchLayer(leaf, in_features, out_features, kernel, strides, padding,
                      weight=_conv_weight(leaf, None, out_features, in_features, kernel),
                      bias=leaf.tensor("bias") if _has_tensor(leaf.fields, "bias") else None)
  # The lookup layer: poolconv (dictionary, 1×1 with the padding), alignconv (P, kh×kw with the stride).
  k = int(leaf.get("poolSize"))
  poolconv, alignconv = leaf.fields["poolconv"], leaf.fields["alignconv"]
  if _typename(poolconv) is None or _typename(alignconv) is None:
    raise T7ImportError(f"{leaf.describe()} has no poolconv/alignconv convolutions; expected the original's "
                        "PooledSpatialConvolution (layers/PooledSpatialConvolution.lua).")
  pool, align = Leaf(leaf.path + ".poolconv", _typename(poolconv), "conv", poolconv), Leaf(
      leaf.path + ".alignconv", _typename(alignconv), "conv", alignconv)
  if _pair(pool, "padH", "padW") != padding or _pair(align, "padH", "padW") != (0, 0) or _pair(
      align, "dH", "dW", 1) != strides or _pair(pool, "dH", "dW", 1) != (1, 1):
    raise T7ImportError(f"{leaf.describe()}: its poolconv must carry the padding {padding} at stride 1 and its "
                        f"alignconv the stride {strides} without padding, as the original's layer builds them.")
  threshold = leaf.get("sparseTh")
  if not isinstance(threshold, (int, float)) or threshold < 0:
    raise T7ImportError(f"{leaf.describe()}: sparseTh={threshold!r}; expected the layer's threshold τ >= 0.")
  lam = leaf.get("lambda")
  layer = TorchLayer(leaf, in_features, out_features, kernel, strides, padding, dictionary_size=k,
                     threshold=float(threshold), strength=float(lam) if isinstance(lam, (int, float)) else None)
  if weights:
    layer.dictionary = _conv_weight(pool, poolconv, k, in_features, (1, 1)).reshape(k, in_features)
    layer.coefficients = _conv_weight(align, alignconv, out_features, k, kernel)
    layer.bias = align.tensor("bias", alignconv) if _has_tensor(alignconv, "bias") else None
  return layer


def eval_scale(leaf: Leaf) -> float:
  """The factor a dropout module multiplies by at evaluation: 1 - p where it does not rescale in training."""
  p = float(leaf.get("p", 0.5))
  if leaf.get("stochastic_inference", False):
    raise T7ImportError(f"{leaf.describe()} drops units at evaluation (stochastic_inference); the importer "
                        "reads deterministic models only.")
  scales_in_training = leaf.typename == "nn.Dropout" and bool(leaf.get("v2", False))
  return 1.0 if scales_in_training else 1.0 - p


def model_eval_scale(dropout: nnx.Module) -> float:
  """The factor the model's own dropout multiplies by at evaluation (1 - rate for Torch's SpatialDropout)."""
  return 1.0 - dropout.rate if isinstance(dropout, SpatialDropout) else 1.0


# ------------------------------------------------------------------------------------------------ config


def infer_config(leaves: Sequence[Leaf], image_size: int) -> ml_collections.ConfigDict:
  """The lcnn_jax config of an AlexNet or AlexNet-LCNN file: sizes, τ and λ read from its modules."""
  found = [read_layer(leaf, weights=False) for leaf in leaves if leaf.kind in LAYER_KINDS]
  if len(found) != 8:
    raise T7ImportError(f"The file has {len(found)} convolution/lookup/linear modules "
                        f"({', '.join(layer.leaf.path for layer in found)}); the original's AlexNet models have 8 "
                        "(conv1..conv5, fc6, fc7, fc8). Pass --config for another architecture's file.")
  lcnn = found[0].dictionary_size > 0
  c = imagenet.recipe("alexnet-lcnn" if lcnn else "alexnet", batch_size=128, lr_schedule="alexnet")
  c.data.image_size = image_size
  if lcnn:
    names = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
    for layer, name in zip(found[1:5], names[1:5]):
      if not layer.dictionary_size:
        raise T7ImportError(f"{layer.describe()} is {name}, which alexnet-lcnn has as a lookup layer (as "
                            f"conv1 {found[0].leaf.path} is); pass --config for another model.")
    c.model.dictionary.first = found[0].dictionary_size
    c.model.dictionary.convs = tuple(layer.dictionary_size for layer in found[1:5])
    if found[5].dictionary_size != found[6].dictionary_size:
      raise T7ImportError(f"fc6 {found[5].describe()} and fc7 {found[6].describe()} have different dictionary "
                          "sizes; lcnn_jax's alexnet-lcnn gives both model.dictionary.fc.")
    c.model.dictionary.fc = found[5].dictionary_size
    c.model.dictionary.classifier = found[7].dictionary_size
    c.model.initial_sparsity = found[0].initial_sparsity
    if found[0].strength is not None:
      c.sparsity.rule = "threshold"  # the rule the original's models were trained with
      c.sparsity.strength = found[0].strength
  else:
    c.sparsity.strength = 0.0
  return c


# ------------------------------------------------------------------------------------------------ matching


@dataclasses.dataclass(frozen=True)
class Step:
  """What the lcnn_jax model expects next: a kind of module and, for weighted ones, its attribute."""
  kind: str  # layer | bn | relu | pool | dropout
  name: str = ""

  def describe(self) -> str:
    return {"layer": f"{self.name} (a convolution, lookup or linear layer)", "bn": f"{self.name} (a "
            "SpatialBatchNormalization)", "relu": "a ReLU", "pool": "a 3x3/2 SpatialMaxPooling",
            "dropout": f"{self.name} (a Dropout or SpatialDropout)"}[self.kind]


def alexnet_steps() -> list[Step]:
  """The module sequence of ``models/alexnet*.lua``, as :class:`lcnn_jax.models.AlexNet` computes it."""
  steps = []
  for i in range(1, 6):
    steps += [Step("layer", f"conv{i}"), Step("bn", f"bn{i}"), Step("relu")]
    if i in (1, 2, 5):
      steps.append(Step("pool"))
  for i in (6, 7):
    steps += [Step("dropout", f"dropout{i}"), Step("layer", f"fc{i}"), Step("bn", f"bn{i}"), Step("relu")]
  return steps + [Step("layer", "fc8")]


def _expected_layer(module, name: str, config: ml_collections.ConfigDict) -> str:
  key = {"conv1": "model.dictionary.first", "fc6": "model.dictionary.fc", "fc7": "model.dictionary.fc",
         "fc8": "model.dictionary.classifier"}.get(name, "model.dictionary.convs")
  kh, kw = module.kernel_size
  if isinstance(module, layers.LookupConv):
    expected = (f"a lookup layer {module.in_features}->{module.out_features}, {kh}x{kw}, stride "
                f"{module.strides[0]}, pad {module.padding[0]}, dictionary {module.dictionary_size} ({key}), "
                f"initial sparsity {module.initial_sparsity:g} (model.initial_sparsity)")
  else:
    expected = (f"a dense convolution {module.in_features}->{module.out_features}, {kh}x{kw}, stride "
                f"{module.strides if isinstance(module.strides, int) else module.strides[0]}, pad "
                f"{module.padding[0][0]}{f' (dense: {key} = 0)' if config.model.name == 'alexnet-lcnn' else ''}")
  if name == "fc6":  # its kernel covers conv5's pooled map, whose side follows from the input's
    size = config.data.image_size
    expected += f"; fc6's {kh}x{kw} kernel covers the map of {size}x{size} inputs (--image_size)"
  return expected


def _fits(layer: TorchLayer, module) -> bool:
  if isinstance(module, layers.LookupConv):
    return (layer.dictionary_size == module.dictionary_size and layer.in_features == module.in_features and
            layer.out_features == module.out_features and layer.kernel == module.kernel_size and
            layer.strides == module.strides and layer.padding == module.padding and
            math.isclose(layer.initial_sparsity, module.initial_sparsity, rel_tol=RELATIVE_TOLERANCE))
  kh, kw, m, n = module.kernel.shape
  strides = module.strides if not isinstance(module.strides, int) else (module.strides,) * 2
  padding = tuple(p[0] for p in module.padding)
  if layer.dictionary_size:
    return False
  if layer.leaf.kind == "linear":  # a fully connected layer over the (c, h, w)-flattened map
    return layer.out_features == n and layer.in_features == m * kh * kw
  return (layer.in_features == m and layer.out_features == n and layer.kernel == (kh, kw) and
          tuple(layer.strides) == tuple(strides) and layer.padding == padding)


def _layer_values(layer: TorchLayer, module, scale: float) -> dict[str, np.ndarray]:
  """The module's parameters from a Torch layer: OIHW -> HWIO, (k, m) -> (m, k); ``scale`` folds a dropout."""
  n = layer.out_features
  bias = layer.bias if layer.bias is not None else np.zeros(n, np.float32)
  if isinstance(module, layers.LookupConv):
    # Scaling the input scales S = X ⊛ D; folding it into D leaves P and its threshold untouched.
    return {"dictionary": layer.dictionary.T * scale, "coefficients": layer.coefficients.transpose(2, 3, 1, 0),
            "bias": bias}
  kh, kw, m, _ = module.kernel.shape
  weight = layer.weight.reshape(n, m, kh, kw)  # a Linear's (n, c·h·w) is Torch's (c, h, w) flattening
  return {"kernel": weight.transpose(2, 3, 1, 0) * scale, "bias": bias}


def batch_norm_values(leaf: Leaf, module: nnx.BatchNorm) -> dict[str, np.ndarray]:
  """Scale, bias and running statistics of a SpatialBatchNormalization for ``module`` (eps must agree)."""
  n = module.num_features
  eps = float(leaf.get("eps", 1e-5))
  if not math.isclose(eps, module.epsilon, rel_tol=RELATIVE_TOLERANCE):
    raise T7ImportError(f"{leaf.describe()}: eps={eps:g}; expected {module.epsilon:g}, the epsilon of this "
                        "model's BatchNorm (the original's AlexNet-LCNN uses 1e-3, its CNN 1e-5).")
  mean = leaf.tensor("running_mean")
  if isinstance(leaf.fields["running_var"], np.ndarray):
    var = leaf.tensor("running_var")
  elif isinstance(leaf.fields["running_std"], np.ndarray):  # older nn: 1 / sqrt(var + eps)
    var = 1.0 / np.square(leaf.tensor("running_std")) - eps
  else:
    raise T7ImportError(f"{leaf.describe()} has neither running_var nor running_std; expected its statistics.")
  affine = isinstance(leaf.fields["weight"], np.ndarray) and leaf.fields["weight"].size
  scale = leaf.tensor("weight") if affine else np.ones(n, np.float32)
  bias = leaf.tensor("bias") if affine else np.zeros(n, np.float32)
  for name, value in (("running_mean", mean), ("running_var", var), ("weight", scale), ("bias", bias)):
    if value.shape != (n,):
      raise T7ImportError(f"{leaf.describe()}: {name} has shape {value.shape}; expected ({n},) for "
                          f"{n} channels.")
  return {"scale": scale, "bias": bias, "mean": mean, "var": var}


def _check_pool(leaf: Leaf) -> None:
  geometry = (_pair(leaf, "kH", "kW"), _pair(leaf, "dH", "dW", 1), _pair(leaf, "padH", "padW"))
  if geometry != ((3, 3), (2, 2), (0, 0)) or leaf.get("ceil_mode", False):
    raise T7ImportError(f"{leaf.describe()}: kernel {geometry[0]}, stride {geometry[1]}, pad {geometry[2]}"
                        f"{', ceil mode' if leaf.get('ceil_mode', False) else ''}; expected the AlexNet max "
                        "pooling 3x3, stride 2, no padding, floor mode.")


def _check_relu(leaf: Leaf) -> None:
  if leaf.get("threshold", 0) != 0 or leaf.get("val", 0) != 0:
    raise T7ImportError(f"{leaf.describe()}: threshold {leaf.get('threshold')}, value {leaf.get('val')}; "
                        "expected a plain ReLU (threshold 0, value 0).")


def match(leaves: Sequence[Leaf], model: nnx.Module, config: ml_collections.ConfigDict,
          steps: Sequence[Step]) -> dict[str, dict[str, np.ndarray]]:
  """The parameters of each of ``model``'s modules (by attribute name) from the file's modules, in order.

  Raises T7ImportError naming the file's module and what the model expected there.
  """
  values: dict[str, dict[str, np.ndarray]] = {}
  scale, i = 1.0, 0
  classifier = False  # after the last pooling, where View/Reshape flatten the map
  last = "the start of the model"
  for leaf in leaves:
    if leaf.kind == "view":
      if not classifier:
        raise T7ImportError(f"{leaf.describe()} reshapes the feature maps before the classifier; expected "
                            f"{steps[i].describe()} after {last}.")
      continue
    if leaf.kind == "output":
      if i < len(steps):
        raise T7ImportError(f"{leaf.describe()} comes before the end of the model; expected "
                            f"{steps[i].describe()} after {last}.")
      continue
    if i == len(steps):
      raise T7ImportError(f"{leaf.describe()} follows fc8, the last layer of {config.model.name}; expected the "
                          "end of the model (or View/Reshape, LogSoftMax).")
    step = steps[i]
    kind = "layer" if leaf.kind in LAYER_KINDS else leaf.kind
    if kind != step.kind:
      raise T7ImportError(f"{leaf.describe()} does not fit {config.model.name}: expected {step.describe()} "
                          f"after {last}.")
    if step.kind == "layer":
      module = getattr(model, step.name)
      layer = read_layer(leaf)
      if not _fits(layer, module):
        raise T7ImportError(
            f"{layer.describe()}{f', initial sparsity {layer.initial_sparsity:g}' if layer.dictionary_size else ''}"
            f" does not fit {step.name} of {config.model.name}: expected {_expected_layer(module, step.name, config)}. "
            "Pass the --config (and --config.model.* values) the file was trained with, or leave --config out to "
            "read the sizes from the file.")
      values[step.name] = _layer_values(layer, module, scale)
      scale = 1.0
    elif step.kind == "bn":
      values[step.name] = batch_norm_values(leaf, getattr(model, step.name))
    elif step.kind == "relu":
      _check_relu(leaf)
    elif step.kind == "pool":
      _check_pool(leaf)
      classifier = all(s.kind != "pool" for s in steps[i + 1:])
    else:  # a dropout: fold what the file's multiplies by at evaluation beyond what the model's own does
      scale *= eval_scale(leaf) / model_eval_scale(getattr(model, step.name))
    last = leaf.describe()
    i += 1
  if i < len(steps):
    raise T7ImportError(f"The model ends after {last}; expected {steps[i].describe()} next "
                        f"({len(steps) - i} more modules of {config.model.name}).")
  return values


def assign(model: nnx.Module, values: dict[str, dict[str, np.ndarray]]) -> None:
  """Writes the matched parameters into ``model``'s variables (shapes were checked by :func:`match`)."""
  for name, arrays in values.items():
    module = getattr(model, name)
    for attribute, value in arrays.items():
      variable = getattr(module, attribute)
      if tuple(variable.shape) != value.shape:
        raise T7ImportError(f"{name}.{attribute}: the file gives shape {value.shape}, the model has "
                            f"{tuple(variable.shape)}.")
      variable[...] = jnp.asarray(value, variable.dtype)


def sort_classes(values: dict[str, dict[str, np.ndarray]], classifier: str,
                 class_names: Sequence[str]) -> list[str]:
  """Reorders the classifier's outputs to the sorted class names (an lcnn_jax image folder's label order)."""
  order = np.argsort(np.asarray(class_names, dtype=object), kind="stable")
  layer = values[classifier]
  for key in ("kernel", "coefficients"):
    if key in layer:
      layer[key] = layer[key][..., order]
  layer["bias"] = layer["bias"][order]
  return [class_names[j] for j in order]


# ------------------------------------------------------------------------------------------------ side files


def read_classes(path: str) -> list[str]:
  """Class names from a text file (one per line) or a .t7 holding a list of names or an object with ``classes``
  (the original's ``classes.t7``, or ``imagenet_trainCache.t7`` of its cache.tar.gz)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--classes {path!r} does not exist: pass a text file with one class name per line, "
                            "or the original's classes.t7 / imagenet_trainCache.t7.")
  if path.endswith(".t7"):
    obj = read_t7(path)
    names = obj if isinstance(obj, list) else (obj["classes"] if _typename(obj) or isinstance(obj, dict) else None)
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
      raise T7ImportError(f"--classes {path}: holds no list of class names (expected a list, or an object "
                          "with a 'classes' list, such as the dataLoader of imagenet_trainCache.t7).")
    return [n.decode() if isinstance(n, bytes) else n for n in names]
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def read_mean_std(path: str) -> tuple[list[float], list[float]]:
  """Per-channel mean and std from the original's ``imagenet_meanstdCache.t7`` (a table {mean=…, std=…})."""
  obj = read_t7(path)
  try:
    mean, std = [float(v) for v in obj["mean"]], [float(v) for v in obj["std"]]
  except (TypeError, KeyError) as e:
    raise T7ImportError(f"--meanstd {path}: expected a table with 'mean' and 'std' lists, as the original's "
                        "imagenet_meanstdCache.t7.") from e
  return mean, std


# ------------------------------------------------------------------------------------------------ import


def import_model(t7_path: str, config: ml_collections.ConfigDict | None = None, *, image_size: int | None = None,
                 class_names: Sequence[str] | None = None) -> tuple[nnx.Module, ml_collections.ConfigDict,
                                                                     list[str] | None]:
  """The lcnn_jax model holding a .t7 file's weights, its config, and its class names (sorted, when given).

  Args:
    t7_path: the original's model file.
    config: the run config of the model to fill; None reads an AlexNet/AlexNet-LCNN config from the file.
    image_size: the input side (default: ``config.data.image_size``, 224 for ImageNet).
    class_names: the names of the file's outputs in its order; the outputs are then reordered to sorted names.
  """
  root = read_t7(t7_path)
  leaves = flatten(root)
  if config is None:
    config = infer_config(leaves, image_size or 224)
  else:
    config = config.copy_and_resolve_references()
    if image_size:
      config.data.image_size = image_size
  config_lib.validate(config)
  if config.model.name not in ALEXNET_MODELS:
    raise T7ImportError(f"model.name={config.model.name!r}: the importer reads the original's AlexNet files "
                        f"({', '.join(ALEXNET_MODELS)}), the architecture of its published models.")
  layer_leaves = [leaf for leaf in leaves if leaf.kind in LAYER_KINDS]
  classifier = read_layer(layer_leaves[-1], weights=False) if layer_leaves else None
  if classifier is None:
    raise T7ImportError(f"{t7_path} holds no convolution or linear module: not a trained model.")
  num_classes = classifier.out_features
  if class_names is not None and len(class_names) != num_classes:
    raise T7ImportError(f"--classes gives {len(class_names)} names; the model's classifier "
                        f"{classifier.leaf.path} has {num_classes} outputs.")
  size = config.data.image_size or 224
  info = dataset_info(config, num_classes, (size, size, 3), class_names, mean=[0.0] * 3, std=[1.0] * 3)
  model = train.create_model(config, info)
  values = match(leaves, model, config, alexnet_steps())
  names = sort_classes(values, "fc8", list(class_names)) if class_names is not None else None
  assign(model, values)
  return model, config, names


def dataset_info(config: ml_collections.ConfigDict, num_classes: int, image_shape: tuple[int, int, int],
                 class_names: Sequence[str] | None, mean: Sequence[float], std: Sequence[float]) -> data.DatasetInfo:
  """The dataset facts of an imported ImageNet model (the image counts of ILSVRC-2012 for 1000 classes)."""
  imagenet = num_classes == 1000
  return data.DatasetInfo(name=config.data.name, num_classes=num_classes, image_shape=image_shape,
                          num_train=1_281_167 if imagenet else 0, num_eval=50_000 if imagenet else 0,
                          class_names=list(class_names) if class_names is not None else None,
                          mean=tuple(mean), std=tuple(std))


def write_run(model: nnx.Module, config: ml_collections.ConfigDict, info: data.DatasetInfo, workdir: str,
              source: dict[str, Any]) -> None:
  """Writes the run into a temporary directory beside ``workdir`` and renames it to ``workdir`` when complete.

  ``workdir`` must not exist or be empty: nothing already there is replaced, and an interrupted import leaves no
  directory that looks like a run.
  """
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise T7ImportError(f"--workdir {workdir} already exists and is not empty; choose a new directory (the "
                        "importer never writes over a run).")
  parent = os.path.dirname(workdir)
  os.makedirs(parent, exist_ok=True)
  temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(workdir)}.import-", dir=parent)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o777 & ~umask)  # mkdtemp's 0700 would make the run private
    checkpoint.save_run_info(temporary, config, train.dataset_facts(info) | {"imported_from": source})
    with open(os.path.join(temporary, CONFIG_FILE), "w") as f:
      f.write(GENERATED_CONFIG.format(source=os.path.basename(source["file"]), workdir=workdir))
    checkpoint.save_model(temporary, model, step=IMPORTED_STEP, imported_from=source["file"])
    _check_round_trip(model, temporary, info.image_shape)
    if os.path.isdir(workdir):
      os.rmdir(workdir)  # empty, checked above
    os.rename(temporary, workdir)
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)  # only the importer's own temporary directory
    raise


def _check_round_trip(model: nnx.Module, run_dir: str, image_shape: Sequence[int]) -> None:
  """The run restored from disk computes the logits of the model it was written from."""
  restored, _, _ = checkpoint.restore_model(run_dir)
  x = jax.random.normal(jax.random.key(0), (2, *image_shape), jnp.float32)
  expected = np.asarray(layers.eval_view(model)(x))
  got = np.asarray(layers.eval_view(restored)(x))
  if not np.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max() + 1)):
    raise RuntimeError(f"The checkpoint written to {run_dir} does not restore the imported model "
                       f"(largest logit difference {np.abs(got - expected).max():g}).")


def densities(model: nnx.Module) -> dict[str, float]:
  """The density of thresholded P per lookup layer."""
  return {name: float(np.mean(np.asarray(getattr(model, name).thresholded_coefficients()) != 0))
          for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
          if isinstance(getattr(model, name), layers.LOOKUP_LAYERS)}


# ------------------------------------------------------------------------------------------------ CLI


def mean_std(meanstd: str | None, mean: Sequence[str] | None, std: Sequence[str] | None
             ) -> tuple[list[float], list[float], str]:
  """The input normalisation from ``--meanstd`` or ``--mean``/``--std``, and where it came from."""
  if meanstd:
    if mean or std:
      raise T7ImportError("Pass either --meanstd or --mean/--std, not both.")
    mean_values, std_values = read_mean_std(meanstd)
    where = os.path.abspath(meanstd)
  elif mean and std:
    try:
      mean_values, std_values = [float(v) for v in mean], [float(v) for v in std]
    except ValueError as e:
      raise T7ImportError(f"--mean={','.join(mean)} --std={','.join(std)}: expected numbers.") from e
    where = "--mean/--std"
  else:
    raise T7ImportError("The original normalised its inputs with the per-channel mean/std in its cache.tar.gz "
                        "(imagenet_meanstdCache.t7): pass --meanstd PATH, or --mean R,G,B --std R,G,B.")
  if len(mean_values) != 3 or len(std_values) != 3 or min(std_values) <= 0:
    raise T7ImportError(f"mean={mean_values}, std={std_values}: expected 3 values each (R, G, B), every std > 0.")
  return mean_values, std_values, where


def import_run(t7_path: str, workdir: str, *, config: ml_collections.ConfigDict | None = None,
               image_size: int | None = None, classes: str | None = None, meanstd: str | None = None,
               mean: Sequence[str] | None = None, std: Sequence[str] | None = None) -> str:
  """Imports ``t7_path`` as a run in ``workdir`` (the command's work); returns the summary it prints."""
  mean_values, std_values, mean_std_source = mean_std(meanstd, mean, std)
  class_names = read_classes(classes) if classes else None
  model, config, names = import_model(t7_path, config, image_size=image_size, class_names=class_names)
  config.data.mean, config.data.std = tuple(mean_values), tuple(std_values)
  size = config.data.image_size
  info = dataset_info(config, model.num_classes, (size, size, 3), names, mean_values, std_values)
  source = {"file": os.path.abspath(t7_path), "mean_std": mean_std_source,
            "classes": os.path.abspath(classes) if classes else None}
  write_run(model, config, info, workdir, source)
  lines = [f"{workdir}: {config.model.name} from {t7_path}, {model.num_classes} classes "
           f"({'reordered to sorted names' if names else 'numbered in the file order'}), {size}x{size} inputs, "
           f"mean {mean_values}, std {std_values}"]
  lines += [f"  {name:<6} density of P {density:.4f}" for name, density in densities(model).items()]
  return "\n".join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags (defined when run as a program, so importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "Where to write the run (a new or empty directory).", flag_values=flag_values)
  config_flags.DEFINE_config_file(
      "config", None, "The config the file was trained with (e.g. configs/alexnet_fast.py, with --config.model.* "
      "overrides); unset, the model's sizes, threshold and lambda are read from the file.", flag_values=flag_values,
      lock_config=False)
  flags.DEFINE_integer("image_size", None, "Input side (default: the config's data.image_size, 224).",
                       flag_values=flag_values)
  flags.DEFINE_string("classes", None, "The model's class names in its output order: a text file (one per line), "
                      "the original's classes.t7 or its imagenet_trainCache.t7. The outputs are then reordered to "
                      "sorted names, the order lcnn_jax reads an ImageNet folder in. Unset, outputs keep their "
                      "numbers.", flag_values=flag_values)
  flags.DEFINE_string("meanstd", None, "The original's input normalisation: imagenet_meanstdCache.t7 from the "
                      "cache.tar.gz its README links.", flag_values=flag_values)
  flags.DEFINE_list("mean", None, "Per-channel mean of [0, 1] RGB pixels (instead of --meanstd).",
                    flag_values=flag_values)
  flags.DEFINE_list("std", None, "Per-channel std of [0, 1] RGB pixels (instead of --meanstd).",
                    flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """``python -m lcnn_jax.import_t7 MODEL.t7 --workdir DIR --meanstd FILE``: exit status 2 on a user mistake."""
  if len(argv) != 2 or not flag_values.workdir:
    if len(argv) > 2:  # e.g. a tuple override's value taken for a file: --config.model.dictionary.convs (30,30)
      seen = (f"got {len(argv) - 1} files: {' '.join(argv[1:])}; give a tuple flag its value after '=', e.g. "
              "--config.model.dictionary.convs='(30,30,30,30)'")
    else:
      seen = "no MODEL.t7" if len(argv) < 2 else "no --workdir"
    raise T7ImportError("usage: python -m lcnn_jax.import_t7 MODEL.t7 --workdir DIR (--meanstd FILE | --mean "
                        f"R,G,B --std R,G,B) [--config configs/alexnet_fast.py] [--classes FILE] ({seen})")
  summary = import_run(argv[1], flag_values.workdir, config=flag_values.config,
                       image_size=flag_values.image_size, classes=flag_values.classes, meanstd=flag_values.meanstd,
                       mean=flag_values.mean, std=flag_values.std)
  sys.stdout.write(summary + "\n")


USER_ERRORS = (T7ImportError, FileNotFoundError, checkpoint.CheckpointError, ValueError)  # exit 2, no traceback

if __name__ == "__main__":
  define_flags()
  cli.run(main, user_errors=USER_ERRORS)
