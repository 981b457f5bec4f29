"""Lower a matched attention site to ONNX Runtime's com.microsoft MultiHeadAttention.

Everything the original added to the scores (masks, ALiBi, other biases) is
rebuilt as one additive `attention_bias` of shape [batch or 1, heads or 1, S, T]
from the very tensors the original graph computes: whatever way the exporter
spelled the mask, the fused op sees the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from attnfuse.passes.onnx.attention import Candidate, ScoreStep
from attnfuse.passes.onnx.gelu import split_bias
from attnfuse.passes.onnx.graph import MS_DOMAIN, Builder, constant, observed
from attnfuse.passes.onnx.heads import TOKENS, TOKENS_HEADS, as_heads_first, as_tokens, repeated


def lower_to_mha(candidate: Candidate, probe, builder: Builder) -> tuple[ir.Value, ir.Value | None]:
    """Build MultiHeadAttention for `candidate`; returns (output, attention_bias or None)."""
    site = candidate.site
    dtype = observed(candidate.softmax.inputs[0], probe).dtype
    inputs = attention_inputs(candidate, probe, builder)
    bias = additive_bias(candidate.steps, site.num_heads, probe, builder, dtype)
    if bias is not None:
        # The very numbers the graph adds: two masks of finfo.min add up to -inf, which weighs a
        # key less than one of finfo.min in a row that masks every key, as in the original.
        shape = builder.op("Concat", [builder.const([1, 1], np.int64), inputs.lengths], {"axis": 0})
        bias = builder.op("Expand", [bias, shape])
    output = multi_head_attention(candidate, probe, builder, inputs, attention_bias=bias)
    if bias is not None and candidate.nan_guard:  # a row of -inf gives NaN; the original's guard gives 0
        output = builder.op("Where", [builder.op("IsNaN", [output]), builder.const(np.zeros((), dtype)), output])
    return output, bias


@dataclass
class AttentionInputs:
    """MultiHeadAttention's q, k, v (3-D, or k and v heads first), projection bias, and [S, T]."""

    q: ir.Value
    k: ir.Value
    v: ir.Value
    bias: ir.Value | None
    lengths: ir.Value  # int64 [2]: queries, keys


def attention_inputs(candidate: Candidate, probe, b: Builder) -> AttentionInputs:
    """q as [B, S, hidden]; k and v as [B, T, hidden] when the graph holds them so (with their
    projection biases folded into one bias, which MHA adds while it lays out the heads), else
    heads first [B, H, T, D], repeated up to q's heads (grouped-query attention)."""
    site = candidate.site
    q, k, v = candidate.operands
    sizes = (site.head_size, site.head_size, _value_size(candidate, probe))
    q_tokens = as_tokens(b, q, sizes[0])
    seq_q = b.op("Shape", [q_tokens], {"start": 1, "end": 2})
    if all(x.layout in (TOKENS, TOKENS_HEADS) and x.heads == site.num_heads for x in (k, v)):
        qkv = [q_tokens, as_tokens(b, k, sizes[1]), as_tokens(b, v, sizes[2])]
        seq_k = b.op("Shape", [qkv[1]], {"start": 1, "end": 2})
        (qkv, bias) = _projection_bias(qkv, sizes, site.num_heads, probe, b)
        return AttentionInputs(*qkv, bias, b.op("Concat", [seq_q, seq_k], {"axis": 0}))
    groups = site.num_heads // k.heads
    k4, v4 = (repeated(b, as_heads_first(b, x, size), groups) for x, size in ((k, sizes[1]), (v, sizes[2])))
    seq_k = b.op("Shape", [k4], {"start": 2, "end": 3})
    return AttentionInputs(q_tokens, k4, v4, None, b.op("Concat", [seq_q, seq_k], {"axis": 0}))


def _value_size(candidate: Candidate, probe) -> int:
    """v's head size: the merged output's width ([B, S, H*Dv] or [B, S, H, Dv]) over the heads."""
    site = candidate.site
    return int(np.prod(observed(site.output, probe).shape[2:])) // site.num_heads


def multi_head_attention(candidate: Candidate, probe, builder: Builder, inputs: AttentionInputs | None = None, *,
                         attention_bias=None, key_padding_mask=None) -> ir.Value:
    """MultiHeadAttention on the site's q, k, v, shaped like the output it replaces."""
    site = candidate.site
    inputs = inputs or attention_inputs(candidate, probe, builder)
    output = builder.op(
        "MultiHeadAttention",
        [inputs.q, inputs.k, inputs.v, inputs.bias, key_padding_mask, attention_bias],
        {"num_heads": site.num_heads, "scale": site.scale},
        domain=MS_DOMAIN,
        name=f"{site.name}/MultiHeadAttention",
    )
    merged = observed(site.output, probe)
    if merged.ndim != 3:
        output = builder.op("Reshape", [output, builder.const([-1, *merged.shape[1:]], np.int64)])
    return output


def _projection_bias(qkv: list[ir.Value], sizes, heads: int, probe, builder: Builder
                     ) -> tuple[list[ir.Value], ir.Value | None]:
    """When q, k, v are h + b with constant vectors b: the h's and one [3 * hidden] bias."""
    split = [split_bias(x, probe) for x in qkv]
    widths = [heads * size for size in sizes]
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
