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
from attnfuse.passes.onnx.adapter import OnnxGraph
from attnfuse.passes.onnx.graph import MS_DOMAIN, Builder, NoMatch, attr, constant, observed, opset
from attnfuse.passes.onnx.heads import HEADS_FIRST, TOKENS, TOKENS_HEADS, Heads, as_heads_first, as_tokens, repeated
from attnfuse.passes.onnx.view import OrtView
from attnfuse.passes.rules.patterns import bias_add


def lower_to_mha(candidate: Candidate, probe, builder: Builder) -> tuple[ir.Value, ir.Value | None]:
    """Build MultiHeadAttention for `candidate`; returns (output, attention_bias or None)."""
    inputs = attention_inputs(candidate, probe, builder)
    bias = score_bias(candidate, probe, builder, inputs.lengths)
    output = multi_head_attention(candidate, probe, builder, inputs, attention_bias=bias)
    return _guarded(candidate, probe, builder, output, bias), bias


def score_bias(candidate: Candidate, probe, b: Builder, lengths: ir.Value) -> ir.Value | None:
    """What the graph adds to the scores, as a [b or 1, heads or 1, S, T] attention_bias (`lengths`: [S, T]).
    The very numbers the graph adds: two masks of finfo.min add up to -inf, which weighs a key less
    than one of finfo.min in a row that masks every key, as in the original."""
    dtype = observed(candidate.softmax.inputs[0], probe).dtype
    bias = additive_bias(candidate.steps, candidate.site.num_heads, probe, b, dtype)
    if bias is None:
        return None
    return b.op("Expand", [bias, b.op("Concat", [b.const([1, 1], np.int64), lengths], {"axis": 0})])


def _guarded(candidate: Candidate, probe, b: Builder, output: ir.Value, bias: ir.Value | None) -> ir.Value:
    """A row of -inf scores gives NaN; where the original guards it (SDPA), zeros."""
    if bias is None or not candidate.nan_guard:
        return output
    dtype = observed(candidate.site.output, probe).dtype
    return b.op("Where", [b.op("IsNaN", [output]), b.const(np.zeros((), dtype)), output])


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
    sizes = (site.head_size, site.head_size, candidate.value_size)
    q_tokens = as_tokens(b, q, sizes[0])
    seq_q = b.op("Shape", [q_tokens], {"start": 1, "end": 2})
    if all(x.layout in (TOKENS, TOKENS_HEADS) and x.heads == site.num_heads for x in (k, v)):
        qkv = [q_tokens, as_tokens(b, k, sizes[1]), as_tokens(b, v, sizes[2])]
        seq_k = b.op("Shape", [qkv[1]], {"start": 1, "end": 2})
        (qkv, bias) = _projection_bias(qkv, sizes, site.num_heads, probe, b, candidate.softmax.graph)
        return AttentionInputs(*qkv, bias, b.op("Concat", [seq_q, seq_k], {"axis": 0}))
    groups = site.num_heads // k.heads
    k4, v4 = (repeated(b, as_heads_first(b, x, size), groups) for x, size in ((k, sizes[1]), (v, sizes[2])))
    seq_k = b.op("Shape", [k4], {"start": 2, "end": 3})
    return AttentionInputs(q_tokens, k4, v4, None, b.op("Concat", [seq_q, seq_k], {"axis": 0}))


def cache_concat(x: Heads) -> ir.Node | None:
    """The Concat(past, new) along the length of heads-first k or v (a KV cache), or None."""
    node = x.value.producer()
    if x.layout != HEADS_FIRST or node is None or node.op_type != "Concat" or len(node.inputs) != 2:
        return None
    return node if attr(node, "axis") in (2, -2) else None


def group_query_attention(candidate: Candidate, probe, b: Builder
                          ) -> tuple[list[tuple[ir.Value, ir.Value]], ir.Value | None]:
    """GroupQueryAttention for self-attention whose k and v hold fewer heads than q, or come with a
    KV cache: k and v are not repeated, the cache is appended inside, and the graph's own mask is the
    attention_bias (every cached position counts, so left padding is masked by the bias).
    Returns the claims to prove (the output, and the caches' Concat outputs: present k and v) and
    the attention_bias."""
    site = candidate.site
    q, k, v = candidate.operands
    size, v_size = site.head_size, candidate.value_size
    if v_size != size:
        raise NoMatch("GroupQueryAttention needs one head size for q, k and v")
    concats = [cache_concat(x) for x in (k, v)]
    if any(concats) and not all(concats):
        raise NoMatch("only one of k and v comes with a cache")
    q_tokens = as_tokens(b, q, size)
    if all(concats):
        (past_k, new_k), (past_v, new_v) = (node.inputs for node in concats)
        new = [Heads(value, HEADS_FIRST, k.heads) for value in (new_k, new_v)]
        past_length = b.op("Shape", [past_k], {"start": 2, "end": 3})
    else:
        past_k = past_v = None
        new = [k, v]
        past_length = b.const([0], np.int64)
    key, value = (as_tokens(b, x, size) for x in new)
    batch = b.op("Shape", [q_tokens], {"end": 1})
    length = b.op("Shape", [q_tokens], {"start": 1, "end": 2})
    total = b.op("Add", [past_length, length])
    as_int32 = lambda x: b.op("Cast", [x], {"to": ir.DataType.INT32})  # noqa: E731
    per_row = lambda x: as_int32(b.op("Expand", [x, batch]))  # noqa: E731
    seqlens_k = per_row(b.op("Sub", [total, b.const([1], np.int64)]))
    total_length = as_int32(b.op("Squeeze", [total, b.const([0], np.int64)]))
    attention_bias = score_bias(candidate, probe, b, b.op("Concat", [length, total], {"axis": 0}))
    inputs = [q_tokens, key, value, past_k, past_v, seqlens_k, total_length, None, None, None, attention_bias]
    if past_k is not None:  # every new token is real here: the bias masks what is not
        inputs += [None, None, None, None, None, per_row(length)]
    # With a cache, query_seqlens needs causal=1 (bottom-right, as a cache is): the bias masks the rest.
    attributes = {"num_heads": site.num_heads, "kv_num_heads": k.heads, "scale": site.scale,
                  "causal": int(site.causal or past_k is not None)}
    if site.softcap:
        attributes["softcap"] = site.softcap
    output, present_k, present_v = b.op("GroupQueryAttention", inputs, attributes, domain=MS_DOMAIN, num_outputs=3,
                                        name=f"{site.name}/GroupQueryAttention")
    output = _guarded(candidate, probe, b, like_merged(site, probe, b, output), attention_bias)
    claims = [(site.output, output)]
    if all(concats):
        claims += [(concats[0].outputs[0], present_k), (concats[1].outputs[0], present_v),
                   *_shapes_without(concats, [x for x in inputs if x is not None], probe, b)]
    return claims, attention_bias


