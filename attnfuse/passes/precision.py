"""How close a rewrite must come to the original, by the precision it computes in.

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


def tolerance(dtype) -> float:
    """The tolerance for values of `dtype` (a numpy dtype or its name); float32's for others."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return BY_DTYPE.get(name, FLOAT32)
