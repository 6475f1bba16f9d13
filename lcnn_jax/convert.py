"""Any NNX CNN -> LCNN: swap convolutions and dense layers for lookup layers; share and freeze dictionaries.

The paper's claim is that *any* CNN can be converted (§3): :func:`to_lcnn` walks a model, asks a per-layer
policy for each ``nnx.Conv`` / ``nnx.Linear`` whether to keep it dense or which dictionary size to give it, and
replaces it by a :class:`~lcnn_jax.layers.LookupConv` / :class:`~lcnn_jax.layers.LookupDense` with the same
input, output, kernel size, stride, padding and bias.

A converted layer starts either from the lookup layers' own Torch-default init or, with ``init_from_dense``,
from a **truncated factorisation of the dense kernel over the input-channel axis**. The kernel W
(kh, kw, m, n) holds kh·kw·n vectors of length m, the vectors the dictionary must code; stacked as the columns
of a matrix M (m, kh·kw·n) with SVD M = U Σ Vᵀ, the layer gets

* dictionary D = U[:, :k] (unit-norm, orthogonal atoms: the k leading directions of the vectors), and
* coefficients P = Σ[:k] Vᵀ[:k], reshaped to (kh, kw, k, n), and the dense layer's bias.

D·P is the best rank-k approximation of W in the Frobenius norm (Eckart–Young). With k ≥ m (or k ≥ rank W)
it is W itself, so the LCNN reproduces the CNN's outputs up to the threshold, which zeroes coefficients of
magnitude ≤ τ (use ``initial_sparsity=0`` for an exact copy). Atoms past the rank are the layer's own random
atoms with zero coefficients; since the threshold masks zero coefficients and their gradient, they stay
unused — a dictionary that large has no saving anyway.

Few-iteration learning (§4.4) reuses dictionaries: :func:`transfer_dictionaries` copies D by layer path from
one model into another, and :data:`coefficients_only` is the NNX filter of the parameters to train when the
dictionaries are frozen::

  transfer_dictionaries(shallow_lcnn, deep_lcnn, {"layer1/1/conv1": "layer1/0/conv1"})
  optimizer = nnx.Optimizer(deep_lcnn, tx, wrt=coefficients_only)
  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, coefficients_only))(deep_lcnn, batch)
  optimizer.update(deep_lcnn, grads)
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from lcnn_jax import sparsity
from lcnn_jax.layers import Dictionary, LookupConv, LookupDense

Policy = Callable[[str, tuple[int, ...]], int | None] | Mapping[str, int | None]

coefficients_only = nnx.All(nnx.Param, nnx.Not(Dictionary))
"""Every trainable parameter except the dictionaries: coefficients, biases, BatchNorm scales and offsets."""


def _path_string(path: Sequence) -> str:
  return "/".join(str(p) for p in path)


def dictionary_size(policy: Policy, path: str, kernel_shape: tuple[int, ...]) -> int:
  """The policy's decision for one layer: a dictionary size > 0, or 0 to keep the layer dense.

  Args:
    policy: either a function ``policy(path, kernel_shape) -> int | None`` or a mapping from regular
      expressions to sizes, matched in order against the whole path (``re.fullmatch``); the first match wins
      and an unmatched layer stays dense. None or 0 keeps a layer dense.
    path: the layer's path in the model, e.g. ``'layer1/0/conv1'``.
    kernel_shape: (kh, kw, in, out) for a convolution, (in, out) for a dense layer.
  """
  if isinstance(policy, Mapping):
    size = next((value for pattern, value in policy.items() if re.fullmatch(pattern, path)), None)
  elif callable(policy):
    size = policy(path, kernel_shape)
  else:
    raise TypeError(f"policy={policy!r}: expected a function (path, kernel_shape) -> size or a mapping from "
                    "path patterns to sizes.")
  size = int(size or 0)
  if size < 0:
    raise ValueError(f"The policy gave dictionary size {size} for layer {path!r}: use a size > 0, or 0/None to "
                     "keep the layer dense.")
  return size


def _all_ones(value) -> bool:
  return all(v == 1 for v in np.atleast_1d(value if value is not None else 1))


def _explicit_padding(path: str, layer: nnx.Conv) -> tuple[int, int]:
  """The conv's zero padding as symmetric (ph, pw), the only kind a lookup layer's dictionary stage applies."""
  kernel_size = tuple(layer.kernel_size)
  strides = layer.strides if layer.strides is not None else 1
  padding = layer.padding
  if padding == "VALID":
    return (0, 0)
  if padding == "SAME":
    if _all_ones(strides) and all(k % 2 for k in kernel_size):
      return tuple((k - 1) // 2 for k in kernel_size)
  elif isinstance(padding, int):
    return (padding, padding)
  elif isinstance(padding, Sequence) and not isinstance(padding, str) and len(padding) == 2:
    pairs = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if all(len(p) == 2 and p[0] == p[1] for p in pairs):
      return tuple(p[0] for p in pairs)
  raise ValueError(
      f"Layer {path!r} has padding={padding!r} with strides={strides!r} and kernel_size={kernel_size}: a lookup "
      "convolution needs symmetric zero padding (an int, 'VALID', symmetric pairs, or 'SAME' with stride 1 and "
      "an odd kernel). Keep this layer dense in the policy (return 0 for its path).")


def _lookup_layer(path: str, layer: nnx.Conv | nnx.Linear, size: int, initial_sparsity: float,
                  rngs: nnx.Rngs) -> LookupConv | LookupDense:
  """An untrained lookup layer with the dense layer's geometry."""
  common = dict(dictionary_size=size, use_bias=layer.use_bias, initial_sparsity=initial_sparsity,
                dtype=layer.dtype, param_dtype=layer.param_dtype, rngs=rngs)
  if isinstance(layer, nnx.Linear):
    return LookupDense(layer.in_features, layer.out_features, **common)
  if layer.kernel.ndim != 4:
    raise ValueError(f"Layer {path!r} is a {layer.kernel.ndim - 2}-D convolution: only 2-D convolutions have a "
                     "lookup version. Keep it dense in the policy.")
  unsupported = {name: getattr(layer, name) for name in ("input_dilation", "kernel_dilation")
                 if not _all_ones(getattr(layer, name))}
  if layer.feature_group_count != 1:
    unsupported["feature_group_count"] = layer.feature_group_count
  if layer.mask is not None:
    unsupported["mask"] = "set"
  if unsupported:
    raise ValueError(f"Layer {path!r} has {unsupported}: a lookup convolution supports plain (undilated, "
                     "ungrouped, unmasked) convolutions. Keep it dense in the policy.")
  return LookupConv(layer.in_features, layer.out_features, tuple(layer.kernel_size),
                    strides=layer.strides if layer.strides is not None else 1,
                    padding=_explicit_padding(path, layer), **common)


