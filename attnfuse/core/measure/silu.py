"""Which x * sigmoid(alpha * x) a region computes, told from its values on chosen points.

SiLU (swish) is alpha = 1, quick gelu alpha = 1.702. Where y / x lies well inside (0, 1) it is
sigmoid(alpha * x), which gives alpha; the whole curve is then compared with that alpha, to
the precision of the dtype the region computes in.
"""
from __future__ import annotations

import numpy as np

from attnfuse.core import tolerance
from attnfuse.core.measure.activation import POINTS, closeness, points
from attnfuse.core.measure.norms import floating

_READ = (np.abs(POINTS) >= 0.5) & (np.abs(POINTS) <= 2.0)  # where y / x is far from 0 and 1 for alpha near 1


def alpha(got: np.ndarray | None, dtype) -> float | None:
    """The alpha for which `got`, the region's values on `points(dtype)`, is x * sigmoid(alpha * x) to
    the precision of `dtype`; None when it is no such curve."""
    if got is None or got.shape != POINTS.shape:
        return None
    x, y = points(dtype).astype(np.float64), got.astype(np.float64)
    with np.errstate(all="ignore"):
        ratio = y[_READ] / x[_READ]
        if not np.all((ratio > 0) & (ratio < 1)):
            return None
        measured = float(np.median(np.log(ratio / (1 - ratio)) / x[_READ]))
        expected = x / (1 + np.exp(-measured * x))
    close = closeness(dtype)
    return measured if np.allclose(y, expected, rtol=close, atol=close) else None


def own_alpha(measured: float, constants: list[np.ndarray], dtype) -> float:
    """1, or the graph's own scalar, where the `measured` alpha is that to the precision it is
    measured with in `dtype`; the measured one otherwise."""
    precision = 10 * tolerance.tolerance(dtype)
    scalars = [1.0] + [float(a.reshape(())) for a in constants if a.size == 1 and floating(a.dtype)]
    return next((s for s in scalars if abs(s - measured) <= precision * abs(s)), measured)
