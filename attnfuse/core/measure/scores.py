"""The scale and soft-cap of attention scores, from the scores evaluated on chosen points: pure numpy.

The scores are some function f of the product x = q.k. Attention is

    f(x) = scale * x + f(0)                        (plain)
    f(x) = cap * tanh(scale * x / cap) + f(0)      (soft-capped, Gemma 2)

where f(0), the scores with q zeroed, is the bias and mask. With y = f(x) - f(0) at the
scores f(0) does not hide: the scale is the median of y / x; a cap is what y comes to when
q is scaled up until tanh saturates, and then scale = cap * atanh(y / cap) / x. Either is
accepted only if the formula gives back every y it was measured on.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnfuse.core.tolerance import tolerance

SATURATING = 64.0  # q scaled by this saturates a soft-cap's tanh (exact in binary)


@dataclass(frozen=True)
class Points:
    """f(x) - f(0) measured at the products x (the unhidden scores of one run, q scaled by `times`)."""

    x: np.ndarray  # float64
    y: np.ndarray  # float64
    size: float  # the largest magnitude of f there: what a fit is held to
    times: float = 1.0


@dataclass(frozen=True)
class ScoreFit:
    scale: float
    softcap: float = 0.0  # 0: the scores are not capped


def fit(points: Sequence[Points], capped: bool, dtype) -> ScoreFit | None:
    """The scores' scale (and cap, when `capped`) that give back every point to the dtype's
    tolerance; None if none does (or nothing could be measured)."""
    found = _soft_capped(points, dtype) if capped else _linear(points)
    if found is None or not all(_fits(found, p, tolerance(dtype)) for p in points):
        return None
    return found


def _linear(points: Sequence[Points]) -> ScoreFit | None:
    x, y = _joined(points)
    usable = np.abs(x) > 1e-3 * np.abs(x).max(initial=0.0)
    return ScoreFit(float(np.median(y[usable] / x[usable]))) if usable.any() else None


def _soft_capped(points: Sequence[Points], dtype) -> ScoreFit | None:
    saturated = [p for p in points if p.times == SATURATING]
    cap = _rounded(max((float(np.abs(p.y).max(initial=0.0)) for p in saturated), default=0.0), dtype)
    if not cap:
        return None
    x, y = _joined([p for p in points if p.times == 1.0])
    usable = (np.abs(y) < 0.9 * cap) & (np.abs(x) > 1e-3 * np.abs(x).max(initial=0.0))
    if not usable.any():
        return None
    return ScoreFit(float(np.median(cap * np.arctanh(y[usable] / cap) / x[usable])), cap)


def _rounded(cap: float, dtype) -> float:
    """A measured cap to the digits the dtype holds: a saturated tanh comes within a rounding of 1
    (ONNX Runtime's overshoots by one unit), and a cap is a number someone chose."""
    digits = max(int(-np.log10(tolerance(dtype))) + 2, 2)
    return float(f"{cap:.{digits}g}")


def _fits(found: ScoreFit, p: Points, limit: float) -> bool:
    x = found.scale * p.times * p.x
    predicted = found.softcap * np.tanh(x / found.softcap) if found.softcap else x
    return float(np.abs(predicted - p.y).max(initial=0.0)) <= limit * max(p.size, 1e-6)


def _joined(points: Sequence[Points]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([p.times * p.x.reshape(-1) for p in points]) if points else np.zeros(0)
    y = np.concatenate([p.y.reshape(-1) for p in points]) if points else np.zeros(0)
    return x, y
