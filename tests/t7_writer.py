"""A small Torch7 binary writer and a float64 NumPy forward with Torch's semantics, for the importer's tests.

``write(path, obj)`` follows torch7's ``File:writeObject`` (binary mode, little-endian, 8-byte longs): tables,
numbers, strings, booleans, nil, and Torch objects (a version string, the class name, then the object's table;
tensors as ndim, sizes, strides, 1-based storage offset and their storage, an empty tensor with no dimensions
and a nil storage; storages as their size and values). An object referenced twice is written
once and then by its index, as Torch does (the original's lookup layer shares ``weight`` with its ``poolconv``).

``alexnet_lcnn(...)`` builds the module tree of the original's ``models/alexnet-lcnn.lua`` with
``layers/PooledSpatialConvolution.lua`` lookup layers, and ``forward(module, x)`` evaluates such a tree in float64
as Torch would in evaluation mode: each lookup layer first zeroes |P| <= sparseTh, BatchNorm uses its running
statistics, ``nn.SpatialDropout`` and ``nn.Dropout`` without ``v2`` multiply by 1 - p.
"""

from __future__ import annotations

import math
import os
import struct
import sys
from typing import Any, Sequence

import numpy as np

NIL, NUMBER, STRING, TABLE, TORCH, BOOLEAN = 0, 1, 2, 3, 4, 5
STORAGE = {"torch.FloatTensor": ("torch.FloatStorage", np.float32),
           "torch.DoubleTensor": ("torch.DoubleStorage", np.float64),
           "torch.CudaTensor": ("torch.CudaStorage", np.float32),
           "torch.CudaDoubleTensor": ("torch.CudaDoubleStorage", np.float64),
           "torch.CudaHalfTensor": ("torch.CudaHalfStorage", np.float16),
           "torch.LongTensor": ("torch.LongStorage", np.int64),
           "torch.CudaLongTensor": ("torch.CudaLongStorage", np.int64)}


class Module:
  """A Torch object: its class name and its fields (the table Torch serialises)."""

  def __init__(self, typename: str, **fields):
    self.typename = typename
    self.fields = fields

  def __getitem__(self, key):
    return self.fields.get(key)


class Tensor:
  """A Torch tensor of ``typename`` (e.g. torch.CudaTensor) holding ``array``."""

  def __init__(self, array: np.ndarray, typename: str):
    self.typename = typename
    self.array = np.ascontiguousarray(array, STORAGE[typename][1])


class Storage:
  """A Torch storage of ``typename`` (e.g. torch.LongStorage, the size of an nn.View) holding ``array``."""

  def __init__(self, array: np.ndarray, typename: str):
    self.typename = typename
    self.array = np.ascontiguousarray(array).ravel()