def _shapes_without(concats: list[ir.Node], reads: list[ir.Value], probe, b: Builder
                    ) -> list[tuple[ir.Value, ir.Value]]:
    """Graphs read the total length off the cache (the Shape of the Concat, or of its head repeat)
    to build their masks, which this op now reads. Each such Shape, a direct reader of a Concat or one
    that the op's inputs `reads` depend on, is claimed to equal a shape computed from the Concat's
    inputs, dim by dim as every probe run shows it (a constant, or a dim of the Concat's output), so
    that the Concat can go and no cycle is made. NoMatch if a dim is neither."""
    claims = []
    for concat in concats:
        past, new = concat.inputs
        axis = b.const([attr(concat, "axis")], np.int64)
        shape = b.op("Shape", [past])
        length = b.op("Add", [b.op("Gather", [shape, axis]), b.op("Gather", [b.op("Shape", [new]), axis])])
        total = b.op("ScatterElements", [shape, axis, length])  # the Concat's output shape
        for reader in _shape_readers(concat, reads):
            dims = _dims_of(reader.outputs[0], concat.outputs[0], probe)
            pieces = [b.const([dim], np.int64) if kind == "constant" else b.op("Gather", [total, b.const([dim], np.int64)])
                      for kind, dim in dims]
            claims.append((reader.outputs[0], pieces[0] if len(pieces) == 1 else b.op("Concat", pieces, {"axis": 0})))
    return claims


def _shape_readers(concat: ir.Node, reads: list[ir.Value]) -> list[ir.Node]:
    """The graph's Shape nodes that read the Concat's output, directly or through a value made from
    its data, and that are read directly or that `reads` depend on. (A value made from a claimed
    Shape's output reads the new shape, not the Concat.)"""
    direct = [use.node for use in concat.outputs[0].uses() if use.node.op_type == "Shape"]
    upstream, stack, seen = [], list(reads), set()
    while stack:
        node = stack.pop().producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Shape" and _made_from(node.inputs[0], concat):
            upstream.append(node)
            continue
        stack += [x for x in node.inputs if x is not None]
    readers = {id(node): node for node in direct + upstream if node.graph is not None}  # not another rewrite's
    return list(readers.values())


def _made_from(value: ir.Value, node: ir.Node) -> bool:
    """Whether `value` is computed from `node`'s outputs other than through their shapes."""
    stack, seen = [value], set()
    while stack:
        producer = stack.pop().producer()
        if producer is None or id(producer) in seen or producer.op_type == "Shape":
            continue
        if producer is node:
            return True
        seen.add(id(producer))
        stack += [x for x in producer.inputs if x is not None]
    return False


def _dims_of(shape: ir.Value, concat_output: ir.Value, probe) -> list[tuple[str, int]]:
    """Each entry of `shape` as ("dim", the Concat output's axis it equals) or ("constant", its value),
    the same in every probe run: the same axis first, then a constant, then another axis."""
    runs = probe.runs_seeing(shape.name)
    values = [np.asarray(probe.get(shape.name, run)).reshape(-1) for run in runs]
    totals = [np.asarray(probe.get(concat_output.name, run)).shape for run in runs]
    dims = []
    for i, entries in enumerate(zip(*values)):
        axes = [j for j in range(len(totals[0])) if all(total[j] == entry for total, entry in zip(totals, entries))]
        if i in axes:
            dims.append(("dim", i))
        elif len(set(entries)) == 1:
            dims.append(("constant", int(entries[0])))
        elif axes:
            dims.append(("dim", axes[0]))
        else:
            raise NoMatch(f"{shape.name!r} reads the cache's shape in a way not computed here")
    return dims


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
    return like_merged(site, probe, builder, output)


def like_merged(site, probe, b: Builder, output: ir.Value) -> ir.Value:
    """A fused op's [B, S, hidden] output in the shape of the merged output it replaces."""
    merged = observed(site.output, probe)
    if merged.ndim == 3:
        return output
    return b.op("Reshape", [output, b.const([-1, *merged.shape[1:]], np.int64)])


def _projection_bias(qkv: list[ir.Value], sizes, heads: int, probe, builder: Builder, graph: ir.Graph
                     ) -> tuple[list[ir.Value], ir.Value | None]:
    """When q, k, v are h + b with constant vectors b: the h's and one [3 * hidden] bias."""
    view = OrtView(probe, opset(graph))
    adapter = OnnxGraph(graph, view)
    split = [bias_add(adapter, view, x) or (x, None) for x in qkv]
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
