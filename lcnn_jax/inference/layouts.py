"""How a 4-D activation is held in memory while an exported model runs.

A layout is either ``NHWC`` (the array as the model sees it, (batch, h, w, c)) or a *tile size* t, an int:
the array (batch / t, c, h, w, t), channels first with the batch cut into tiles of t images kept innermost.
t = batch is CHWN, the lookup backends' layout (one non-zero of P then reads a contiguous run of S), and
t = 1 is NCHW.

Element-wise operations, pooling windows and reductions over h, w or c run on a tiled array directly
(:func:`physical_axis` maps a logical axis); anything else converts to NHWC first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NHWC = "nhwc"
Layout = str | int

_TILED_FROM_SPLIT = (0, 4, 2, 3, 1)
"""(tiles, t, h, w, c) <-> (tiles, c, h, w, t): a transpose that is its own inverse."""


def convert(x: jax.Array, layout: Layout, wanted: Layout) -> jax.Array:
  """A 4-D activation held in ``layout``, held in ``wanted`` instead."""
  if layout == wanted:
    return x
  if layout == NHWC:
    batch, h, w, c = x.shape
    return jnp.transpose(x.reshape(batch // wanted, wanted, h, w, c), _TILED_FROM_SPLIT)
  tiles, c, h, w, tile = x.shape
  nhwc = jnp.transpose(x, _TILED_FROM_SPLIT).reshape(tiles * tile, h, w, c)
  return nhwc if wanted == NHWC else convert(nhwc, NHWC, wanted)


def batch_size(x: jax.Array, layout: Layout) -> int:
  """The number of images in ``x``."""
  return x.shape[0] if layout == NHWC else x.shape[0] * x.shape[-1]


def logical_shape(x: jax.Array, layout: Layout) -> tuple[int, int, int, int]:
  """(batch, h, w, c) of ``x``."""
  if layout == NHWC:
    return tuple(x.shape)
  tiles, c, h, w, tile = x.shape
  return tiles * tile, h, w, c


def physical_axis(logical: int) -> int:
  """The axis of a tiled array holding logical axis 1, 2 or 3 (h, w, c); the batch is split over 0 and 4."""
  return {1: 2, 2: 3, 3: 1}[logical]