class _Writer:

  def __init__(self, f):
    self.f = f
    self.index: dict[int, tuple[int, Any]] = {}  # id -> (Torch's reference index, the object, kept alive)

  def int(self, value: int) -> None:
    self.f.write(struct.pack("<i", value))

  def long(self, *values: int) -> None:
    self.f.write(struct.pack(f"<{len(values)}q", *values))

  def string(self, value: str) -> None:
    raw = value.encode()
    self.int(len(raw))
    self.f.write(raw)

  def _reference(self, obj) -> bool:
    """Writes the object's index; True when it was written before (only the index is due then)."""
    if id(obj) in self.index:
      self.int(self.index[id(obj)][0])
      return True
    self.index[id(obj)] = (len(self.index) + 1, obj)
    self.int(len(self.index))
    return False

  def object(self, obj: Any) -> None:
    if obj is None:
      self.int(NIL)
    elif isinstance(obj, bool):
      self.int(BOOLEAN)
      self.int(int(obj))
    elif isinstance(obj, (int, float)):
      self.int(NUMBER)
      self.f.write(struct.pack("<d", float(obj)))
    elif isinstance(obj, str):
      self.int(STRING)
      self.string(obj)
    elif isinstance(obj, (dict, list)):
      self.int(TABLE)
      if self._reference(obj):
        return
      items = obj.items() if isinstance(obj, dict) else enumerate(obj, start=1)
      items = list(items)
      self.int(len(items))
      for key, value in items:
        self.object(key)
        self.object(value)
    elif isinstance(obj, Tensor):
      self.int(TORCH)
      if self._reference(obj):
        return
      self.string("V 1")
      self.string(obj.typename)
      array = obj.array
      if array.size == 0:  # as Torch writes tensor.new(): no dimensions, no storage
        self.int(0)
        self.long(1)
        self.object(None)
        return
      self.int(array.ndim)
      self.long(*array.shape)
      self.long(*(s // array.itemsize for s in array.strides))
      self.long(1)  # storage offset, 1-based
      self.object(Storage(array, STORAGE[obj.typename][0]))  # the storage is an object of its own
    elif isinstance(obj, Storage):
      self.int(TORCH)
      if self._reference(obj):
        return
      self.string("V 1")
      self.string(obj.typename)
      self.long(obj.array.size)
      self.f.write(obj.array.tobytes())
    elif isinstance(obj, Module):
      self.int(TORCH)
      if self._reference(obj):
        return
      self.string("V 1")
      self.string(obj.typename)
      self.object(obj.fields)
    else:
      raise TypeError(f"cannot write {type(obj).__name__}")


def write(path: str, obj: Any) -> None:
  """Writes ``obj`` as torch.save(path, obj) would in binary mode."""
  with open(path, "wb") as f:
    _Writer(f).object(obj)


# ------------------------------------------------------------------------------------------------ modules


class Factory:
  """Builds the original's modules with tensors of one type (CPU or CUDA)."""

  def __init__(self, tensor_type: str = "torch.CudaTensor", grad_buffers: bool = True):
    self.tensor_type = tensor_type
    self.grad_buffers = grad_buffers  # Torch keeps gradWeight in saved models; large files can leave it out

  def tensor(self, array) -> Tensor:
    return Tensor(np.asarray(array), self.tensor_type)

  def _base(self) -> dict:
    return {"train": False, "_type": self.tensor_type, "output": self.tensor(np.zeros(0)),
            "gradInput": self.tensor(np.zeros(0))}

  def conv(self, weight: np.ndarray, bias: np.ndarray | None, stride: int = 1, pad: int = 0,
           typename: str = "cudnn.SpatialConvolution") -> Module:
    """A convolution with Torch's OIHW ``weight``."""
    n, m, kh, kw = weight.shape
    return Module(typename, **self._base(), nInputPlane=m, nOutputPlane=n, kW=kw, kH=kh, dW=stride, dH=stride,
                  padW=pad, padH=pad, groups=1, weight=self.tensor(weight),
                  bias=None if bias is None else self.tensor(bias),
                  gradWeight=self.tensor(np.zeros_like(weight) if self.grad_buffers else np.zeros(0)),
                  gradBias=None if bias is None else self.tensor(np.zeros_like(bias) if self.grad_buffers
                                                                 else np.zeros(0)))

  def pooled_conv(self, dictionary: np.ndarray, coefficients: np.ndarray, bias: np.ndarray, stride: int, pad: int,
                  initial_sparsity: float = 0.01, strength: float = 0.0) -> Module:
    """The original's cudnn.PooledSpatialConvolution: ``dictionary`` (k, m), ``coefficients`` (n, k, kh, kw).

    As saved after training: its ``clearState`` clears only the inner Sequential, so the mask of the last forward
    (|P| <= τ, 1 where zeroed) and the regulariser's sign(P) stay in the file beside P, which the optimizer's last
    step has changed since.
    """
    k, m = dictionary.shape
    n, _, kh, kw = coefficients.shape
    threshold = initial_sparsity / math.sqrt(kw * kh * k)
    poolconv = self.conv(dictionary.reshape(k, m, 1, 1), None, 1, pad)
    alignconv = self.conv(coefficients, bias, stride, 0)
    return Module("cudnn.PooledSpatialConvolution", **self._base(), nInputPlane=m, nOutputPlane=n, kW=kw, kH=kh,
                  dW=stride, dH=stride, padW=pad, padH=pad, poolSize=k, **{"lambda": strength},
                  sparseTh=threshold, poolconv=poolconv, alignconv=alignconv,
                  m=self.sequential([poolconv, alignconv]), weight=poolconv["weight"], bias=alignconv["bias"],
                  gradWeight=poolconv["gradWeight"], gradBias=alignconv["gradBias"],
                  zeroMask=self.tensor(np.abs(coefficients) <= threshold),
                  gradRegularizer=self.tensor(np.sign(coefficients)))

  def batch_norm(self, weight, bias, mean, var, eps: float) -> Module:
    return Module("nn.SpatialBatchNormalization", **self._base(), eps=eps, momentum=0.1, affine=True,
                  weight=self.tensor(weight), bias=self.tensor(bias), running_mean=self.tensor(mean),
                  running_var=self.tensor(var))

  def relu(self, typename: str = "cudnn.ReLU") -> Module:
    return Module(typename, **self._base(), inplace=True, threshold=0, val=0)

  def max_pool(self, kernel: int = 3, stride: int = 2) -> Module:
    """nn.SpatialMaxPooling with the (cleared) indices nn keeps beside it: a CudaLongTensor on the GPU."""
    indices = "torch.CudaLongTensor" if self.tensor_type.startswith("torch.Cuda") else "torch.LongTensor"
    return Module("nn.SpatialMaxPooling", **self._base(), kW=kernel, kH=kernel, dW=stride, dH=stride, padW=0,
                  padH=0, ceil_mode=False, indices=Tensor(np.zeros(0), indices))

  def dropout(self, p: float, typename: str = "nn.Dropout", v2: bool = True) -> Module:
    fields = {"p": p, "noise": self.tensor(np.zeros(0))}
    if typename == "nn.Dropout":
      fields["v2"] = v2
    return Module(typename, **self._base(), **fields)

  def view(self, size: int) -> Module:
    return Module("nn.View", **self._base(), size=Storage(np.array([size], np.int64), "torch.LongStorage"),
                  numElements=size)

  def linear(self, weight: np.ndarray, bias: np.ndarray) -> Module:
    return Module("nn.Linear", **self._base(), weight=self.tensor(weight), bias=self.tensor(bias))

  def log_softmax(self) -> Module:
    return Module("nn.LogSoftMax", **self._base())

  def sequential(self, modules: Sequence[Module]) -> Module:
    return Module("nn.Sequential", **self._base(), modules=list(modules))


def alexnet_lcnn(rng: np.random.Generator, factory: Factory, *, num_classes: int, map_size: int,
                 first_pool: int, pool_sizes: Sequence[int], fc_pool: int, initial_sparsity: float,
                 strength: float = 1.0, dropout: tuple[str, bool] = ("nn.Dropout", True),
                 linear_classifier: bool = False) -> Module:
  """The original's models/alexnet-lcnn.lua with random trained-looking weights (fc_pool > 0, fc8 dense).

  ``dropout`` is (type, v2) of the two classifier dropouts; ``linear_classifier`` writes fc8 as View + nn.Linear.
  """
  def lookup(m, n, kernel, stride, pad, k):
    bound = 1 / math.sqrt(kernel * kernel * k)
    return factory.pooled_conv(rng.uniform(-1, 1, (k, m)) / math.sqrt(m),
                               rng.uniform(-bound, bound, (n, k, kernel, kernel)), rng.uniform(-bound, bound, n),
                               stride, pad, initial_sparsity, strength)

  def bn(n):
    return factory.batch_norm(rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n),
                              rng.uniform(0.2, 0.5, n), 1e-3)

  k2, k3, k4, k5 = pool_sizes
  features = factory.sequential([
      lookup(3, 64, 11, 4, 2, first_pool), bn(64), factory.relu(), factory.max_pool(),
      lookup(64, 192, 5, 1, 2, k2), bn(192), factory.relu(), factory.max_pool(),
      lookup(192, 384, 3, 1, 1, k3), bn(384), factory.relu(),
      lookup(384, 256, 3, 1, 1, k4), bn(256), factory.relu(),
      lookup(256, 256, 3, 1, 1, k5), bn(256), factory.relu(), factory.max_pool()])
  kind, v2 = dropout
  fc8_weight = rng.normal(0, 4 / math.sqrt(4096), (num_classes, 4096))
  fc8_bias = rng.normal(0, 0.1, num_classes)
  if linear_classifier:
    fc8 = [factory.view(4096), factory.linear(fc8_weight, fc8_bias)]
  else:
    fc8 = [factory.conv(fc8_weight.reshape(num_classes, 4096, 1, 1), fc8_bias), factory.view(num_classes)]
  classifier = factory.sequential([
      factory.dropout(0.5, kind, v2), lookup(256, 4096, map_size, 1, 0, fc_pool), bn(4096), factory.relu(),
      factory.dropout(0.5, kind, v2), lookup(4096, 4096, 1, 1, 0, fc_pool), bn(4096), factory.relu(),
      *fc8, factory.log_softmax()])
  return factory.sequential([features, classifier])


def alexnet(rng: np.random.Generator, factory: Factory, *, num_classes: int, map_size: int) -> Module:
  """The original's models/alexnet.lua (the CNN): Conv-BN-ReLU blocks in their own Sequentials, SpatialDropout."""
  def block(m, n, kernel, stride=1, pad=0):
    weight = rng.normal(0, math.sqrt(2 / (m * kernel * kernel)), (n, m, kernel, kernel))
    return factory.sequential([
        factory.conv(weight, rng.normal(0, 0.1, n), stride, pad),
        factory.batch_norm(rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n),
                           rng.uniform(0.5, 2.0, n), 1e-5),
        factory.relu()])

  features = factory.sequential([
      block(3, 96, 11, 4, 2), factory.max_pool(), block(96, 256, 5, 1, 2), factory.max_pool(),
      block(256, 384, 3, 1, 1), block(384, 384, 3, 1, 1), block(384, 256, 3, 1, 1), factory.max_pool()])
  classifier = factory.sequential([
      factory.dropout(0.5, "nn.SpatialDropout"), block(256, 4096, map_size),
      factory.dropout(0.5, "nn.SpatialDropout"), block(4096, 4096, 1),
      factory.conv(rng.normal(0, 1 / math.sqrt(4096), (num_classes, 4096, 1, 1)), rng.normal(0, 0.1, num_classes)),
      factory.view(num_classes), factory.log_softmax()])
  return factory.sequential([features, classifier])


