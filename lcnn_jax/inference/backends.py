"""Ways to run one lookup layer at inference, all equal to the convolution with the reconstructed kernel.

A :class:`~lcnn_jax.inference.records.LookupLayer` is a trained lookup convolution ready for inference: its
dictionary D (m, k), the non-zeros of its coefficients P (kh, kw, k, n) grouped per output (the *lookups*,
:mod:`lcnn_jax.lookups`), and its bias, with any BatchNorm after it already folded in. The backends differ in how they compute Y = (X ⊛ D) ⊛ P + bias:

* ``dense``: the reconstructed kernel W = D·P (kh, kw, m, n) in one XLA convolution (or matmul).
* ``factored``: S = X ⊛ D as a 1×1 convolution, then P as a dense kh×kw convolution over S. Two
  tensor-core-friendly XLA ops; the zeros of P still cost.
* ``gather``: S in channels-first layout, then for each non-zero slot one row gather of S shifted to the
  non-zero's tap, scaled and accumulated, in plain XLA (works on any device; the fallback for ``lookup``).
* ``lookup``: the same computation in the C++ kernel of :mod:`lcnn_jax.inference.kernels`, which keeps each
  output's accumulators in registers over all its non-zeros (CPU only).
* ``pallas``: the same gathers in one Pallas kernel per layer (GPU, Triton), registered by
  :mod:`lcnn_jax.inference.pallas_lookup`.

``dense`` and ``factored`` work on NHWC activations; ``gather`` and ``lookup`` return channels-first, batch-last
CHWN activations (:mod:`lcnn_jax.inference.layouts`), the layout in which one non-zero reads a contiguous run
of S: S[atom, y + r, x + c, :] over a whole output row is one run of memory when the output
row is computed over S's full width (the "wide" row whose columns past the output width are dropped). Strided
layers become stride 1 over a space-to-depth view of S: atom (j, r mod s_h, c mod s_w) at tap
(r div s_h, c div s_w). Every backend accepts any layout and transposes what it must; a first layer (a
dictionary of at most 64 multiply-adds per pixel) runs ``lookup`` straight from the NHWC images.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.inference import kernels, layouts, machine
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


class Backend(Protocol):
  """How one lookup layer runs: ``apply(layer, prepare(layer), x, layout)`` -> (output, its layout)."""
  name: str

  def available(self) -> tuple[bool, str]:
    """(True, '') when usable on the default device, else (False, the reason)."""

  def input_layout(self, layer: LookupLayer, batch: int) -> Layout:
    """The layout in which this backend reads ``layer``'s input at ``batch`` without a transpose."""

  def prepare(self, layer: LookupLayer) -> dict[str, np.ndarray]:
    """The arrays ``apply`` needs, in this backend's own layout."""

  def apply(self, layer: LookupLayer, params: dict[str, jax.Array], x: jax.Array,
            layout: Layout) -> tuple[jax.Array, Layout]:
    """The layer's output and its layout for a 4-D ``x`` in ``layout`` (traceable; ``layer`` is static)."""


class Dense:
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


class Factored:
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


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """S after space-to-depth: (atoms, height, width) per example, and the kept output."""
  atoms: int
  height: int
  width: int
  out_height: int
  out_width: int

  def tail(self, batch: int) -> int:
    """Elements to pad S's flat end with so that the gather backend's whole-row reads stay inside it."""
    return (self.width - self.out_width) * batch


