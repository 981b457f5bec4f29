"""What a normalization computes, read from its outputs on chosen rows: pure numpy, for both front-ends.

A region around a reduction is evaluated once on the rows `points` makes; `read` then says
what it is:

    LayerNorm:  y = (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * w + b
    RMSNorm:    y = x / sqrt(mean(x^2) + eps) * w                          (last axis)

A normalization gives a row scaled by 10 the same output (where eps is negligible); a
LayerNorm also gives the same output for the row moved by as much as its own scale, where an
RMSNorm's output moves by far more than any dtype's rounding. A zero row gives b (and is not finite without an epsilon: 0 / 0). A zero-mean row of mean square 1
(s) gives w / sqrt(1 + eps) + b, the same row made tiny gives tiny w / sqrt(tiny^2 + eps) + b:
their ratio gives eps, and then w. Random rows at several scales check the whole formula with
that eps, w and b. The points come in two copies, the second scaled by a half, which tells a
region that normalises over the tokens too (both copies give the same) from one that does
not normalise at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnfuse.core.text_enum import TextEnum
from attnfuse.core.tolerance import tolerance

_JOINT = 0.5  # the second copy of the points, scaled by this (exact in binary)
# A random row at two scales where eps is negligible (their squares within float16's range in float16).
_WIDE, _NARROW = (100.0, 1000.0), (4.0, 16.0)
NO_EPSILON = "the normalization has no epsilon: a zero row gives 0 / 0"
ZERO, SIGNS, TINY_SIGNS, LARGE, LARGER, SHIFTED = range(6)  # the rows read below, in order


class NormKind(TextEnum):
    LAYER = "layer_norm"
    RMS = "rms_norm"


@dataclass(frozen=True)
class Reading:
    """What a region is. `kind` None and no reason: it does not normalise its rows at all."""

    kind: NormKind | None = None
    eps: float = 0.0
    weight: np.ndarray | None = None  # measured, [hidden]
    bias: np.ndarray | None = None  # measured, [hidden] (zeros for an RMSNorm)
    reason: str | None = None  # why a region that normalises its rows is neither a LayerNorm nor an RMSNorm

    @property
    def fits(self) -> bool:
        return self.kind is not None and self.reason is None


def tiny(dtype) -> float:
    """A row this small has a mean square near a usual eps (1e-10; 1e-4 where squares would underflow)."""
    return 1e-5 if float(np.finfo(dtype).tiny) < 1e-30 else 1e-2


def points(hidden: int, dtype, rank: int) -> np.ndarray:
    """The rows to evaluate a region on, as an array of x's rank and dtype: [2, 1.., rows, hidden]
    (two copies, see above) or [rows, hidden] for a 2-D x."""
    rows = _rows(hidden, dtype)
    if rank >= 3:
        rows = np.stack([rows, rows * _JOINT]).reshape((2,) + (1,) * (rank - 3) + rows.shape)
    return rows.astype(dtype)


def read(x: np.ndarray, y: np.ndarray) -> Reading:
    """What the region is, from its output `y` on the `points` `x`."""
    dtype = x.dtype
    x, y = (a.astype(np.float64).reshape(-1, *a.shape[-2:]) for a in (x, y))  # [copies, rows, hidden]
    limit = tolerance(dtype)
    first = y[0]
    if not _equal(first[LARGE], first[LARGER], limit) or not np.abs(first[LARGE]).max() > 0:
        if len(y) > 1 and np.isfinite(y).all() and np.abs(y[0]).max() > 0 and _equal(y[0], y[1], limit):
            return Reading(reason="it normalises over the tokens too, not over each row's last axis alone")
        return Reading()  # moves with a row's scale: not a normalization
    kind = NormKind.LAYER if _equal(first[LARGE], first[SHIFTED], limit) else NormKind.RMS
    bias = first[ZERO]
    if not np.isfinite(bias).all():  # 0 / 0
        return Reading(kind, reason=NO_EPSILON)
    if kind is NormKind.RMS and np.abs(bias).max() > limit * np.abs(first[LARGE]).max():
        return Reading(kind, reason="the normalization adds a bias: an RMSNorm has none")
    eps = _epsilon(x[0], first - bias, kind)
    if not eps > tiny(dtype) ** 2 * 1e-3:
        return Reading(kind, reason=f"the normalization's epsilon is too small to measure in {dtype.name}")
    signs = _centred(x[0][SIGNS], kind)
    weight = (first[SIGNS] - bias) * np.sqrt(_mean_square(signs) + eps) / signs
    expected = normalize(x[0], kind, eps, weight, bias)
    error = max(_error(e, g) for e, g in zip(expected, first))
    if not error <= limit:
        formula = "x / sqrt(mean(x^2) + eps) * w" if kind is NormKind.RMS else "a LayerNorm"
        return Reading(kind, reason=f"the normalization is not {formula} with eps {eps:.3g} "
                                    f"(relative error {error:.2g})")
    return Reading(kind, eps, weight, bias)


def normalize(x: np.ndarray, kind: NormKind, eps: float, weight, bias) -> np.ndarray:
    """The norm of `kind` over the last axis, in float64."""
    x = _centred(x.astype(np.float64), kind)
    return x / np.sqrt(_mean_square(x) + eps) * weight + bias


def own_scalar(measured: float, scalars: list[np.ndarray], dtype) -> float:
    """The graph's own scalar equal to the `measured` eps (to the precision it is measured with in
    `dtype`), so that the fused op carries exactly the graph's value; the measured one where the
    graph has none."""
    precision = min(10 * tolerance(dtype), 0.1)
    for array in scalars:
        if array.size == 1 and floating(array.dtype) and \
                abs(float(array.reshape(())) - measured) <= precision * measured:
            return float(array.reshape(()))
    return measured


def floating(dtype) -> bool:
    """A float dtype (bfloat16, numpy's through ml_dtypes, included)."""
    return np.dtype(dtype).kind == "f" or np.dtype(dtype).name == "bfloat16"


def matching_vector(measured: np.ndarray, arrays: list[np.ndarray], dtype) -> int | None:
    """The index of the array equal to the `measured` vector (Gemma's 1 + w is one the graph
    computes), to the precision of `dtype`; None if none is."""
    scale = max(float(np.abs(measured).max()), 1e-30)
    for index, array in enumerate(arrays):
        if array.size == measured.size and floating(array.dtype) and \
                np.abs(array.reshape(-1).astype(np.float64) - measured).max() <= tolerance(dtype) * scale:
            return index
    return None


def is_filled(measured: np.ndarray, fill: float, dtype) -> bool:
    """The vector is `fill` everywhere (a norm without that vector)."""
    return bool(np.abs(measured - fill).max() <= tolerance(dtype) * max(abs(fill), float(np.abs(measured).max()), 1.0))


def _rows(hidden: int, dtype) -> np.ndarray:
    """Zeros, s, tiny s, a random row at two large scales and moved, then random rows at an ordinary,
    a small and a tiny scale (where eps weighs most)."""
    small = tiny(dtype)
    large = _WIDE if float(np.finfo(dtype).max) > 1e5 else _NARROW
    alternating = np.resize([1.0, -1.0], hidden)
    signs = alternating - alternating.mean()  # mean 0 (for an odd width too), every entry nonzero
    signs /= np.sqrt(_mean_square(signs))
    normal = np.random.default_rng(0).standard_normal((4, hidden))
    return np.stack([np.zeros(hidden), signs, signs * small, normal[0] * large[0], normal[0] * large[1],
                     (normal[0] + 1.0) * large[0], normal[1], normal[2] * small * 10, normal[3] * small])


def _epsilon(x: np.ndarray, shifted: np.ndarray, kind: NormKind) -> float:
    """eps from s and tiny s: the ratio of their outputs over the ratio of the rows is
    q = sqrt((m1 + eps) / (m2 + eps)), m1 and m2 their mean squares."""
    big, small = _centred(x[SIGNS], kind), _centred(x[TINY_SIGNS], kind)
    seen = np.abs(shifted[SIGNS]) >= 0.5 * np.abs(shifted[SIGNS]).max()
    if not seen.any():
        return float("nan")
    q = float(np.median((shifted[TINY_SIGNS][seen] / shifted[SIGNS][seen]) / (small[seen] / big[seen])))
    q2, m1, m2 = q * q, float(_mean_square(big)[0]), float(_mean_square(small)[0])
    return (m1 - q2 * m2) / (q2 - 1.0) if q2 > 1.0 else float("nan")


def _centred(x: np.ndarray, kind: NormKind) -> np.ndarray:
    return x - x.mean(-1, keepdims=True) if kind is NormKind.LAYER else x


def _mean_square(x: np.ndarray) -> np.ndarray:
    return (x * x).mean(-1, keepdims=True)


def _equal(expected: np.ndarray, got: np.ndarray, limit: float) -> bool:
    return _error(expected, got) <= limit


def _error(expected: np.ndarray, got: np.ndarray) -> float:
    """The largest difference relative to the expected row's largest magnitude; inf where one is finite
    and the other not."""
    finite = np.isfinite(expected)
    if not np.array_equal(finite, np.isfinite(got)):
        return float("inf")
    scale = max(float(np.abs(expected[finite]).max(initial=0.0)), 1e-30)
    return float(np.abs(expected[finite] - got[finite]).max(initial=0.0)) / scale
