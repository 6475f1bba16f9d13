"""Ways to run one lookup layer at inference, all equal to the convolution with the reconstructed kernel.

A :class:`~lcnn_jax.inference.records.LookupLayer` is a trained lookup convolution ready for inference: its
dictionary D (m, k), the non-zeros of its coefficients P (kh, kw, k, n) grouped per output (the *lookups*,
:mod:`lcnn_jax.lookups`), and its bias, with any BatchNorm after it already folded in. The backends differ in how
they compute Y = (X ⊛ D) ⊛ P + bias:

* ``dense``: the reconstructed kernel W = D·P (kh, kw, m, n) in one XLA convolution (or matmul).
* ``gemm``: the same W in the C++ kernel's own dense convolution (CPU only), for the layers whose lookups lose
  to a dense convolution, in the lookups' CHWN layout.
* ``factored``: S = X ⊛ D as a 1×1 convolution, then P as a dense kh×kw convolution over S. Two
  tensor-core-friendly XLA ops; the zeros of P still cost.
* ``gather``: S in channels-first layout, then for each non-zero slot one row gather of S shifted to the
  non-zero's tap, scaled and accumulated, in plain XLA (works on any device; the fallback for ``lookup``).
* ``lookup``: the same computation in the C++ kernel of :mod:`lcnn_jax.inference.kernels`, which keeps each
  output's accumulators in registers over all its non-zeros (CPU only).
* ``pallas``: the same gathers in one Pallas kernel per layer (GPU, Triton),
  :mod:`lcnn_jax.inference.pallas_lookup`, imported when a spec first names it.

``dense`` and ``factored`` work on NHWC activations; ``gather``, ``gemm`` and ``lookup`` return channels-first, batch-last
CHWN activations (:mod:`lcnn_jax.inference.layouts`), reading S as :mod:`lcnn_jax.inference.flat_s` lays it out.
Every backend accepts any layout and transposes what it must; a first layer (a dictionary of at most 64
multiply-adds per pixel) runs ``lookup`` straight from the NHWC images.

A backend is one class with the :class:`Backend` members, registered by name in :data:`BACKENDS`. What the
runtime and the tuner need to know about it they ask it: what it can apply to its outputs as it stores them
(:meth:`Backend.fuses`: a residual, a ReLU, a max pooling), how it pools its own layout, what ``auto`` times.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.inference import flat_s, kernels, layouts, machine
from lcnn_jax.inference.layouts import NHWC, Layout
from lcnn_jax.inference.records import LookupLayer
from lcnn_jax.lookups import narrowest_index_dtype


def conv_or_matmul(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                   padding: tuple[int, int]) -> jax.Array:
  """An NHWC convolution without bias, as a matmul where it is one (1×1 kernels; kernels covering the input)."""
  kh, kw, m, n = kernel.shape
  b, h, w, _ = x.shape
  if (kh, kw) == (1, 1) and tuple(strides) == (1, 1) and tuple(padding) == (0, 0):
    return jnp.einsum("bhwm,mn->bhwn", x, kernel[0, 0])
  if tuple(padding) == (0, 0) and (h, w) == (kh, kw):
    return (x.reshape(b, h * w * m) @ kernel.reshape(kh * kw * m, n)).reshape(b, 1, 1, n)
  ph, pw = padding
  return jax.lax.conv_general_dilated(x, kernel, tuple(strides), ((ph, ph), (pw, pw)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@dataclasses.dataclass(frozen=True)
class Pooling:
  """A max pooling over (h, w) after a layer, the ReLU before it included when ``relu``; the window's origin at
  (-top, -left), positions outside the map left out."""
  window: tuple[int, int]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
  relu: bool

  def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
    return tuple((n + lo + hi - w) // s + 1 for n, (lo, hi), w, s in zip(size, self.padding, self.window,
                                                                          self.strides))

  def fits(self, size: tuple[int, int]) -> bool:
    """Whether every window starts inside a map of ``size`` and the sizes are sane."""
    out = self.output_size(size)
    return (all(w >= 1 and s >= 1 and lo >= 0 and hi >= 0 and o >= 1 for w, s, (lo, hi), o in
                zip(self.window, self.strides, self.padding, out))
            and all((o - 1) * s - lo < n for o, s, (lo, _), n in zip(out, self.strides, self.padding, size)))



@dataclasses.dataclass(frozen=True)
class Epilogue:
  """What a layer applies to its outputs as it stores them, in this order: the residual added (``residual``: an
  array shaped as the output, given to :meth:`Backend.apply` beside it), the ReLU (``relu``), the max ``pooling``
  (whose own ``relu`` is the ReLU before it). The interpreter offers one where the exported graph has it
  (:class:`~lcnn_jax.inference.graph.Fusion`); the layer gets it where its backend :meth:`~Backend.fuses` it,
  else the graph runs those steps itself."""
  residual: bool = False
  relu: bool = False
  pooling: Pooling | None = None


Value = tuple[jax.Array, Layout]
"""An activation and the layout it is held in (:data:`lcnn_jax.inference.graph.Value`)."""


class Backend(Protocol):
  """How one lookup layer runs: ``apply(layer, prepare(layer), x, layout)`` -> (output, its layout).

  ``available``, ``input_layout``, ``prepare`` and ``apply`` each backend defines; a class that subclasses this
  protocol inherits the rest: no fusion, no pooling of its own, timed by ``auto`` under its own name.
  """
  name: str
  """The spec that names this backend, e.g. ``dense`` or ``lookup:tile=4096`` (:func:`get_backend`)."""

  def available(self) -> tuple[bool, str]:
    """(True, '') when usable on the default device, else (False, the reason)."""

  def input_layout(self, layer: LookupLayer, batch: int) -> Layout:
    """The layout in which this backend reads ``layer``'s input at ``batch`` without a transpose."""

  def prepare(self, layer: LookupLayer) -> dict[str, np.ndarray]:
    """The arrays ``apply`` needs, in this backend's own layout."""

  def apply(self, layer: LookupLayer, params: dict[str, jax.Array], x: jax.Array, layout: Layout,
            epilogue: Epilogue | None = None, residual: Value | None = None) -> Value:
    """The layer's output and its layout for a 4-D ``x`` in ``layout`` (traceable; ``layer`` is static); with
    an ``epilogue`` that :meth:`fuses` accepts, the output after it (``residual``: the value it adds)."""

  def fuses(self, layer: LookupLayer, batch: int, epilogue: Epilogue) -> bool:
    """Whether :meth:`apply` can apply ``epilogue`` to ``layer``'s output at ``batch`` (decided when the model
    is traced, from static facts)."""
    return False

  def max_pool(self, x: jax.Array, pooling: Pooling) -> jax.Array | None:
    """``pooling`` of a tiled activation (tiles, c, h, w, tile) faster than XLA's window, or None (XLA's)."""
    return None

  def tuned_variants(self) -> list[str]:
    """The specs ``auto`` times for this backend on each layer (none: it is not offered to ``auto`` here)."""
    return [self.name]

  def times(self, layer: LookupLayer, batch: int) -> bool:
    """Whether ``auto`` times this backend on ``layer`` at ``batch`` (False where it would run the layer as
    another of the tuned variants does)."""
    return True

  def timing_key(self) -> tuple[str, ...]:
    """What a cached timing of this backend depends on beyond its name, the device and the layer (a kernel
    build, a size measured on this machine)."""
    return ()

  def network_step(self, layer: LookupLayer) -> int | None:
    """The step (:data:`~lcnn_jax.inference.kernels.STEPS`) that runs ``layer`` inside the C++ kernel's call for
    a whole chain of layers at batch 1 (:mod:`lcnn_jax.inference.chain`), or None where it cannot."""
    return None


