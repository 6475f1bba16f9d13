"""The ``pallas`` backend: the lookups of a layer as one Pallas kernel for GPUs (Triton lowering).

The layer's S is computed as in the ``gather`` backend (:mod:`lcnn_jax.inference.flat_s`): channels first,
batch last, strided layers as stride 1 over a space-to-depth view, flat, so that one non-zero of output o at
position p reads the contiguous run S[p·batch : p·batch + wide] of a whole ("wide") output row block. The kernel
then computes, for a block of outputs × a block of those columns,

    acc[o, col] = Σ_t values[t, o] · S[offsets[t, o]·batch + col]   (t over output o's non-zeros)

in float32 registers, adds the bias and writes the block once. Each step of the loop over t is one gather whose
rows are contiguous runs of S (coalesced on a GPU); its indices are computed from two small vectors loaded per
step, so no index tensor the size of the output exists. Outputs are sorted by their number of non-zeros, so
the outputs of a block have nearly the same count, and each block loops only to its own largest count (a
per-block trip count) instead of the layer's: padding slots cost nothing but the rest of their block's loop.

Block shapes are powers of two (the Triton lowering's rule); S is padded so that every read of a block stays
inside it. S and the output are in the input's dtype (float32 or bfloat16); coefficients, bias and the
accumulation are float32.

On a GPU the kernel compiles through Triton; elsewhere it runs only in Pallas interpret mode, which is for
tests: the backend is available on GPUs, or anywhere when ``LCNN_JAX_PALLAS_INTERPRET=1`` (interpreted, slow),
and it offers itself to ``auto`` on GPUs only (:meth:`PallasLookup.tuned_variants`). The runtime imports this
module (and Pallas) only when a backend spec names ``pallas`` (:data:`lcnn_jax.inference.backends.BACKENDS`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from lcnn_jax.inference import flat_s, layouts
from lcnn_jax.inference.backends import Backend
from lcnn_jax.inference.records import LookupLayer

INTERPRET_ENV = "LCNN_JAX_PALLAS_INTERPRET"
"""Set to 1 to make the backend available off GPUs, in Pallas interpret mode (tests, smoke checks)."""

GROUP = 16
"""Outputs per group whose largest non-zero count :meth:`PallasLookup.prepare` records; a kernel block holds
whole groups."""

MAX_OUTPUTS_PER_BLOCK = 128
"""The most outputs a kernel block holds; outputs are padded to a multiple of it."""

BLOCK_ELEMENTS = 2048
"""The most accumulators per kernel block (outputs × columns): 16 float32 registers per thread of a program
of :data:`NUM_WARPS` warps."""

MAX_COLUMNS_PER_BLOCK = 256
"""The most columns a kernel block holds (a row of the block: one contiguous read of S per non-zero)."""

TARGET_PROGRAMS = 256
"""Blocks are made smaller (down to :data:`GROUP` outputs) until the grid has about this many programs, two per
streaming multiprocessor of a large GPU, so that small layers and batch 1 still fill the device."""

NUM_WARPS = 4
"""Warps per program (128 threads)."""


def interpreted() -> bool:
  """Whether the kernel runs in Pallas interpret mode here (anywhere but a GPU)."""
  return jax.default_backend() != "gpu"


def _floor_power_of_2(n: int) -> int:
  return 1 << max(int(n), 1).bit_length() - 1


def block_shape(outputs: int, columns: int) -> tuple[int, int]:
  """(outputs, columns) of one kernel block for ``outputs`` outputs of ``columns`` columns each: powers of two
  (the Triton lowering's rule), columns first (the coalesced axis), at most :data:`BLOCK_ELEMENTS` accumulators,
  and blocks small enough to give about :data:`TARGET_PROGRAMS` programs."""
  block_columns = min(MAX_COLUMNS_PER_BLOCK, pl.next_power_of_2(columns))
  column_blocks = -(-columns // block_columns)
  by_programs = _floor_power_of_2(outputs * column_blocks // TARGET_PROGRAMS)
  block_outputs = max(GROUP, min(MAX_OUTPUTS_PER_BLOCK, BLOCK_ELEMENTS // block_columns, by_programs))
  return block_outputs, block_columns


def _lookup_kernel(trips_ref, offsets_ref, values_ref, bias_ref, s_ref, out_ref, *, batch: int,
                   block_columns: int):
  """One block: out[o, col] = bias[o] + Σ_t values[t, o] · S[offsets[t, o]·batch + col]."""
  first_column = pl.program_id(1) * block_columns
  columns = first_column + jax.lax.broadcasted_iota(jnp.int32, (1, block_columns), 1)  # (1, block_columns)

  def step(t, acc):
    offsets = offsets_ref[t, :]  # (block_outputs,) int32
    values = values_ref[t, :]  # (block_outputs,) float32
    rows = s_ref[offsets[:, None] * batch + columns]  # (block_outputs, block_columns), each row contiguous
    return acc + values[:, None] * rows.astype(jnp.float32)

  acc = jax.lax.fori_loop(0, trips_ref[0], step, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = (acc + bias_ref[...][:, None]).astype(out_ref.dtype)


def lookup_rows(s: jax.Array, offsets: jax.Array, values: jax.Array, bias: jax.Array, trips: jax.Array, *,
                batch: int, columns: int, interpret: bool | None = None) -> jax.Array:
  """The kernel over all blocks: acc[o, col] for ``columns`` wide columns of every (padded, sorted) output.

  Args:
    s: flat S (length L), in the dtype of the result; reads up to offsets·batch + columns rounded up to the block
      must stay inside it (:func:`padded_length`).
    offsets: (slots, outputs) int32 per-example positions in S of each output's non-zeros, 0 past its count.
    values: (slots, outputs) float32 coefficients, 0 past each output's count.
    bias: (outputs,) float32.
    trips: (outputs / GROUP,) int32 the largest count of each group of :data:`GROUP` outputs.
    batch: images per call (the stride of one position in S).
    columns: wide columns per output.
    interpret: Pallas interpret mode (default: anywhere but a GPU).
  Returns:
    (outputs, columns rounded up to the column block) in ``s.dtype``.
  """
  if s.shape[0] > np.iinfo(np.int32).max:
    raise ValueError(f"S has {s.shape[0]:,} elements, past the kernel's int32 positions (2^31 - 1): run the layer "
                     f"at a smaller batch than {batch}.")
  outputs = offsets.shape[1]
  block_outputs, block_columns = block_shape(outputs, columns)
  if outputs % block_outputs:
    raise ValueError(f"{outputs} outputs are not a multiple of the block of {block_outputs}: pad them.")
  # A block's trip count is the largest of its groups'.
  trips = trips.reshape(outputs // block_outputs, block_outputs // GROUP).max(axis=1)  # (blocks,)
  column_blocks = -(-columns // block_columns)
  kernel = functools.partial(_lookup_kernel, batch=batch, block_columns=block_columns)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((outputs, column_blocks * block_columns), s.dtype),
      grid=(outputs // block_outputs, column_blocks),
      in_specs=[pl.BlockSpec((1,), lambda i, j: (i,)),
                pl.BlockSpec((offsets.shape[0], block_outputs), lambda i, j: (0, i)),
                pl.BlockSpec((values.shape[0], block_outputs), lambda i, j: (0, i)),
                pl.BlockSpec((block_outputs,), lambda i, j: (i,)),
                pl.BlockSpec(s.shape, lambda i, j: (0,))],
      out_specs=pl.BlockSpec((block_outputs, block_columns), lambda i, j: (i, j)),
      compiler_params=pl_triton.CompilerParams(num_warps=NUM_WARPS),  # Triton, not the Mosaic GPU default
      interpret=interpreted() if interpret is None else interpret,
  )(trips, offsets, values, bias, s)


def wide_columns(layer: LookupLayer, batch: int) -> int:
  """Columns computed per output: whole rows of S's width (oh·W·batch), or only the kept ow·batch when the output
  is one row (dense layers, fc6)."""
  g = flat_s.geometry(layer)
  return g.out_width * batch if g.out_height == 1 else g.out_height * g.width * batch


def padded_length(layer: LookupLayer, batch: int) -> int:
  """The length flat S must have so that every block's reads stay inside it."""
  g = flat_s.geometry(layer)
  wide = wide_columns(layer, batch)
  _, block_columns = block_shape(layer.out_features, wide)
  return g.atoms * g.height * g.width * batch + g.tail(batch) + (-wide) % block_columns


class PallasLookup(Backend):
  """Lookups in one Pallas kernel per layer (GPU, Triton): per block of outputs × output columns, float32
  accumulators over every non-zero, each read a coalesced run of S."""
  name = "pallas"

  def __init__(self, interpret: bool | None = None):
    """``interpret``: Pallas interpret mode, or compiled (for Triton) even off a GPU, which only lowers; None:
    interpreted anywhere but a GPU."""
    self.interpret = interpret

  def available(self) -> tuple[bool, str]:
    if not interpreted():
      return True, ""
    if os.environ.get(INTERPRET_ENV) == "1":
      return True, ""
    return False, (f"the Pallas lookup kernel compiles for GPUs; on {jax.default_backend()} it only runs "
                   f"interpreted (set {INTERPRET_ENV}=1 to allow that, for tests)")

  def input_layout(self, layer: LookupLayer, batch: int) -> layouts.Layout:
    return batch  # CHWN

  def prepare(self, layer: LookupLayer) -> dict[str, np.ndarray]:
    counts = np.diff(layer.starts)
    order = np.argsort(-counts, kind="stable")  # kernel row r computes output order[r]
    n = layer.out_features
    padded = -(-n // MAX_OUTPUTS_PER_BLOCK) * MAX_OUTPUTS_PER_BLOCK
    slots = max(int(counts.max(initial=0)), 1)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    column = np.arange(layer.nnz) - np.repeat(layer.starts[:-1], counts)  # t of each non-zero in its output
    rows = rank[layer.output_of_each_nonzero()]
    offsets = np.zeros((slots, padded), np.int32)
    values = np.zeros((slots, padded), np.float32)
    offsets[column, rows] = flat_s.positions(layer)
    values[column, rows] = layer.float_values()  # int8 values scaled back per output
    sorted_counts = np.zeros(padded, np.int32)
    sorted_counts[:n] = counts[order]
    bias = np.zeros(padded, np.float32)
    bias[:n] = layer.bias[order]
    return {"dictionary_t": np.ascontiguousarray(layer.float_dictionary().T), "offsets": offsets, "values": values,
            "bias": bias, "trips": sorted_counts.reshape(-1, GROUP).max(axis=1),
            "rank": rank.astype(np.int32)}

  def tuned_variants(self) -> list[str]:
    """Offered to ``auto`` on GPUs only: elsewhere it runs interpreted."""
    return [] if interpreted() else [self.name]

  def apply(self, layer, params, x, layout):
    batch = layouts.batch_size(x, layout)
    x = layouts.convert(x, layout, batch)[0]  # (m, h, w, batch)
    g = flat_s.geometry(layer)
    s = flat_s.dictionary_stage(layer, params["dictionary_t"].astype(x.dtype), x)  # flat
    s = jnp.pad(s, (0, padded_length(layer, batch) - s.shape[0]))
    wide = wide_columns(layer, batch)
    acc = lookup_rows(s, params["offsets"], params["values"], params["bias"], params["trips"], batch=batch,
                      columns=wide, interpret=self.interpret)  # (padded outputs, columns), sorted by count
    y = jnp.take(acc[:, :wide], params["rank"], axis=0)  # (n, wide) in output order
    y = y.reshape(layer.out_features, g.out_height, wide // (g.out_height * batch), batch)[:, :, :g.out_width]
    return y[None], batch

