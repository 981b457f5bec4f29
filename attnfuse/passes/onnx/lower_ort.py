"""Lower a matched attention site to ONNX Runtime's com.microsoft MultiHeadAttention.

Everything the original added to the scores (masks, ALiBi, other biases) is
rebuilt as one additive `attention_bias` of shape [batch or 1, heads or 1, S, T]
from the very tensors the original graph computes: whatever way the exporter
spelled the mask, the fused op sees the same numbers.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attnfuse.passes.onnx.attention import Candidate, ScoreStep
from attnfuse.passes.onnx.gelu import split_bias
from attnfuse.passes.onnx.graph import MS_DOMAIN, Builder, constant, observed


def lower_to_mha(candidate: Candidate, probe, builder: Builder) -> tuple[ir.Value, ir.Value | None]:
    """Build MultiHeadAttention for `candidate`; returns (output, attention_bias or None)."""
    site = candidate.site
    dtype = observed(candidate.softmax.inputs[0], probe).dtype
    bias = additive_bias(candidate.steps, site.num_heads, probe, builder, dtype)
    if bias is not None:
        # Two masks of finfo.min add up to -inf, and a row of -inf makes NaN.
        bias = builder.op("Max", [bias, builder.const(np.finfo(dtype).min, dtype)])
        bias = builder.op("Expand", [bias, _query_key_shape(site, builder)])
    return multi_head_attention(site, probe, builder, attention_bias=bias), bias


def multi_head_attention(site, probe, builder: Builder, *, attention_bias=None, key_padding_mask=None) -> ir.Value:
    """MultiHeadAttention on the site's q, k, v, shaped like the output it replaces."""
    (q, k, v), bias = _projection_bias(site, probe, builder)
    output = builder.op(
        "MultiHeadAttention",
        [q, k, v, bias, key_padding_mask, attention_bias],
        {"num_heads": site.num_heads, "scale": site.scale},
        domain=MS_DOMAIN,
        name=f"{site.name}/MultiHeadAttention",
    )
    merged = observed(site.output, probe)
    if merged.ndim != 3:
        output = builder.op("Reshape", [output, builder.const([-1, *merged.shape[1:]], np.int64)])
    return output


def _projection_bias(site, probe, builder: Builder) -> tuple[list[ir.Value], ir.Value | None]:
    """q, k, v as [batch, seq, hidden]; when they are h + b with constant vectors b, the h's and
    one [3 * hidden] bias, which MHA adds while it lays out the heads (three passes fewer)."""
    qkv = [_as_3d(x, probe, builder) for x in (site.q, site.k, site.v)]
    split = [split_bias(x, probe) for x in qkv]
    widths = [int(np.prod(observed(x, probe).shape[2:])) for x in (site.q, site.k, site.v)]
    vectors = [None if b is None else constant(b, probe) for _, b in split]
    if all(b is None for b in vectors) or any(b is not None and b.shape != (w,) for b, w in zip(vectors, widths)):
        return qkv, None
    dtype = next(b.dtype for b in vectors if b is not None)
    bias = np.concatenate([np.zeros(w, dtype) if b is None else b for b, w in zip(vectors, widths)])
    return [h for h, _ in split], builder.const(bias)


def additive_bias(steps: list[ScoreStep], heads: int, probe, builder: Builder, dtype) -> ir.Value | None:
    """softmax(f(qk)) == softmax(scale * qk + bias): build `bias` from the steps of f."""
    bias = None
    for step in steps:
        if step.kind == "scale" and bias is not None:
            bias = builder.op("Div" if step.divide else "Mul", [bias, step.value])
        elif step.kind in ("add", "sub"):
            term = _as_4d(step.value, step.rank, heads, probe, builder)
            if bias is None:
                bias = term if step.kind == "add" else builder.op("Neg", [term])
            else:
                bias = builder.op("Add" if step.kind == "add" else "Sub", [bias, term])
        elif step.kind == "where":
            condition = _as_4d(step.value, step.rank, heads, probe, builder)
            fill = _as_4d(step.fill, step.rank, heads, probe, builder)
            kept = bias if bias is not None else builder.const(np.zeros((), dtype))
            operands = [kept, fill] if step.keep_when else [fill, kept]
            bias = builder.op("Where", [condition, *operands])
    return bias


def _as_4d(value: ir.Value, rank: int, heads: int, probe, builder: Builder) -> ir.Value:
    """A term added to [batch*heads, S, T] scores, reshaped to add to [batch, heads, S, T]."""
    shape = observed(value, probe).shape
    if rank == 4 or len(shape) < 3 or shape[0] == 1:
        return value  # broadcasts the same way against both layouts
    tail = builder.op("Shape", [value], {"start": 1})
    new_shape = builder.op("Concat", [builder.const([-1, heads], np.int64), tail], {"axis": 0})
    return builder.op("Reshape", [value, new_shape])


def _as_3d(value: ir.Value, probe, builder: Builder) -> ir.Value:
    """[batch, seq, heads, head_size] -> [batch, seq, hidden]; rank 3 stays. The hidden size is
    spelled out: a -1 cannot be inferred when there is no token (a packed batch with none real)."""
    shape = observed(value, probe).shape
    if len(shape) == 3:
        return value
    return builder.op("Reshape", [value, builder.const([0, 0, int(np.prod(shape[2:]))], np.int64)])


def _query_key_shape(site, builder: Builder) -> ir.Value:
    """[1, 1, S, T], read from q and k at run time."""
    seq_q = builder.op("Shape", [site.q], {"start": 1, "end": 2})
    seq_k = builder.op("Shape", [site.k], {"start": 1, "end": 2})
    return builder.op("Concat", [builder.const([1, 1], np.int64), seq_q, seq_k], {"axis": 0})
