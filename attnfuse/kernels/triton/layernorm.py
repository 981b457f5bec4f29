"""Residual + bias + layernorm in one pass: one program per row, fp32 statistics."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnfuse.kernels.triton import _common

MAX_HIDDEN = 65536


@triton.jit
def _skip_layernorm_kernel(
    X, Skip, Bias, Weight, Beta, Out, hidden, eps,
    HAS_BIAS: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK: tl.constexpr,
):
    row_start = tl.program_id(0).to(tl.int64) * hidden
    cols = tl.arange(0, BLOCK)
    valid = cols < hidden
    h = tl.load(X + row_start + cols, mask=valid, other=0.0).to(tl.float32)
    h += tl.load(Skip + row_start + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(Bias + cols, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(h, 0) / hidden
    centered = tl.where(valid, h - mean, 0.0)
    variance = tl.sum(centered * centered, 0) / hidden
    y = centered * tl.rsqrt(variance + eps) * tl.load(Weight + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_BETA:
        y += tl.load(Beta + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(Out + row_start + cols, y.to(Out.dtype.element_ty), mask=valid)


def skip_layernorm(
    x: torch.Tensor,
    skip: torch.Tensor,
    bias: torch.Tensor | None,
    weight: torch.Tensor,
    beta: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Triton kernel for `reference.skip_layernorm`: layernorm(x + skip + bias).

    x, skip: [..., hidden] of one float dtype (hidden up to 65536); bias, weight,
    beta: [hidden] (bias and beta may be None). Output in x's dtype.
    """
    _common.check_float("x", x)
    if skip.shape != x.shape or skip.dtype != x.dtype:
        raise ValueError(f"skip must match x: got {tuple(skip.shape)} {skip.dtype} for x {tuple(x.shape)} {x.dtype}")
    hidden = x.shape[-1] if x.dim() else 0
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"the last dim of x must be in 1..{MAX_HIDDEN}, got {hidden}")
    for name, param in (("bias", bias), ("weight", weight), ("beta", beta)):
        _common.check_vector(name, param, hidden)
    _common.check_launchable(x, skip, bias, weight, beta)

    x, skip = x.contiguous(), skip.contiguous()
    out = torch.empty_like(x)
    rows = x.numel() // hidden
    if rows == 0:
        return out
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else weight  # weight: unused placeholder
    beta = beta.contiguous() if beta is not None else weight
    _skip_layernorm_kernel[(rows,)](
        x, skip, bias, weight, beta, out, hidden, float(eps),
        HAS_BIAS=bias is not weight, HAS_BETA=beta is not weight, BLOCK=triton.next_power_of_2(hidden),
    )
    return out
