"""Every fused op attnfuse writes, declared once.

A `FusedOp` says what the op computes (its reference in kernels/reference.py), whether
it is token-wise (each output token depends on the same token of its inputs only:
padding-free runs such ops on the packed real tokens), how ONNX spells it (one or more
`OnnxForm`s of kernels/onnx_forms.py: ONNX Runtime's contrib ops, or its own ops in the ONNX
domain) and the function a torch.fx graph calls (kernels/ops.py; None for ops with no torch form).

Passes, padding-free, the report, `inspect` and the torch export read op names, input
slots and token-wise-ness from here; no op name is a string literal elsewhere.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from attnfuse.kernels import ops, reference
from attnfuse.kernels.onnx_forms import (  # noqa: F401  (the forms are read as registry.<FORM>)
    BIAS_GELU_FORM, EMBED_LAYER_NORMALIZATION, FAST_GELU, GELU_FORM, GROUP_QUERY_ATTENTION, LAYER_NORMALIZATION,
    MS_DOMAIN, MULTI_HEAD_ATTENTION, ONNX_DOMAIN, PACKED_MULTI_HEAD_ATTENTION, RMS_NORMALIZATION, ROTARY_EMBEDDING,
    SIMPLIFIED_LAYER_NORMALIZATION, SKIP_LAYER_NORMALIZATION, SKIP_SIMPLIFIED_LAYER_NORMALIZATION, STANDARD_ATTENTION,
    OnnxForm, gelu_form,
)


@dataclass(frozen=True)
class FusedOp:
    name: str
    reference: Callable | None  # kernels.reference: what the op computes
    token_wise: bool
    onnx: tuple[OnnxForm, ...]
    torch: Callable | None = None  # kernels.ops: what an fx graph calls

    def form(self, op_type: str) -> OnnxForm:
        return next(form for form in self.onnx if form.op_type == op_type)


ATTENTION = FusedOp("attention", reference.attention, False,
                    (MULTI_HEAD_ATTENTION, GROUP_QUERY_ATTENTION, STANDARD_ATTENTION), ops.attention)
PACKED_ATTENTION = FusedOp("packed_attention", reference.varlen_attention, False, (PACKED_MULTI_HEAD_ATTENTION,),
                           ops.packed_attention)
SKIP_LAYER_NORM = FusedOp("skip_layernorm", reference.skip_layernorm, True, (SKIP_LAYER_NORMALIZATION,),
                          ops.skip_layernorm)
LAYER_NORM = FusedOp("layernorm", None, True, (LAYER_NORMALIZATION,))
EMBED_LAYER_NORM = FusedOp("embed_layernorm", None, True, (EMBED_LAYER_NORMALIZATION,))
BIAS_GELU = FusedOp("bias_gelu", reference.bias_gelu, True, (BIAS_GELU_FORM, FAST_GELU, GELU_FORM), ops.bias_gelu)
RMS_NORM = FusedOp("rms_norm", reference.rms_norm, True, (SIMPLIFIED_LAYER_NORMALIZATION, RMS_NORMALIZATION),
                   ops.rms_norm)
SKIP_RMS_NORM = FusedOp("skip_rms_norm", reference.skip_rms_norm, True, (SKIP_SIMPLIFIED_LAYER_NORMALIZATION,),
                        ops.skip_rms_norm)
ROTARY = FusedOp("rotary", reference.rotary, True, (ROTARY_EMBEDDING,), ops.rotary)

FUSED_OPS = (ATTENTION, PACKED_ATTENTION, SKIP_LAYER_NORM, LAYER_NORM, EMBED_LAYER_NORM, BIAS_GELU, RMS_NORM,
             SKIP_RMS_NORM, ROTARY)

# Fused attention that ONNX Runtime (or an earlier attnfuse run) may have written into a model:
# kept as it is, and counted.
FOREIGN_ATTENTION = frozenset({"Attention", "PackedAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention",
                               "QAttention"})  # QAttention: quantize_dynamic's int8 form of Attention


def of_onnx(domain: str, op_type: str) -> tuple[FusedOp, OnnxForm] | None:
    """The fused op (and its form) an ONNX node is, or None. ONNX's own LayerNormalization is not
    counted as fused (the model may have come with it)."""
    domain = ONNX_DOMAIN if domain == "ai.onnx" else domain
    for op in FUSED_OPS:
        for form in op.onnx:
            if (form.domain, form.op_type) == (domain, op_type) and op is not LAYER_NORM:
                return op, form
    return None


def of_torch(function) -> FusedOp | None:
    """The fused op an fx node's target is, or None."""
    return next((op for op in FUSED_OPS if op.torch is not None and op.torch is function), None)


def is_fused_attention(domain: str, op_type: str) -> bool:
    """An attention op ONNX Runtime fused (ours, or one a model came with)."""
    found = of_onnx(domain, op_type)
    if found is not None:
        return found[0] in (ATTENTION, PACKED_ATTENTION)
    return domain == MS_DOMAIN and op_type in FOREIGN_ATTENTION