def one_pixel(layer: LookupLayer) -> bool:
  """Whether ``layer``'s output is one pixel (a dense layer, written as a convolution over its whole input)."""
  return tuple(layer.output_size) == (1, 1)


class Dense(Backend):
  """The reconstructed kernel W = D·P in one XLA convolution."""
  name = "dense"

  def available(self) -> tuple[bool, str]:
    return True, ""

  def input_layout(self, layer: LookupLayer, batch: int) -> Layout:
    return NHWC

  def prepare(self, layer: LookupLayer) -> dict[str, np.ndarray]:
    return {"kernel": layer.dense_kernel(), "bias": layer.bias}

  def apply(self, layer, params, x, layout):
    x = layouts.convert(x, layout, NHWC)
    return conv_or_matmul(x, params["kernel"], layer.strides, layer.padding) + params["bias"], NHWC


class Gemm(Backend):
  """The reconstructed kernel W = D·P in the C++ kernel's dense convolution (CPU), on CHWN activations.

  The kernel copies each panel of the im2col matrix into a buffer of its thread and multiplies it by W packed
  in tiles of outputs (:func:`~lcnn_jax.inference.kernels.pack_conv_kernel`), in registers over all inputs:
  the dense form of a layer whose lookups lose to any dense form (the accurate AlexNet-LCNN's conv2), without
  leaving the lookups' CHWN layout. On an AMD EPYC Zen 3 (AVX2, two threads) it ran AlexNet-LCNN's conv2-conv5
  at batch 1 at 57-70 G multiply-adds/s; in the accurate model at batch 1 its conv2 took as long as XLA's own
  convolution emitter's (which the tuner also measures) and 9-11% less than XLA's default convolution, and with
  conv3 too the model took 1.5% less; at batch 32 the tuner chose it for that conv3 (47 against 54 ms as
  lookups). A residual and the ReLU are applied as the outputs are stored; a
  pooling after it runs as the ``lookup`` backend's does. A layer whose output is one pixel (a dense layer: a
  matrix-vector product at batch 1, where panels of columns would be mostly empty) runs as under ``dense``, and
  ``auto`` times only ``dense`` on it.
  """
  name = "gemm"

  def available(self) -> tuple[bool, str]:
    return kernel_here()

  def input_layout(self, layer: LookupLayer, batch: int) -> Layout:
    return NHWC if one_pixel(layer) else batch  # CHWN

  def prepare(self, layer: LookupLayer) -> dict[str, np.ndarray]:
    if one_pixel(layer):
      return Dense().prepare(layer)
    return {"packed": kernels.pack_conv_kernel(layer.dense_kernel()), "bias": layer.bias}

  def fuses(self, layer: LookupLayer, batch: int, epilogue: Epilogue) -> bool:
    """A residual and the ReLU, as the outputs of a convolution are stored."""
    return epilogue.pooling is None and not one_pixel(layer)

  def apply(self, layer, params, x, layout, epilogue=None, residual=None):
    batch = layouts.batch_size(x, layout)
    if epilogue is not None and not self.fuses(layer, batch, epilogue):
      raise ValueError(f"The gemm backend cannot apply {epilogue} to this layer's output.")
    if one_pixel(layer):
      return Dense().apply(layer, params, x, layout)
    x = layouts.convert(x, layout, batch)[0]  # (m, h, w, batch)
    residual = None if residual is None else layouts.convert(*residual, batch)[0]  # (n, oh, ow, batch)
    out = kernels.dense_conv(x, params["packed"], params["bias"], kernel_size=layer.kernel_size,
                             padding=layer.padding, strides=layer.strides, output_size=layer.output_size,
                             residual=residual, relu=epilogue is not None and epilogue.relu)
    return out[None], batch

  def max_pool(self, x: jax.Array, pooling: Pooling) -> jax.Array | None:
    return max_pool_chwn(x, pooling)

  def times(self, layer: LookupLayer, batch: int) -> bool:
    """Not on a layer whose output is one pixel, which it runs as ``dense`` does."""
    return not one_pixel(layer)

  def timing_key(self) -> tuple[str, ...]:
    """The kernel build (its hash)."""
    return (kernels.build_id(),)


