"""Lower a matched attention site to ONNX Runtime's com.microsoft Attention or MultiHeadAttention.

Where q, k and v are projections of one input by constant weights (self-attention),
the site becomes `Attention`: one GEMM with the three weights side by side, written
straight into the per-head layout, which on ONNX Runtime's CPU provider is faster than
three MatMuls (or one and a Split) feeding MultiHeadAttention, whose q, k, v are
transposed once more inside. Otherwise it becomes `MultiHeadAttention`.

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
from attnfuse.passes.onnx.graph import MS_DOMAIN, Builder, NoMatch, constant, observed


@dataclass
class Projection:
    """x @ weight (+ bias): a constant linear map of the [batch, seq, features] input x."""

    input: ir.Value
    weight: np.ndarray  # [features, width]
    bias: np.ndarray | None  # [width]


def lower_to_attention(candidate: Candidate, probe, builder: Builder) -> tuple[ir.Value, ir.Value | None]:
    """Build Attention (q, k, v projected by the op itself) for `candidate`; returns
    (output, attention_bias or None). NoMatch when q, k, v are not projections of one input."""
    site = candidate.site
    q, k, v = (projection(x, probe) for x in (site.q, site.k, site.v))
    if q is None or k is None or v is None or not q.input is k.input is v.input:
        raise NoMatch("q, k and v are not constant projections of one input")
    x = q.input
    bias = _attention_bias(candidate, probe, builder, x, x)
    weights = np.concatenate([p.weight for p in (q, k, v)], axis=1)
    biases = np.concatenate([_bias_or_zeros(p) for p in (q, k, v)])
    attributes = {"num_heads": site.num_heads, "scale": site.scale,
                  "qkv_hidden_sizes": [p.weight.shape[1] for p in (q, k, v)]}
    output = builder.op("Attention", [x, builder.const(weights), builder.const(biases), None, None, bias],
                        attributes, domain=MS_DOMAIN, name=f"{site.name}/Attention")
    return _like_merged(output, site, probe, builder), bias


def lower_to_mha(candidate: Candidate, probe, builder: Builder) -> tuple[ir.Value, ir.Value | None]:
    """Build MultiHeadAttention for `candidate`; returns (output, attention_bias or None)."""
    site = candidate.site
    bias = _attention_bias(candidate, probe, builder, site.q, site.k)
    q, k, v = (_as_3d(x, probe, builder) for x in (site.q, site.k, site.v))
    output = builder.op(
        "MultiHeadAttention",
        [q, k, v, None, None, bias],
        {"num_heads": site.num_heads, "scale": site.scale},
        domain=MS_DOMAIN,
        name=f"{site.name}/MultiHeadAttention",
    )
    return _like_merged(output, site, probe, builder), bias


def projection(value: ir.Value, probe) -> Projection | None:
    """`value` as x @ W (+ b) with constant W [features, width] and b [width], x of rank 3; else None."""
    node = value.producer()
    bias = None
    if node is not None and node.op_type == "Add":
        terms = [constant(x, probe) for x in node.inputs]
        if sum(t is not None for t in terms) != 1:
            return None
        at = 0 if terms[0] is not None else 1
        bias, node = terms[at], node.inputs[1 - at].producer()
    if node is None or node.op_type != "MatMul":
        return None
    x, weight = node.inputs[0], constant(node.inputs[1], probe)
    if weight is None or weight.ndim != 2 or constant(x, probe) is not None or observed(x, probe).ndim != 3:
        return None
    if bias is not None and bias.reshape(-1).shape != weight.shape[1:]:
        return None  # broadcasts along more than the features: not a bias
    return Projection(x, weight, None if bias is None else bias.reshape(-1))


def _bias_or_zeros(p: Projection) -> np.ndarray:
    return p.bias.astype(p.weight.dtype) if p.bias is not None else np.zeros(p.weight.shape[1], p.weight.dtype)


def _attention_bias(candidate: Candidate, probe, builder: Builder, query: ir.Value, key: ir.Value) -> ir.Value | None:
    """The scores' additive bias as [batch or 1, heads or 1, S, T], S and T read from `query` and `key`."""
    dtype = observed(candidate.softmax.inputs[0], probe).dtype
    bias = additive_bias(candidate.steps, candidate.site.num_heads, probe, builder, dtype)
    if bias is None:
        return None
    # Two masks of finfo.min add up to -inf, and a row of -inf makes NaN.
    bias = builder.op("Max", [bias, builder.const(np.finfo(dtype).min, dtype)])
    return builder.op("Expand", [bias, _query_key_shape(query, key, builder)])


def _like_merged(output: ir.Value, site, probe, builder: Builder) -> ir.Value:
    """The fused op's [batch, seq, hidden] in the rank of the merged tensor it replaces."""
    merged = observed(site.output, probe)
    if merged.ndim == 3:
        return output
    return builder.op("Reshape", [output, builder.const([-1, *merged.shape[1:]], np.int64)])


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
    """[batch, seq, heads, head_size] -> [batch, seq, hidden]; rank 3 stays."""
    if observed(value, probe).ndim == 3:
        return value
    return builder.op("Reshape", [value, builder.const([0, 0, -1], np.int64)])


def _query_key_shape(query: ir.Value, key: ir.Value, builder: Builder) -> ir.Value:
    """[1, 1, S, T], read from the query's and the key's [batch, seq, ...] at run time."""
    seq_q = builder.op("Shape", [query], {"start": 1, "end": 2})
    seq_k = builder.op("Shape", [key], {"start": 1, "end": 2})
    return builder.op("Concat", [builder.const([1, 1], np.int64), seq_q, seq_k], {"axis": 0})