def factorise_kernel(kernel: jax.Array, dictionary: jax.Array) -> tuple[jax.Array, jax.Array]:
  """D and P whose product best approximates ``kernel``, truncated to the dictionary's k atoms.

  Args:
    kernel: the dense kernel W, (kh, kw, m, n) or (m, n).
    dictionary: a dictionary (m, k) whose atoms past rank(W) are kept as they are.
  Returns:
    (D (m, k), P (kh, kw, k, n) or (k, n)) with D·P the rank-min(k, rank) truncated SVD of W over its
    input-channel axis; the first atoms are orthonormal.
  """
  w = np.asarray(kernel, np.float64)
  dense = w.ndim == 2
  if dense:
    w = w[None, None]
  kh, kw, m, n = w.shape
  k = dictionary.shape[1]
  vectors = np.moveaxis(w, 2, 0).reshape(m, kh * kw * n)  # (m, kh·kw·n): the vectors to code
  u, s, vt = np.linalg.svd(vectors, full_matrices=False)  # u (m, r), s (r,), vt (r, kh·kw·n)
  rank = min(k, s.size)
  atoms = np.array(dictionary, np.float64)  # (m, k)
  atoms[:, :rank] = u[:, :rank]
  coefficients = np.zeros((k, kh * kw * n))  # (k, kh·kw·n)
  coefficients[:rank] = s[:rank, None] * vt[:rank]
  coefficients = np.moveaxis(coefficients.reshape(k, kh, kw, n), 0, 2)  # (kh, kw, k, n)
  if dense:
    coefficients = coefficients[0, 0]
  return (jnp.asarray(atoms, dictionary.dtype), jnp.asarray(coefficients, dictionary.dtype))