def _geometry(layer: LookupLayer) -> _Geometry:
  (hp, wp), (sh, sw) = layer.padded_size, layer.strides
  oh, ow = layer.output_size
  return _Geometry(layer.dictionary_size * sh * sw, -(-hp // sh), -(-wp // sw), oh, ow)


def _s2d_indices(layer: LookupLayer) -> np.ndarray:
  """Each non-zero's position in flat S (space-to-depth view), per example: (atom·H + r)·W + c."""
  sh, sw = layer.strides
  g = _geometry(layer)
  r, c, j = layer.taps_and_atoms()
  atom = (j * sh + r % sh) * sw + c % sw
  return (atom * g.height + r // sh) * g.width + c // sw


def _dictionary_stage_chwn(layer: LookupLayer, dictionary_t: jax.Array, x: jax.Array) -> jax.Array:
  """S of a CHWN input, padded, in space-to-depth layout, flat, with the tail the row reads need."""
  g = _geometry(layer)
  (ph, pw), (sh, sw) = layer.padding, layer.strides
  _, h, w, b = x.shape
  s = jnp.einsum("km,mhwb->khwb", dictionary_t, x)  # (k, h, w, batch)
  s = jnp.pad(s, ((0, 0), (ph, g.height * sh - h - ph), (pw, g.width * sw - w - pw), (0, 0)))
  if (sh, sw) != (1, 1):
    # Strided slices, stacked, run several times faster in XLA on CPU than the equivalent 6-D transpose.
    phases = [s[:, r::sh, c::sw] for r in range(sh) for c in range(sw)]  # each (k, H, W, batch)
    s = jnp.stack(phases, axis=1)  # (k, sh·sw, H, W, batch)
  return jnp.pad(s.reshape(-1), (0, g.tail(b)))  # (atoms·H·W·batch + tail,)


class Gather:
  """Channels-first row gathers over shifted S, one non-zero slot per step, in plain XLA."""
  name = "gather"

  def available(self) -> tuple[bool, str]:
    return True, ""

  def input_layout(self, layer: LookupLayer, batch: int) -> Layout:
    return batch  # one tile: CHWN

  def prepare(self, layer: LookupLayer) -> dict[str, np.ndarray]:
    offsets, values = layer.slots(_s2d_indices(layer))  # (slots, n): missing non-zeros read S[0] times 0
    return {"dictionary_t": np.ascontiguousarray(layer.float_dictionary().T), "offsets": offsets, "values": values,
            "bias": layer.bias}

  def apply(self, layer, params, x, layout):
    batch = layouts.batch_size(x, layout)
    x = layouts.convert(x, layout, batch)[0]  # (m, h, w, batch)
    g = _geometry(layer)
    s = _dictionary_stage_chwn(layer, params["dictionary_t"], x)
    wide = g.out_height * g.width * batch  # whole rows, so the result reshapes to (n, oh, W, batch)

    def row(offset):
      return jax.lax.dynamic_slice(s, (offset * batch,), (wide,))

    def step(t, acc):
      return acc + params["values"][t][:, None] * jax.vmap(row)(params["offsets"][t])  # (n, wide)

    acc = jax.lax.fori_loop(0, params["offsets"].shape[0], step, jnp.zeros((layer.out_features, wide), s.dtype))
    y = acc.reshape(layer.out_features, g.out_height, g.width, batch)[:, :, :g.out_width]
    return (y + params["bias"][:, None, None, None])[None], batch


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


POOLED_MIN_BATCH = kernels.LIMITS.pooled_batch_min
"""From this batch the C++ kernel pools CHWN activations (and a lookup layer pools its output as it computes it):
its innermost loops run over the batch, too short to vectorise below (AlexNet-LCNN's first pooling at batch 1:
1.0 ms in the kernel, 0.08 ms in XLA)."""

FUSED_DICTIONARY_MACS = kernels.LIMITS.fused_dictionary_macs_max
"""A dictionary of at most this many multiply-adds per pixel (m·k) is applied inside the kernel."""


class Lookup:
  """The C++ kernel: per output, accumulators in registers over all its non-zeros (CPU).

  The work is cut into tiles whose S stays in this core's L2 (``tile_bytes`` of S, every output of a tile
  reading it): ``lookup`` sizes them from the L2 of the machine it runs on, read when the model loads
  (:func:`~lcnn_jax.inference.machine.tile_budget_bytes`); ``lookup:tile=N`` fixes N bytes, ``lookup:tile=0``
  turns tiling off (a block of wide elements at a time for all outputs). The tuner times these per layer.
  """
  name = "lookup"

  def __init__(self, tile_bytes: int | None = None):
    """``tile_bytes``: the S a tile holds (None: half of this core's L2, 0: no tiles)."""
    if tile_bytes is not None and tile_bytes < 0:
      raise ValueError(f"tile_bytes={tile_bytes}: expected a number of bytes >= 0 (0: no tiling).")
    self.tile_bytes = tile_bytes
    if tile_bytes is not None:
      self.name = f"{LOOKUP_TILED}{tile_bytes}"

  def tile(self) -> int:
    """The bytes of S one tile holds on this machine (0: no tiling)."""
    return machine.tile_budget_bytes() if self.tile_bytes is None else self.tile_bytes

  def available(self) -> tuple[bool, str]:
    if jax.default_backend() != "cpu":
      return False, f"the C++ kernel runs on CPU; the default device is {jax.default_backend()}"
    ok, reason = kernels.kernel_available()
    return ok, "" if ok else reason

  @staticmethod
  def fused(layer: LookupLayer) -> bool:
    """Whether the kernel computes S itself (a small first-layer dictionary) instead of an XLA matmul."""
    return layer.in_features * layer.dictionary_size <= FUSED_DICTIONARY_MACS

  def input_layout(self, layer: LookupLayer, batch: int) -> Layout:
    return NHWC if self.fused(layer) else batch  # NHWC images, or CHWN

  def prepare(self, layer: LookupLayer) -> dict[str, np.ndarray]:
    positions = _s2d_indices(layer)
    # Within each output, visit S in memory order.
    order = np.lexsort((positions, layer.output_of_each_nonzero()))
    positions = positions[order]
    index_dtype = narrowest_index_dtype(int(positions.max(initial=0)) + 1)
    n = layer.out_features
    # The values as stored (float32, bfloat16 or int8), with their scale per output.
    scale = layer.value_scale if layer.value_scale is not None else np.ones(n, np.float32)
    dictionary = layer.float_dictionary()
    arrays = {"dictionary": dictionary, "dictionary_t": np.ascontiguousarray(dictionary.T),
              "starts": layer.starts, "indices": positions.astype(index_dtype), "values": layer.values[order],
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
  def pools(pooling: "Pooling", batch: int, layer: LookupLayer) -> bool:
    """Whether the kernel can apply ``pooling`` to ``layer``'s output itself at ``batch`` (vectors over the
    batch: from :data:`POOLED_MIN_BATCH` images)."""
    return (batch >= POOLED_MIN_BATCH and layer.output_size[1] * batch >= kernels.LIMITS.pooled_row_min
            and pooling.fits(layer.output_size))

  def apply(self, layer, params, x, layout, pooling: "Pooling | None" = None, residual: jax.Array | None = None,
            relu: bool = False):
    """As :meth:`Backend.apply`; with ``pooling`` (see :meth:`pools`), the output is the pooled map, computed
    without writing the layer's own output to memory. Without pooling, ``residual`` (CHWN, shaped as the
    output) is added to the outputs and ``relu`` applied as the kernel stores them."""
    g = _geometry(layer)
    batch = layouts.batch_size(x, layout)
    (ph, pw), (sh, sw) = layer.padding, layer.strides
    fused = self.fused(layer)
    copied = fused or (ph, pw, sh, sw) != (0, 0, 1, 1)
    if pooling is not None and not self.pools(pooling, batch, layer):
      raise ValueError(f"The lookup kernel cannot pool this layer's output ({pooling}, batch {batch}).")
    out_size = pooling.output_size(layer.output_size) if pooling else (g.out_height, g.out_width)
    call = dict(out_shape=(layer.out_features, *out_size, batch), tile_bytes=self.tile(),
                scratch_size=g.atoms * g.height * g.width * batch if copied else 0, padding=layer.padding,
                strides=layer.strides, output_size=(g.out_height, g.out_width), pooling=pooling,
                residual=residual, relu=relu)
    lookups = (params["starts"], params["indices"], params["values"], params["scale"], params["bias"])
    if fused:
      nhwc = layout == NHWC
      x = x if nhwc else layouts.convert(x, layout, batch)[0]  # NHWC, or CHWN
      out = kernels.lookup_conv_fused(x, params["dictionary"], lookups, nhwc=nhwc, **call)
    else:
      x = layouts.convert(x, layout, batch)[0]  # (m, h, w, batch)
      m, h, w, _ = x.shape
      columns = h * w * batch
      if columns <= DICTIONARY_COLUMNS_MAX and columns * m * layer.dictionary_size <= DICTIONARY_MACS_MAX:
        # The dictionary stage in the same call, from D as stored.
        out = kernels.lookup_conv_dictionary(x, params["dictionary_q"], params["dictionary_scale"], lookups, **call)
      else:
        s = (params["dictionary_t"] @ x.reshape(m, h * w * batch)).reshape(-1, h, w, batch)  # (k, h, w, batch)
        out = kernels.lookup_conv(s, lookups, **call)
    return out[None], batch  # CHWN


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
  return jax.default_backend() == "cpu" and kernels.kernel_available()[0]


BACKENDS: dict[str, Backend] = {b.name: b for b in (Dense(), Factored(), Gather(), Lookup())}
"""Every backend by name."""
LOOKUP_TILED = "lookup:tile="
"""``lookup:tile=N``: the ``lookup`` backend with tiles of N bytes of S (0: none), as the tuner may choose."""


def available_backends() -> list[str]:
  """The names of the backends usable on the default device."""
  return [name for name, backend in BACKENDS.items() if backend.available()[0]]


def get_backend(name: str) -> Backend:
  """The backend called ``name`` (``lookup:tile=N`` too, see :class:`Lookup`); raises ValueError naming the
  choices."""
  if name.startswith(LOOKUP_TILED):
    size = name[len(LOOKUP_TILED):]
    if not size.isdigit():
      raise ValueError(f"backend={name!r}: expected {LOOKUP_TILED}N with N the bytes of S a tile holds (0: none).")
    return Lookup(int(size))
  if name not in BACKENDS:
    raise ValueError(f"backend={name!r}: expected one of {sorted(BACKENDS)}.")
  return BACKENDS[name]


def apply_nhwc(backend: Backend, layer: LookupLayer, params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """Runs ``backend`` on an NHWC input and returns NHWC."""
  y, layout = backend.apply(layer, params, x, NHWC)
  return layouts.convert(y, layout, NHWC)


def coefficient_bytes(layer: LookupLayer) -> int:
  """Bytes of D and the lookups the layer must read once per call (its weight traffic), as stored."""
  scales = sum(a.nbytes for a in (layer.dictionary_scale, layer.value_scale) if a is not None)
  return (layer.dictionary.nbytes + layer.starts.nbytes + layer.indices.nbytes + layer.values.nbytes
          + layer.bias.nbytes + scales)


__all__ = ["BACKENDS", "Backend", "LookupLayer", "Pooling", "apply_nhwc", "available_backends",
           "coefficient_bytes", "conv_or_matmul", "dense_rows", "get_backend"]
