"""Triton kernels for attnfuse's fused ops (GPU, or CPU under TRITON_INTERPRET=1).

Each function matches its definition in `attnfuse.kernels.reference`. pack and
unpack are torch's gather/scatter (see `reference.pack`), re-exported here so
that every fused op is reachable from one place.
"""
import triton  # noqa: F401  (fail here, clearly, when Triton is missing)

from attnfuse.kernels.reference import pack, unpack
from attnfuse.kernels.triton.gelu import bias_gelu
from attnfuse.kernels.triton.layernorm import skip_layernorm
from attnfuse.kernels.triton.linear import linear_attention
from attnfuse.kernels.triton.varlen import varlen_attention

__all__ = ["varlen_attention", "linear_attention", "skip_layernorm", "bias_gelu", "pack", "unpack"]
