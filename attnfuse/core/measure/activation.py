"""Where an elementwise activation's region is evaluated, and how close its values must come.

gelu and silu (core/measure/gelu.py, silu.py) are each told apart from their values on the same points,
spread over the range where their forms differ.
"""
from __future__ import annotations

import numpy as np

from attnfuse.core import tolerance

POINTS = np.linspace(-6.0, 6.0, 97)


def points(dtype) -> np.ndarray:
    """Where to evaluate a candidate region, in the dtype of its input."""
    return POINTS.astype(dtype)


def closeness(dtype) -> float:
    """How close a region's values must come to a form's: float32's roundoff allows 1e-5; narrower
    dtypes their tolerance."""
    return 1e-5 if np.dtype(dtype).itemsize >= 4 else tolerance.tolerance(dtype)
