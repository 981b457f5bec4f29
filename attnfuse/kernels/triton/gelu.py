"""gelu(x + bias), exact (erf) or tanh-approximated, elementwise in fp32."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnfuse.kernels.triton import _common

BLOCK = 1024
SQRT_HALF = tl.constexpr(1.0 / math.sqrt(2.0))
SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))


@triton.jit
def _tanh(x):
    # tl has no tanh. Built from e^-2|x| <= 1, so nothing overflows for large |x|.
    decay = tl.exp(-2.0 * tl.abs(x))
    magnitude = (1.0 - decay) / (1.0 + decay)
    return tl.where(x >= 0, magnitude, -magnitude)


@triton.jit
def _bias_gelu_kernel(X, Bias, Out, numel, hidden, HAS_BIAS: tl.constexpr, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < numel
    h = tl.load(X + offsets, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(Bias + offsets % hidden, mask=valid, other=0.0).to(tl.float32)
    if TANH:
        y = 0.5 * h * (1.0 + _tanh((h + 0.044715 * h * h * h) * SQRT_2_OVER_PI))
    else:
        y = 0.5 * h * (1.0 + tl.erf(h * SQRT_HALF))
    tl.store(Out + offsets, y.to(Out.dtype.element_ty), mask=valid)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """Triton kernel for `reference.bias_gelu`: gelu(x + bias) over x [..., hidden].

    bias: [hidden] or None; approximate: "none" (erf) or "tanh". Output in x's dtype.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    _common.check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have a last (hidden) dim")
    _common.check_vector("bias", bias, x.shape[-1])
    _common.check_launchable(x, bias)

    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    bias_arg = bias.contiguous() if bias is not None else x  # x: unused placeholder
    _bias_gelu_kernel[(triton.cdiv(x.numel(), BLOCK),)](
        x, bias_arg, out, x.numel(), x.shape[-1],
        HAS_BIAS=bias is not None, TANH=approximate == "tanh", BLOCK=BLOCK,
    )
    return out
