"""S, the dictionary stage of a lookup layer, as the gathering backends read it: flat, channels first, batch last.

For each example S[atom, y, x] = Σ_m D[m, atom] · X[m, y, x] over the padded input. Held as (atoms, H, W, batch)
and flattened, one non-zero of P at per-example position p reads the contiguous run S[p·batch : p·batch + wide]
of a whole ("wide") output row, whose columns past the output width are dropped. Strided layers become stride 1
over a space-to-depth view of S: atom (j, r mod s_h, c mod s_w) at tap (r div s_h, c div s_w). The ``gather``
and ``lookup`` backends (:mod:`lcnn_jax.inference.backends`) and the ``pallas`` one
(:mod:`lcnn_jax.inference.pallas_lookup`) share this layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.inference.records import LookupLayer


@dataclasses.dataclass(frozen=True)
class Geometry:
  """S after space-to-depth: (atoms, height, width) per example, and the kept output."""
  atoms: int
  height: int
  width: int
  out_height: int
  out_width: int

  def tail(self, batch: int) -> int:
    """Elements to pad S's flat end with so that whole-row reads stay inside it."""
    return (self.width - self.out_width) * batch


def geometry(layer: LookupLayer) -> Geometry:
  """The shape of ``layer``'s S in the space-to-depth view, and its output's."""
  (hp, wp), (sh, sw) = layer.padded_size, layer.strides
  oh, ow = layer.output_size
  return Geometry(layer.dictionary_size * sh * sw, -(-hp // sh), -(-wp // sw), oh, ow)


def positions(layer: LookupLayer) -> np.ndarray:
  """Each non-zero's position in flat S (space-to-depth view), per example: (atom·H + r)·W + c."""
  sh, sw = layer.strides
  g = geometry(layer)
  r, c, j = layer.taps_and_atoms()
  atom = (j * sh + r % sh) * sw + c % sw
  return (atom * g.height + r // sh) * g.width + c // sw


def by_chunks(positions: np.ndarray, outputs: np.ndarray, n: int, chunk: int, span: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """The non-zeros stored chunk by chunk of S: ``chunk`` elements per chunk, within a chunk output by output,
  within an output in memory order.

  Args:
    positions: each non-zero's position in flat S (:func:`positions`).
    outputs: each non-zero's output.
    n: the outputs.
    chunk: elements of S per chunk (> 0).
    span: the elements of S per example (atoms·H·W of :func:`geometry`): ⌈span / chunk⌉ chunks, as the kernel
      counts them.
  Returns:
    (order, starts): the non-zeros' order (indices into ``positions``), and starts (chunks·n + 1,) int32 with the
    non-zeros of output o in chunk c at [starts[c·n + o], starts[c·n + o + 1]) of that order.
  """
  if chunk <= 0:
    raise ValueError(f"chunk={chunk}: expected the elements of S per chunk, > 0.")
  chunk_of = positions.astype(np.int64) // chunk
  chunks = -(-span // chunk)
  order = np.lexsort((positions, outputs, chunk_of))
  counts = np.bincount(chunk_of * n + outputs, minlength=chunks * n)
  starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
  return order, starts


def dictionary_stage(layer: LookupLayer, dictionary_t: jax.Array, x: jax.Array) -> jax.Array:
  """S of a CHWN input x (m, h, w, batch) with Dᵀ (k, m): padded, in space-to-depth layout, flat, with the tail
  the row reads need."""
  g = geometry(layer)
  (ph, pw), (sh, sw) = layer.padding, layer.strides
  _, h, w, b = x.shape
  s = jnp.einsum("km,mhwb->khwb", dictionary_t, x)  # (k, h, w, batch)
  s = jnp.pad(s, ((0, 0), (ph, g.height * sh - h - ph), (pw, g.width * sw - w - pw), (0, 0)))
  if (sh, sw) != (1, 1):
    # Strided slices, stacked, run several times faster in XLA on CPU than the equivalent 6-D transpose.
    phases = [s[:, r::sh, c::sw] for r in range(sh) for c in range(sw)]  # each (k, H, W, batch)
    s = jnp.stack(phases, axis=1)  # (k, sh·sw, H, W, batch)
  return jnp.pad(s.reshape(-1), (0, g.tail(b)))  # (atoms·H·W·batch + tail,)


__all__ = ["Geometry", "by_chunks", "dictionary_stage", "geometry", "positions"]