# ------------------------------------------------------------------------------------------------ forward


def _array(tensor: Tensor | None) -> np.ndarray | None:
  return None if tensor is None else tensor.array.astype(np.float64)


def _conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: int, pad: int) -> np.ndarray:
  """(N, C, H, W) ⊛ (O, C, kh, kw) with zero padding, in float64."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  kh, kw = weight.shape[2:]
  windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
  y = np.einsum("nchwij,ocij->nohw", windows, weight)  # (N, O, OH, OW)
  return y if bias is None else y + bias[None, :, None, None]


def forward(module: Module, x: np.ndarray) -> np.ndarray:
  """Torch's evaluation-mode forward of ``module`` on NCHW ``x``, in float64."""
  t = module.typename
  if t == "nn.Sequential":
    for child in module["modules"]:
      x = forward(child, x)
    return x
  if t == "cudnn.PooledSpatialConvolution":
    p = _array(module["alignconv"]["weight"])
    p[np.abs(p) <= module["sparseTh"]] = 0  # the original's forward zeroes |P| <= τ first
    s = _conv(x, _array(module["poolconv"]["weight"]), None, 1, module["padW"])
    return _conv(s, p, _array(module["alignconv"]["bias"]), module["dW"], 0)
  if t in ("cudnn.SpatialConvolution", "nn.SpatialConvolution", "nn.SpatialConvolutionMM"):
    shape = (module["nOutputPlane"], module["nInputPlane"], module["kH"], module["kW"])  # MM's may be flattened
    return _conv(x, _array(module["weight"]).reshape(shape), _array(module["bias"]), module["dW"], module["padW"])
  if t in ("nn.SpatialBatchNormalization", "cudnn.SpatialBatchNormalization"):
    shape = (1, -1, 1, 1)
    scale = _array(module["weight"]) / np.sqrt(_array(module["running_var"]) + module["eps"])
    return (x - _array(module["running_mean"]).reshape(shape)) * scale.reshape(shape) + _array(
        module["bias"]).reshape(shape)
  if t in ("cudnn.ReLU", "nn.ReLU"):
    return np.maximum(x, 0)
  if t in ("nn.SpatialMaxPooling", "cudnn.SpatialMaxPooling"):
    k, s = module["kW"], module["dW"]
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s]
    return windows.max(axis=(-2, -1))
  if t == "nn.SpatialDropout" or (t == "nn.Dropout" and not module["v2"]):
    return x * (1 - module["p"])
  if t == "nn.Dropout":
    return x
  if t in ("nn.View", "nn.Reshape"):
    return x.reshape(x.shape[0], -1)
  if t == "nn.Linear":
    return x.reshape(x.shape[0], -1) @ _array(module["weight"]).T + _array(module["bias"])
  if t in ("nn.LogSoftMax", "cudnn.LogSoftMax"):
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  raise TypeError(f"no forward for {t}")


