"""Which gelu a region computes, told from its values on chosen points.

A region that computes gelu(x), exactly (erf) or in the tanh approximation, is evaluated
on points spread over the range where the two differ and compared with both, to the
precision of the dtype it computes in.
"""
from __future__ import annotations

import math

import numpy as np

from attnfuse.core.measure.activation import POINTS, closeness
from attnfuse.core.text_enum import TextEnum


class Approximation(TextEnum):
    """gelu's forms, as the fused ops' `approximate` argument names them."""

    EXACT = "none"  # 0.5 x (1 + erf(x / sqrt 2))
    TANH = "tanh"  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))


_REFERENCE = {
    Approximation.EXACT: np.array([0.5 * x * (1 + math.erf(x / math.sqrt(2))) for x in POINTS]),
    Approximation.TANH: np.array([0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
                                  for x in POINTS]),
}


def which(got: np.ndarray | None, dtype) -> Approximation | None:
    """The gelu whose values on `points(dtype)` are `got`, to the precision of `dtype`; None for none."""
    if got is None or got.shape != POINTS.shape:
        return None
    values = got.astype(np.float64)
    # In float16 the two gelus differ by less than a rounding step at some points: the one the
    # region is closest to on average is the one it computes.
    kind = min(_REFERENCE, key=lambda k: np.mean(np.abs(values - _REFERENCE[k])))
    close = closeness(dtype)
    return kind if np.allclose(values, _REFERENCE[kind], rtol=close, atol=close) else None
