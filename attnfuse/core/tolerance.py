"""How close a rewrite must come to the original, by the precision it computes in: one policy for both front-ends.

A fused op adds and multiplies in another order than the ops it replaces, which
moves a result by a few units in the last place of its dtype; a model's layers add
those up. The tolerance is relative to the largest magnitude of the tensor compared:
1e-4 in float32 (its unit roundoff is 6e-8, so this leaves room for long sums and
exp/erf approximations, and still catches any wrong rewrite), and the same margin over
the unit roundoff in float16 (4.9e-4 -> 1e-2) and bfloat16 (3.9e-3 -> 5e-2).
"""
from __future__ import annotations

import numpy as np

FLOAT32 = 1e-4
BY_DTYPE = {"float64": FLOAT32, "float32": FLOAT32, "float16": 1e-2, "bfloat16": 5e-2}
# Activations quantized to int8 symmetrically per group at run time (OpenVINO): rounding moves each by at
# most half a step, 1/254 of its group's largest magnitude, about bfloat16's unit roundoff (1/256): its margin.
INT8_ACTIVATIONS = BY_DTYPE["bfloat16"]


def tolerance(dtype) -> float:
    """The tolerance for values of `dtype` (a numpy dtype or its name); float32's for others."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return BY_DTYPE.get(name, FLOAT32)


def relative_error(expected: np.ndarray, got: np.ndarray, real: np.ndarray | None = None) -> float:
    """Max absolute difference over real token positions, relative to the expected values' largest
    magnitude; inf for another shape or where one is finite and the other not."""
    if expected.shape != got.shape:
        return float("inf")
    expected = expected.astype(np.float64)
    got = got.astype(np.float64)
    if real is not None:
        keep = real_positions(expected.shape, real)
        if keep is not None:
            expected, got = expected[keep], got[keep]
    if expected.size == 0:
        return 0.0
    finite = np.isfinite(expected)
    if not np.array_equal(finite, np.isfinite(got)):
        return float("inf")
    scale = max(float(np.abs(expected[finite]).max(initial=0.0)), 1e-6)
    return float(np.abs(expected[finite] - got[finite]).max(initial=0.0)) / scale


def real_positions(shape: tuple[int, ...], real: np.ndarray):
    """A boolean index of the real tokens for a tensor laid out [B, S, ...] or [B*S, ...]; None
    when the tensor is laid out otherwise."""
    batch, seqlen = real.shape
    if len(shape) >= 2 and shape[:2] == (batch, seqlen):
        return real
    if len(shape) >= 1 and shape[0] == batch * seqlen and batch * seqlen != batch:
        return real.reshape(-1)
    return None


def close(expected: np.ndarray, got: np.ndarray, real: np.ndarray | None = None) -> bool:
    """Within the tolerance of the expected values' dtype."""
    return relative_error(expected, got, real) <= tolerance(expected.dtype)


def least_precise(dtypes) -> float:
    """The tolerance of the least precise of `dtypes` (float32's when there are none): one bound
    for a model's outputs together."""
    return max(map(tolerance, dtypes), default=FLOAT32)