EXAMPLE_CLASSES = [f"n{(7 * i) % 10:08d}" for i in range(10)]  # an unsorted label order, as a listing gives


def write_example(directory: str, seed: int = 0) -> None:
  """A small AlexNet-LCNN file to try the importer's commands on (docs/pretrained.md).

  Writes into ``directory``: ``alexnet-lcnn-small.t7`` (95×95 inputs, 10 classes, dictionaries of 3–8 atoms,
  initial sparsity 0.3, CUDA tensors), ``classes.t7`` (its output order, unsorted), ``meanstd.t7``, an image
  folder ``images/{train,val}/<wnid>/*.JPEG`` of random 120×140 pictures (1 and 3 per class) and ``img.jpg``.
  """
  from PIL import Image
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  tree = alexnet_lcnn(rng, Factory("torch.CudaTensor"), num_classes=10, map_size=2, first_pool=3,
                      pool_sizes=(5, 6, 7, 8), fc_pool=8, initial_sparsity=0.3)
  write(os.path.join(directory, "alexnet-lcnn-small.t7"), tree)
  write(os.path.join(directory, "classes.t7"), EXAMPLE_CLASSES)
  write(os.path.join(directory, "meanstd.t7"), {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
  for split, count in (("train", 1), ("val", 3)):
    for name in sorted(EXAMPLE_CLASSES):
      os.makedirs(os.path.join(directory, "images", split, name), exist_ok=True)
      for i in range(count):
        Image.fromarray(rng.integers(0, 256, (120, 140, 3), dtype=np.uint8)).save(
            os.path.join(directory, "images", split, name, f"{i}.JPEG"))
  Image.fromarray(rng.integers(0, 256, (120, 140, 3), dtype=np.uint8)).save(os.path.join(directory, "img.jpg"))


def write_full_size(path: str, seed: int = 0) -> None:
  """An AlexNet-LCNN file of the published models' shape: 224×224 inputs, 1000 classes, the dictionary sizes of
  configs/alexnet_fast.py (3, 30, 30, 30, 30, 512, 512), initial sparsity 0.01, λ 1, CUDA tensors with Torch's
  gradient buffers, as the original saves them."""
  tree = alexnet_lcnn(np.random.default_rng(seed), Factory("torch.CudaTensor"), num_classes=1000, map_size=6,
                      first_pool=3, pool_sizes=(30, 30, 30, 30), fc_pool=512, initial_sparsity=0.01)
  write(path, tree)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--full":
    write_full_size(sys.argv[2])  # python tests/t7_writer.py --full FILE.t7
  elif len(sys.argv) == 2:
    write_example(sys.argv[1])  # python tests/t7_writer.py DIR
  else:
    sys.exit("usage: python tests/t7_writer.py DIR | python tests/t7_writer.py --full FILE.t7")
