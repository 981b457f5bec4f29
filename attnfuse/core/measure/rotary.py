"""Which rotary embedding a region computes, told from its values on random points.

    y = x * cos + rotate(x) * sin    on the first rd entries of each head (the rest passes)

with rotate the rotate-half (-x2, x1) or the interleaved (-x1, x0, -x3, x2, ...) form. A region
that reads x and multiplies it by two tensors is evaluated on random x with the two tensors the
graph gives it, and the result is compared with kernels/reference.py's rotary in each form: the
head layout of x ([B, H, S, D], [B, S, H, D], or [B, S, H*D] for each head size), which tensor is
the cos, which entries of a cos row are the angles (the first half of a row written for
rotate-half, the even entries of one written for interleaved pairs, or all of it), rotate-half or
interleaved. The form it equals is what the fused op is written in.
"""
from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from attnfuse.core import tolerance
from attnfuse.kernels import reference


class Rows(enum.Enum):
    """Which entries of a cos (or sin) row are the rd / 2 angles the fused op takes."""

    HALF = "first half"  # a row written for rotate-half: the angles twice, one run after the other
    EVEN = "even entries"  # a row written for interleaved pairs: each angle twice in a row
    WHOLE = "whole"  # a row of rd / 2 angles

    def pick(self, width: int) -> slice:
        """The angles' entries of a row `width` long."""
        return {Rows.HALF: slice(0, width // 2, 1), Rows.EVEN: slice(0, width, 2),
                Rows.WHOLE: slice(0, width, 1)}[self]


@dataclass(frozen=True)
class Layout:
    """How x holds its heads: [B, H, S, D] (token axis 2), [B, S, H, D] (token axis 1) or [B, S, H*D] (rank 3)."""

    token_axis: int
    heads: int
    head_size: int
    rank: int

    @property
    def heads_first(self) -> bool:
        return self.rank == 4 and self.token_axis == 2

    def to_bshd(self, x: np.ndarray) -> np.ndarray:
        if self.rank == 3:
            return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_size)
        return x.transpose(0, 2, 1, 3) if self.heads_first else x

    def from_bshd(self, x: np.ndarray) -> np.ndarray:
        if self.rank == 3:
            return x.reshape(x.shape[0], x.shape[1], -1)
        return x.transpose(0, 2, 1, 3) if self.heads_first else x


@dataclass(frozen=True)
class RotaryForm:
    """What a rotary region computes, in the fused op's terms."""

    layout: Layout
    swapped: bool  # the second of the two tensors is the cos
    rows: Rows
    width: int  # rd: the rotated entries of each head
    interleaved: bool
    batch_shared: bool  # one cos row per position, shared by the rows of the batch


def floating(array: np.ndarray | None) -> bool:
    return array is not None and (array.dtype.kind == "f" or array.dtype.name == "bfloat16")


def cos_and_sin(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two tensors look like a cos and a sin of the same angles: cos^2 + sin^2 the same
    everywhere (a scale such as YaRN's allowed)."""
    if not (floating(a) and floating(b)) or a.shape != b.shape or not a.size:
        return False
    total = a.astype(np.float64) ** 2 + b.astype(np.float64) ** 2
    return float(total.mean()) > 0 and bool(np.allclose(total, total.mean(), rtol=1e-3))


def find(x: np.ndarray, got: np.ndarray, first: np.ndarray, second: np.ndarray) -> RotaryForm | None:
    """The form in which `got` is the rotary of `x` by the two tensors, to the tolerance of x's
    dtype; None if there is none."""
    batch = x.shape[0]
    for layout in layouts(x.shape):
        tokens = x.shape[layout.token_axis]
        for swapped in (False, True):
            cos, sin = (second, first) if swapped else (first, second)
            for rows in Rows:
                found = token_rows(cos, sin, rows, batch, tokens)
                if found is None or 2 * found[0].shape[-1] > layout.head_size:
                    continue
                cos_rows, sin_rows, batch_shared = found
                for interleaved in (False, True):
                    expected = rotate(x, layout, cos_rows, sin_rows, interleaved)
                    if tolerance.relative_error(expected, got) <= tolerance.tolerance(x.dtype):
                        return RotaryForm(layout, swapped, rows, 2 * cos_rows.shape[-1], interleaved, batch_shared)
    return None


def layouts(shape: tuple[int, ...]) -> Iterator[Layout]:
    if len(shape) == 4:
        yield Layout(2, shape[1], shape[3], 4)
        yield Layout(1, shape[2], shape[3], 4)
    elif len(shape) == 3:
        hidden = shape[-1]
        yield from (Layout(1, hidden // size, size, 3) for size in range(2, hidden + 1, 2) if hidden % size == 0)


def token_rows(cos: np.ndarray, sin: np.ndarray, rows: Rows, batch: int, tokens: int):
    """(cos rows, sin rows, batch_shared): each token's rows ([B or 1, S, rd / 2]) if the tensors hold
    one row per token (per row of the batch, or one shared by all), taking `rows` of each; else None."""
    width = cos.shape[-1]
    if cos.size == batch * tokens * width:
        lead, batch_shared = batch, False
    elif cos.size == tokens * width:
        lead, batch_shared = 1, True
    else:
        return None
    if rows is not Rows.WHOLE and width % 2:
        return None
    pick = rows.pick(width)
    return cos.reshape(lead, tokens, width)[..., pick], sin.reshape(lead, tokens, width)[..., pick], batch_shared


def batch_axis(shapes: list[tuple[int, ...]], batches: list[int]) -> int | None:
    """The axis of a per-token cos (its shape on each run) that counts the rows of the batch (of
    `batches` rows on each run): the first of the axes before the last that does on every run."""
    axes = range(len(shapes[0]) - 1)
    return next((a for a in axes if all(len(s) == len(shapes[0]) and s[a] == b for s, b in zip(shapes, batches))),
                None)


def rotate(x: np.ndarray, layout: Layout, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """kernels/reference.py's rotary of x (in float64) in its layout, with each token's cos and sin
    rows ([B or 1, S, rd / 2])."""
    tokens = torch.from_numpy(np.ascontiguousarray(layout.to_bshd(x.astype(np.float64))))
    cos_rows, sin_rows = (torch.from_numpy(v.astype(np.float64))[:, :, None, :] for v in (cos, sin))
    return layout.from_bshd(reference.rotary(tokens, cos_rows, sin_rows, interleaved).numpy())


def holds_tokens(candidate: np.ndarray | None, x: np.ndarray, layout: Layout) -> bool:
    """Whether `candidate` holds x's heads tokens first: [B, S, H, D], or [B, S, H*D] merged."""
    if candidate is None or candidate.dtype != x.dtype:
        return False
    bshd = layout.to_bshd(x)
    if candidate.ndim == 3 and candidate.size == bshd.size and candidate.shape[:2] == bshd.shape[:2]:
        candidate = candidate.reshape(bshd.shape)
    return candidate.shape == bshd.shape and bool(np.array_equal(candidate, bshd))


def gathered(rows: np.ndarray | None, table: np.ndarray | None, indices: np.ndarray | None) -> bool:
    """Whether `rows` are the rows of the 2-D `table` that the integer `indices` ([B, S]) pick."""
    if rows is None or table is None or indices is None or table.ndim != 2 or indices.ndim != 2 \
            or indices.dtype.kind not in "iu" or not indices.size:
        return False
    if indices.min() < 0 or indices.max() >= len(table):
        return False
    picked = table[indices]
    return picked.shape == rows.shape and bool(np.array_equal(picked, rows))