def _initialise_from_dense(lookup: LookupConv | LookupDense, layer: nnx.Conv | nnx.Linear) -> None:
  atoms, coefficients = factorise_kernel(layer.kernel[...], lookup.dictionary[...])
  lookup.dictionary[...] = atoms
  lookup.coefficients[...] = coefficients
  if layer.use_bias:
    lookup.bias[...] = layer.bias[...].astype(lookup.bias.dtype)


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(parent, (nnx.List, nnx.Dict, list, dict)) else getattr(parent, key)
  key = path[-1]
  if isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
    parent[key] = new
  else:
    setattr(parent, key, new)


def to_lcnn(model: nnx.Module, policy: Policy, *, init_from_dense: bool = False, initial_sparsity: float = 0.01,
            rngs: nnx.Rngs) -> nnx.Module:
  """A copy of ``model`` with its ``nnx.Conv``/``nnx.Linear`` layers turned into lookup layers by ``policy``.

  Args:
    model: any NNX model; it is not changed.
    policy: which layers to convert and their dictionary sizes; see :func:`dictionary_size`.
    init_from_dense: start each lookup layer from the truncated factorisation of its dense kernel (see the
      module docstring) instead of the lookup layers' own random init.
    initial_sparsity: sets each lookup layer's threshold τ = initial_sparsity / √(kh·kw·k).
    rngs: initialises the new layers (``params`` stream).
  Returns:
    The converted model. Every other module and variable (BatchNorm, dropout streams, ...) is a copy of
    the original's.
  """
  lcnn = nnx.clone(model)
  layers = [(path, layer) for path, layer in nnx.iter_modules(lcnn) if isinstance(layer, (nnx.Conv, nnx.Linear))]
  if not layers:
    raise ValueError(f"{type(model).__name__} has no nnx.Conv or nnx.Linear layer to convert.")
  converted = 0
  for path, layer in layers:
    name = _path_string(path)
    size = dictionary_size(policy, name, tuple(layer.kernel.shape))
    if not size:
      continue
    lookup = _lookup_layer(name, layer, size, initial_sparsity, rngs)
    if init_from_dense:
      _initialise_from_dense(lookup, layer)
    _replace(lcnn, path, lookup)
    converted += 1
    logging.info("to_lcnn: %s %s -> %s with a dictionary of %d atoms.", name, tuple(layer.kernel.shape),
                 type(lookup).__name__, size)
  if not converted:
    logging.warning("to_lcnn: the policy kept all %d layers dense.", len(layers))
  return lcnn


def transfer_dictionaries(source: nnx.Module, target: nnx.Module,
                          paths: Mapping[str, str] | Sequence[str] | None = None) -> list[str]:
  """Copies dictionaries D from ``source``'s lookup layers into ``target``'s, by layer path.

  Args:
    source: the model whose dictionaries are reused (e.g. a trained shallow LCNN).
    target: the model that receives them; changed in place.
    paths: ``None`` copies every lookup layer path the two models share; a sequence of paths copies those;
      a mapping ``{target_path: source_path}`` copies across different paths (one source may feed many).
  Returns:
    The target paths that received a dictionary.
  """
  sources = dict(sparsity.lookup_layers(source))
  targets = dict(sparsity.lookup_layers(target))
  if paths is None:
    pairs = [(path, path) for path in targets if path in sources]
    if not pairs:
      raise ValueError(f"The models share no lookup layer path (source: {sorted(sources)}, target: "
                       f"{sorted(targets)}); pass paths={{target_path: source_path}}.")
  elif isinstance(paths, Mapping):
    pairs = list(paths.items())
  else:
    pairs = [(path, path) for path in paths]
  for target_path, source_path in pairs:
    if source_path not in sources:
      raise ValueError(f"No lookup layer at {source_path!r} in the source; its lookup layers: {sorted(sources)}.")
    if target_path not in targets:
      raise ValueError(f"No lookup layer at {target_path!r} in the target; its lookup layers: {sorted(targets)}.")
    atoms = sources[source_path].dictionary[...]
    destination = targets[target_path].dictionary
    if atoms.shape != destination.shape:
      raise ValueError(f"Dictionary shapes differ: source {source_path!r} {atoms.shape} vs target "
                       f"{target_path!r} {destination.shape} (in_features, dictionary_size).")
    destination[...] = atoms
  return [target_path for target_path, _ in pairs]

