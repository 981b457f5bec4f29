"""In which layout a tensor holds the heads attention reads: pure numpy, for both front-ends.

Attention reads q, k and v as [batch, heads, length, size] ("heads first"), but graphs keep
them in many layouts before that: [B, L, H*D] from a projection, [B, L, H, D] after a split,
[B, H, L, D] after rotary embeddings or from a KV cache, [B*H, L, D] in 3-D attention, and
k transposed as [B, H, D, L] or [B*H, D, L] (BLOOM's key cache). k and v may hold fewer heads
G than the H of q (grouped-query and multi-query attention), each repeated H / G times in a
row before the product, and q or k may be multiplied by a constant on the way (a split scale).

A tensor holds the heads in a layout when, read so, repeated and multiplied by one factor, it
equals what attention reads on every run; the factor is measured, not read from the graph.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnfuse.core.text_enum import TextEnum
from attnfuse.core.tolerance import tolerance


class Layout(TextEnum):
    """How a tensor lays out batch B, length L, G heads of size D."""

    TOKENS = "B,L,G*D"  # a projection's output: what fused attention ops take
    TOKENS_HEADS = "B,L,G,D"
    HEADS_FIRST = "B,G,L,D"
    HEADS_FIRST_T = "B,G,D,L"
    FLAT_HEADS = "B*G,L,D"
    FLAT_HEADS_T = "B*G,D,L"


@dataclass(frozen=True)
class HeadsReading:
    layout: Layout
    heads: int  # G, the heads the tensor holds: attention repeats each H / G times
    factor: float  # attention reads the tensor times this (1.0: as it is)


def heads_first(x: np.ndarray, layout: Layout, batch: int, length: int, size: int) -> np.ndarray | None:
    """x as [B, G, L, D] if its shape fits `layout` for that batch, length and head size, else None."""
    if layout is Layout.TOKENS and x.ndim == 3 and x.shape[:2] == (batch, length) and x.shape[2] % size == 0:
        return x.reshape(batch, length, -1, size).transpose(0, 2, 1, 3)
    if layout is Layout.TOKENS_HEADS and x.ndim == 4 and x.shape[:2] == (batch, length) and x.shape[3] == size:
        return x.transpose(0, 2, 1, 3)
    if layout is Layout.HEADS_FIRST and x.ndim == 4 and x.shape[0] == batch and x.shape[2:] == (length, size):
        return x
    if layout is Layout.HEADS_FIRST_T and x.ndim == 4 and x.shape[0] == batch and x.shape[2:] == (size, length):
        return x.transpose(0, 1, 3, 2)
    if layout is Layout.FLAT_HEADS and x.ndim == 3 and x.shape[0] % batch == 0 and x.shape[1:] == (length, size):
        return x.reshape(batch, -1, length, size)
    if layout is Layout.FLAT_HEADS_T and x.ndim == 3 and x.shape[0] % batch == 0 and x.shape[1:] == (size, length):
        return x.reshape(batch, -1, size, length).transpose(0, 1, 3, 2)
    return None


def read_heads(xs: Sequence[np.ndarray], wanted: Sequence[np.ndarray]) -> HeadsReading | None:
    """The first layout in which xs[run] holds wanted[run] ([B, H, L, D], what attention reads) on
    every run, with the same number of heads and the same factor; None if there is none."""
    for layout in Layout:
        found = [_reading(x, want, layout) for x, want in zip(xs, wanted)]
        if not found or any(f is None for f in found) or len({heads for heads, _ in found}) != 1:
            continue
        factors = [factor for _, factor in found if factor is not None]
        factor = factors[0] if factors else 1.0
        if all(abs(f - factor) <= _tolerance(wanted[0]) * abs(factor) for f in factors):
            return HeadsReading(layout, found[0][0], _snapped(factor, wanted[0]))
    return None


def repeat_heads(x: np.ndarray, heads: int) -> np.ndarray:
    """[B, G, L, D] with each head repeated in a row up to `heads`: [B, heads, L, D]."""
    return np.repeat(x, heads // x.shape[1], axis=1) if x.shape[1] != heads else x


def _reading(x: np.ndarray, want: np.ndarray, layout: Layout) -> tuple[int, float | None] | None:
    """(G, the factor) if x read in `layout` and repeated is want times one factor (None for an
    empty tensor, which any factor fits)."""
    if not np.issubdtype(np.asarray(x).dtype, np.floating) and x.dtype.name != "bfloat16":
        return None
    batch, total, length, size = want.shape
    split = heads_first(x, layout, batch, length, size)
    if split is None or split.shape[1] == 0 or total % split.shape[1]:
        return None
    read = repeat_heads(split, total).astype(np.float64)
    target = want.astype(np.float64)
    if target.size == 0:
        return split.shape[1], None
    norm = float((read * read).sum())
    factor = float((read * target).sum()) / norm if norm else 1.0
    scale = max(float(np.abs(target).max()), 1e-30)
    if float(np.abs(factor * read - target).max()) > _tolerance(want) * scale:
        return None
    return split.shape[1], factor


def _tolerance(want: np.ndarray) -> float:
    """A tenth of what a proof allows in the dtype: a wrong layout is off by the values themselves, and
    a constant multiplied on the way is off by one rounding."""
    return tolerance(want.dtype) / 10


def _snapped(factor: float, want: np.ndarray) -> float:
    return 1.0 if abs(factor - 1.0) <= _tolerance(want) else factor