class Factored(Backend):
  """A 1×1 dictionary convolution, then P as a dense convolution over S."""
  name = "factored"

  def available(self) -> tuple[bool, str]:
    return True, ""

  def input_layout(self, layer: LookupLayer, batch: int) -> Layout:
    return NHWC

  def prepare(self, layer: LookupLayer) -> dict[str, np.ndarray]:
    return {"dictionary": layer.float_dictionary(), "coefficients": layer.coefficients(), "bias": layer.bias}

  def apply(self, layer, params, x, layout):
    ph, pw = layer.padding
    s = jnp.einsum("bhwm,mk->bhwk", layouts.convert(x, layout, NHWC), params["dictionary"])  # (batch, h, w, k)
    s = jnp.pad(s, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    return conv_or_matmul(s, params["coefficients"], layer.strides, (0, 0)) + params["bias"], NHWC


class Gather(Backend):
  """Channels-first row gathers over shifted S, one non-zero slot per step, in plain XLA."""
  name = "gather"

  def available(self) -> tuple[bool, str]:
    return True, ""

  def input_layout(self, layer: LookupLayer, batch: int) -> Layout:
    return batch  # one tile: CHWN

  def prepare(self, layer: LookupLayer) -> dict[str, np.ndarray]:
    offsets, values = layer.slots(flat_s.positions(layer))  # (slots, n): missing non-zeros read S[0] times 0
    return {"dictionary_t": np.ascontiguousarray(layer.float_dictionary().T), "offsets": offsets, "values": values,
            "bias": layer.bias}

  def apply(self, layer, params, x, layout):
    batch = layouts.batch_size(x, layout)
    x = layouts.convert(x, layout, batch)[0]  # (m, h, w, batch)
    g = flat_s.geometry(layer)
    s = flat_s.dictionary_stage(layer, params["dictionary_t"], x)
    wide = g.out_height * g.width * batch  # whole rows, so the result reshapes to (n, oh, W, batch)

    def row(offset):
      return jax.lax.dynamic_slice(s, (offset * batch,), (wide,))

    def step(t, acc):
      return acc + params["values"][t][:, None] * jax.vmap(row)(params["offsets"][t])  # (n, wide)

    acc = jax.lax.fori_loop(0, params["offsets"].shape[0], step, jnp.zeros((layer.out_features, wide), s.dtype))
    y = acc.reshape(layer.out_features, g.out_height, g.width, batch)[:, :, :g.out_width]
    return (y + params["bias"][:, None, None, None])[None], batch

  def max_pool(self, x: jax.Array, pooling: Pooling) -> jax.Array | None:
    """Its CHWN output, pooled as the ``lookup`` backend pools (:func:`max_pool_chwn`)."""
    return max_pool_chwn(x, pooling)


POOLED_MIN_BATCH = kernels.LIMITS.pooled_batch_min
"""From this batch the C++ kernel pools CHWN activations (and a lookup layer pools its output as it computes it):
its innermost loops run over the batch, too short to vectorise below (AlexNet-LCNN's first pooling at batch 1
took 1.0 ms that way, 0.08 ms in XLA). At batch 1 the kernel pools each channel's plane instead
(:func:`max_pool_chwn`); from 2 images to this batch, XLA pools."""

FUSED_DICTIONARY_MACS = kernels.LIMITS.fused_dictionary_macs_max
"""A dictionary of at most this many multiply-adds per pixel (m·k) is applied inside the kernel."""


class Lookup(Backend):
  """The C++ kernel: per output, accumulators in registers over all its non-zeros (CPU).

  The work is cut into tiles whose S stays in this core's L2 (``tile_bytes`` of S, every output of a tile
  reading it): ``lookup`` sizes them from the L2 of the machine it runs on, read when the model loads
  (:func:`~lcnn_jax.inference.machine.tile_budget_bytes`); ``lookup:tile=N`` fixes N bytes, ``lookup:tile=0``
  turns tiling off (a block of wide elements at a time for all outputs).

  A layer whose output is one pixel (a dense layer) at a small batch gathers one element of S per non-zero, from
  anywhere in S: ``lookup:chunk=N`` stores its lookups chunk by chunk of N bytes of S, and every output reads a
  chunk before the next one is touched, so the gathers hit the L1 (N: half of this core's L1 for the tuner,
  :func:`~lcnn_jax.inference.machine.chunk_bytes`). Other layers run as under ``lookup``. The tuner times these
  per layer.

  ``lookup:s=bfloat16`` keeps S, the dictionary responses the lookups read, in bfloat16 rather than float32
  where the kernel makes a copy of it anyway (a layer that pads or strides, or whose dictionary the kernel
  applies itself): half the bytes to write, hold in L2 and read, and the sums accumulated in float32. On a CPU
  with AVX512-BF16 the lookups multiply S in its dot products, and a layer stored in bfloat16 or int8 computes
  its dictionary stage so too (:meth:`dictionary_in_bfloat16`); elsewhere each element of S is widened to
  float32 in registers. S then carries bfloat16's rounding (8 bits of mantissa), so the tuner
  offers it only for layers stored in bfloat16 or int8 (an export that asked for low precision), where it
  competes by measurement; other layers run as under ``lookup``.
  """
  name = "lookup"

  S_PRECISIONS = ("float32", "bfloat16")
  """The precisions S may be kept in (``lookup:s=...``)."""

  def __init__(self, tile_bytes: int | None = None, chunk_bytes: int = 0, s_precision: str = "float32"):
    """``tile_bytes``: the S a tile holds (None: half of this core's L2, 0: no tiles); ``chunk_bytes``: the S a
    chunk of a one-pixel layer's lookups spans (0: none); ``s_precision``: S's precision where the kernel copies
    it (float32 or bfloat16)."""
    if tile_bytes is not None and tile_bytes < 0:
      raise ValueError(f"tile_bytes={tile_bytes}: expected a number of bytes >= 0 (0: no tiling).")
    if chunk_bytes < 0:
      raise ValueError(f"chunk_bytes={chunk_bytes}: expected a number of bytes >= 0 (0: no chunks).")
    if s_precision not in self.S_PRECISIONS:
      raise ValueError(f"backend='lookup:s={s_precision}': expected lookup:s= one of {', '.join(self.S_PRECISIONS)}.")
    self.tile_bytes, self.chunk_bytes, self.s_precision = tile_bytes, chunk_bytes, s_precision
    options = ([f"tile={tile_bytes}"] * (tile_bytes is not None) + [f"chunk={chunk_bytes}"] * (chunk_bytes > 0)
               + [f"s={s_precision}"] * (s_precision != "float32"))
    if options:
      self.name = "lookup:" + ",".join(options)

  @classmethod
  def from_spec(cls, tile: str | None = None, chunk: str | None = None, s: str = "float32") -> "Lookup":
    """The backend of spec ``lookup``, ``lookup:tile=N`` (N bytes of S per tile, 0: none), ``lookup:chunk=N``
    (N bytes of S per chunk of a one-pixel layer's lookups) or ``lookup:s=bfloat16`` (S kept in bfloat16)."""
    for option, value, meaning in (("tile", tile, "the bytes of S a tile holds (0: none)"),
                                   ("chunk", chunk, "the bytes of S a chunk of lookups spans")):
      if value is not None and not value.isdigit():
        raise ValueError(f"backend='lookup:{option}={value}': expected lookup:{option}=N with N {meaning}.")
    return cls(None if tile is None else int(tile), 0 if chunk is None else int(chunk), s)

  def tile(self) -> int:
    """The bytes of S one tile holds on this machine (0: no tiling)."""
    return machine.tile_budget_bytes() if self.tile_bytes is None else self.tile_bytes

  def available(self) -> tuple[bool, str]:
    return kernel_here()

  @staticmethod
  def fused(layer: LookupLayer) -> bool:
    """Whether the kernel computes S itself (a small first-layer dictionary) instead of an XLA matmul."""
    return layer.in_features * layer.dictionary_size <= FUSED_DICTIONARY_MACS

  def chunk(self, layer: LookupLayer) -> int:
    """The elements of S per chunk of ``layer``'s lookups (0: stored output by output): with ``chunk_bytes``,
    for a layer whose output is one pixel and whose dictionary stage is not fused."""
    if self.chunk_bytes <= 0 or not one_pixel(layer) or self.fused(layer):
      return 0
    return max(16, self.chunk_bytes // 4)

  @staticmethod
  def copies_s(layer: LookupLayer) -> bool:
    """Whether the kernel writes ``layer``'s S into a buffer of its own (padded, in space-to-depth layout, or
    computed there from a small dictionary) rather than reading XLA's matmul result in place."""
    return Lookup.fused(layer) or tuple(layer.padding) != (0, 0) or tuple(layer.strides) != (1, 1)

  def s_bfloat16(self, layer: LookupLayer) -> bool:
    """Whether ``layer``'s S is kept in bfloat16 (``lookup:s=bfloat16``, on a layer whose S the kernel copies)."""
    return self.s_precision == "bfloat16" and self.copies_s(layer)

  def dictionary_in_bfloat16(self, layer: LookupLayer) -> bool:
    """Whether the kernel computes ``layer``'s dictionary stage in bfloat16 dot products, at any size: where S is
    kept in bfloat16 (:meth:`s_bfloat16`), D is stored in bfloat16 or int8 (exact in bfloat16), and the CPU has
    AVX512-BF16 (:func:`~lcnn_jax.inference.kernels.kernel_bf16_dot`); a stage of under 32 columns (h·w·batch)
    then stays float32. Elsewhere a large stage is XLA's float32 matmul (on AlexNet-LCNN at batch 32 on an AMD
    EPYC Zen 4, the kernel's bfloat16 stage measured 14–31% faster on the fast point's conv3–conv5 and tied on its
    conv2; 2–20% faster on the accurate point's conv2–conv5)."""
    return (self.s_bfloat16(layer) and not self.fused(layer) and layer.dictionary.dtype != np.float32
            and kernels.kernel_bf16_dot())

  def input_layout(self, layer: LookupLayer, batch: int) -> Layout:
    return NHWC if self.fused(layer) else batch  # NHWC images, or CHWN

  def prepare(self, layer: LookupLayer) -> dict[str, np.ndarray]:
    positions = flat_s.positions(layer)
    outputs = layer.output_of_each_nonzero()
    chunk = self.chunk(layer)
    starts = layer.starts
    if chunk:
      g = flat_s.geometry(layer)
      order, starts = flat_s.by_chunks(positions, outputs, layer.out_features, chunk, g.atoms * g.height * g.width)
    else:
      order = np.lexsort((positions, outputs))  # within each output, visit S in memory order
    positions = positions[order]
    index_dtype = narrowest_index_dtype(int(positions.max(initial=0)) + 1)
    n = layer.out_features
    # The values as stored (float32, bfloat16 or int8), with their scale per output.
    scale = layer.value_scale if layer.value_scale is not None else np.ones(n, np.float32)
    dictionary = layer.float_dictionary()
    arrays = {"dictionary": dictionary, "dictionary_t": np.ascontiguousarray(dictionary.T),
              "starts": starts, "indices": positions.astype(index_dtype), "values": layer.values[order],
              "scale": scale.astype(np.float32), "bias": layer.bias}
    if not self.fused(layer):
      # Dᵀ as stored, for the kernel's dictionary stage over few columns (DICTIONARY_COLUMNS_MAX); larger ones
      # are matmuls in XLA over the float32 Dᵀ above.
      k = layer.dictionary_size
      arrays["dictionary_q"] = np.ascontiguousarray(layer.dictionary.T)  # (k, m)
      arrays["dictionary_scale"] = (layer.dictionary_scale if layer.dictionary_scale is not None
                                    else np.ones(k, np.float32)).astype(np.float32)
    return arrays

  @staticmethod
  def pools(pooling: Pooling, batch: int, layer: LookupLayer) -> bool:
    """Whether the kernel can apply ``pooling`` to ``layer``'s output itself at ``batch`` (vectors over the
    batch: from :data:`POOLED_MIN_BATCH` images)."""
    return (batch >= POOLED_MIN_BATCH and layer.output_size[1] * batch >= kernels.LIMITS.pooled_row_min
            and pooling.fits(layer.output_size))

  def fuses(self, layer: LookupLayer, batch: int, epilogue: Epilogue) -> bool:
    """A residual and the ReLU as the kernel stores the outputs, at any batch; or the ReLU and max pooling
    alone, where :meth:`pools` says so (the pooled map computed in bands of rows, the layer's own output never
    written to memory)."""
    if epilogue.pooling is None:
      return True
    return not epilogue.residual and not epilogue.relu and self.pools(epilogue.pooling, batch, layer)

  def apply(self, layer, params, x, layout, epilogue=None, residual=None):
    g = flat_s.geometry(layer)
    batch = layouts.batch_size(x, layout)
    fused = self.fused(layer)
    copied = self.copies_s(layer)
    if epilogue is not None and not self.fuses(layer, batch, epilogue):
      raise ValueError(f"The lookup kernel cannot apply {epilogue} to this layer's output at batch {batch}.")
    pooling = epilogue.pooling if epilogue is not None else None
    residual = None if residual is None else layouts.convert(*residual, batch)[0]  # (n, oh, ow, batch)
    out_size = pooling.output_size(layer.output_size) if pooling else (g.out_height, g.out_width)
    call = dict(out_shape=(layer.out_features, *out_size, batch), tile_bytes=self.tile(), chunk=self.chunk(layer),
                scratch_size=g.atoms * g.height * g.width * batch if copied else 0, padding=layer.padding,
                strides=layer.strides, output_size=(g.out_height, g.out_width), pooling=pooling,
                residual=residual, relu=epilogue is not None and epilogue.relu, s_bfloat16=self.s_bfloat16(layer))
    lookups = (params["starts"], params["indices"], params["values"], params["scale"], params["bias"])
    if fused:
      nhwc = layout == NHWC
      x = x if nhwc else layouts.convert(x, layout, batch)[0]  # NHWC, or CHWN
      out = kernels.lookup_conv_fused(x, params["dictionary"], lookups, nhwc=nhwc, **call)
    else:
      x = layouts.convert(x, layout, batch)[0]  # (m, h, w, batch)
      m, h, w, _ = x.shape
      columns = h * w * batch
      small = columns <= DICTIONARY_COLUMNS_MAX and columns * m * layer.dictionary_size <= DICTIONARY_MACS_MAX
      if small or self.dictionary_in_bfloat16(layer):
        # The dictionary stage in the same call, from D as stored (in bfloat16 dot products where it may be).
        out = kernels.lookup_conv_dictionary(x, params["dictionary_q"], params["dictionary_scale"], lookups, **call)
      else:
        s = (params["dictionary_t"] @ x.reshape(m, h * w * batch)).reshape(-1, h, w, batch)  # (k, h, w, batch)
        out = kernels.lookup_conv(s, lookups, **call)
    return out[None], batch  # CHWN

  def max_pool(self, x: jax.Array, pooling: Pooling) -> jax.Array | None:
    return max_pool_chwn(x, pooling)

  def tuned_variants(self) -> list[str]:
    """Tiles of this machine's L2 (``lookup``, sized again wherever the model loads), a quarter of that, and no
    tiles; chunks (one-pixel layers); S in bfloat16 with this machine's tiles and without (layers stored in
    bfloat16 or int8, :meth:`times`)."""
    return ["lookup", f"lookup:tile={machine.tile_budget_bytes() // 4}", "lookup:tile=0",
            f"lookup:chunk={machine.chunk_bytes()}", "lookup:s=bfloat16", "lookup:tile=0,s=bfloat16"]

  def times(self, layer: LookupLayer, batch: int) -> bool:
    """Chunks are timed only on the layers they change; S in bfloat16 only where it changes the layer and the
    layer is stored in bfloat16 or int8."""
    if self.s_precision == "bfloat16" and (not self.s_bfloat16(layer) or layer.values.dtype == np.float32):
      return False
    return self.chunk_bytes <= 0 or self.chunk(layer) > 0

  def timing_key(self) -> tuple[str, ...]:
    """The kernel build (its hash) and the tile size on this machine."""
    return kernels.build_id(), f"tile{self.tile()}"

  def network_step(self, layer: LookupLayer) -> int | None:
    if self.chunk(layer) or self.s_bfloat16(layer):
      return None  # the chain's steps read lookups stored output by output, and float32 S
    return kernels.STEPS.step_fused_lookups if self.fused(layer) else kernels.STEPS.step_lookups


def kernel_here() -> tuple[bool, str]:
  """(True, '') where the C++ kernel runs (built for this CPU, the default device a CPU), else (False, why)."""
  if jax.default_backend() != "cpu":
    return False, f"the C++ kernel runs on CPU; the default device is {jax.default_backend()}"
  ok, reason = kernels.kernel_available()
  return ok, "" if ok else reason


def max_pool_chwn(x: jax.Array, pooling: Pooling) -> jax.Array | None:
  """``pooling`` of a CHWN array (1, c, h, w, batch) in the C++ kernel; None where the kernel does not apply (not
  float32 on CPU, a batch from 2 to under :data:`POOLED_MIN_BATCH`, a window not inside the map, or no kernel
  here). XLA's fusion of the same pooling ran 2–3× slower inside AlexNet-LCNN at batch 32 (its input no longer in
  cache); at batch 1, where the kernel pools each channel's plane, the fast AlexNet-LCNN ran 5–10% faster with
  its three poolings here than in XLA (side by side in one process, AMD EPYC Zen 4)."""
  _, _, h, w, batch = x.shape
  if (x.shape[0] != 1 or 1 < batch < POOLED_MIN_BATCH or x.dtype != jnp.float32 or not pooling.fits((h, w))
      or not kernel_here()[0]):
    return None
  return kernels.max_pool(x[0], pooling)[None]


DENSE_ROWS_MAX = kernels.LIMITS.dense_rows_max
"""Up to this many rows (images × pixels), a dense stage with bfloat16 or int8 weights runs in the C++ kernel
(:func:`dense_rows`), which reads the weights as stored: there it is bound by reading them. From more rows on,
the weights' float32 copy goes to XLA's matmul."""


def dense_rows(x: jax.Array, weights: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """x (rows, m) float32 -> (rows, n) = x · (weights · scale)ᵀ + bias in the C++ kernel (CPU), for ``weights``
  (n, m) float32, bfloat16 or int8 as stored, converted in registers, accumulated in float32."""
  return kernels.dense_rows(x, weights, scale, bias)


DICTIONARY_COLUMNS_MAX = 1024
"""Up to this many columns (h·w·batch: AlexNet-LCNN's layers at batch 1), the ``lookup`` backend computes a
layer's dictionary stage in the same kernel call as its lookups (from D as stored) rather than as an XLA matmul,
whose dispatch costs more than such small matmuls take: one call per layer."""
DICTIONARY_MACS_MAX = 1 << 23
"""... and up to this many multiply-adds (AlexNet-LCNN's at batch 1: 1–5 M); larger stages are XLA's matmuls."""


def dense_rows_available() -> bool:
  """Whether :func:`dense_rows` runs here (the C++ kernel on a CPU default device)."""
  return kernel_here()[0]


BACKENDS: dict[str, Callable[..., Backend] | str] = {
    "dense": Dense,
    "gemm": Gemm,
    "factored": Factored,
    "gather": Gather,
    "lookup": Lookup.from_spec,
    "pallas": "lcnn_jax.inference.pallas_lookup:PallasLookup",  # imported when a spec first names it
}
"""The registration of every backend: its name -> what builds it from a spec's options (``name:key=value,...``
passes ``key='value'``), or ``'module:Class'`` for a backend whose module is imported only when a spec names it."""


def available_backends() -> list[str]:
  """The names of the backends usable on the default device."""
  return [name for name in BACKENDS if get_backend(name).available()[0]]


def get_backend(spec: str) -> Backend:
  """The backend a spec names: a name of :data:`BACKENDS`, with options after a colon where its builder takes
  them (``lookup:tile=4096``, see :class:`Lookup`). Raises ValueError naming the choices."""
  name, _, rest = spec.partition(":")
  if name not in BACKENDS:
    raise ValueError(f"backend={spec!r}: expected one of {sorted(BACKENDS)}.")
  options = dict(option.partition("=")[::2] for option in rest.split(",") if option)
  make = BACKENDS[name]
  if isinstance(make, str):
    module, _, attribute = make.partition(":")
    make = getattr(importlib.import_module(module), attribute)
  try:
    inspect.signature(make).bind(**options)
  except TypeError as error:
    raise ValueError(f"backend={spec!r}: {name} does not take these options ({error}).") from None
  return make(**options)


def apply_nhwc(backend: Backend, layer: LookupLayer, params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """Runs ``backend`` on an NHWC input and returns NHWC."""
  y, layout = backend.apply(layer, params, x, NHWC)
  return layouts.convert(y, layout, NHWC)


def coefficient_bytes(layer: LookupLayer) -> int:
  """Bytes of D and the lookups the layer must read once per call (its weight traffic), as stored."""
  scales = sum(a.nbytes for a in (layer.dictionary_scale, layer.value_scale) if a is not None)
  return (layer.dictionary.nbytes + layer.starts.nbytes + layer.indices.nbytes + layer.values.nbytes
          + layer.bias.nbytes + scales)


__all__ = ["BACKENDS", "Backend", "Epilogue", "LookupLayer", "Pooling", "apply_nhwc", "available_backends",
           "coefficient_bytes", "conv_or_matmul", "dense_rows", "get_backend", "kernel_here", "max_pool_chwn",
           "one_pixel"]
