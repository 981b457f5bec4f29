"""ONNX ops that ONNX defines as functions of other ops, written out as those ops: opset 23's
RMSNormalization and RotaryEmbedding (torch.onnx writes them from opset 23).

The rules recognise a norm or a rotary by evaluating the ops that compute it, whoever wrote them; a
single RMSNormalization or RotaryEmbedding node hides that, and ONNX Runtime then runs it apart from the
residual sum before it, or on q and k in their [B, H, S, D] layout between transposes. Written out, each
is one more spelling the rules read: fused with its residual into SkipSimplifiedLayerNormalization, or
into ONNX Runtime's RotaryEmbedding on the packed tokens; written back as the standard op for OpenVINO.
RMSNormalization becomes the schema's own function body for the node's attributes and input types;
RotaryEmbedding is spelled here as that body computes it (x1 * cos - x2 * sin, x2 * cos + x1 * sin on the
rotated halves, the rest passed), with the halves' sizes read from the head size the graph records (the
body reads them with Shape, which the rotary rule's regions do not take). A node whose input types the graph
does not record, or an interleaved or 3-D rotary, stays as it is. An Attention on 3-D q, k and v is
written with its heads split first, the form the ONNX adapter reads as SDPA.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from attnfuse.kernels.onnx_forms import RMS_NORMALIZATION, STANDARD_ATTENTION
from attnfuse.passes.onnx.graph import Builder, attr, opset, replace_node, speaking_opset


def expand_functions(model: ir.Model) -> int:
    """Replace each RMSNormalization and RotaryEmbedding that can be by the ops it is, and each 3-D
    Attention by its heads-first form, in place; returns how many."""
    count = 0
    for graph in model.graphs():
        version = opset(graph)
        with speaking_opset(version):
            for node in list(graph):
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type == RMS_NORMALIZATION.op_type:
                    body = _function_body(node, version)
                    if body is not None:
                        _inline(graph, node, body)
                        count += 1
                elif node.op_type == "RotaryEmbedding":
                    count += _rotate_halves(graph, node)
                elif node.op_type == STANDARD_ATTENTION.op_type:
                    count += _heads_first(graph, node)
    return count


def _heads_first(graph: ir.Graph, node: ir.Node) -> bool:
    """An Attention on 3-D q, k, v ([B, S, heads * size], q_num_heads and kv_num_heads given) as the same op on
    q, k and v split into heads first, which the ONNX adapter reads as SDPA; whether it was. Not with a cache,
    or with its other outputs read."""
    heads, kv_heads = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
    if heads is None or kv_heads is None or len(node.inputs) < 3 or any(x is not None for x in node.inputs[4:]) \
            or any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return False
    b = Builder(node.name)

    def split(x: ir.Value, count: int) -> ir.Value:  # [B, S, count * size] -> [B, count, S, size]
        shaped = b.op("Reshape", [x, b.const([0, 0, count, -1], np.int64)])
        return b.op("Transpose", [shaped], {"perm": [0, 2, 1, 3]})

    q, k, v = split(node.inputs[0], heads), split(node.inputs[1], kv_heads), split(node.inputs[2], kv_heads)
    kept = {name: attribute for name, attribute in node.attributes.items()
            if name not in ("q_num_heads", "kv_num_heads")}
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    attended = b.op(STANDARD_ATTENTION.op_type, [q, k, v, *([mask] if mask is not None else [])], kept)
    y = b.op("Reshape", [b.op("Transpose", [attended], {"perm": [0, 2, 1, 3]}), b.const([0, 0, -1], np.int64)])
    replace_node(graph, node, b.nodes, [y])
    return True


def _rotate_halves(graph: ir.Graph, node: ir.Node) -> bool:
    """A RotaryEmbedding on [B, H, S, D] (not interleaved) written out; whether it was."""
    x, cos, sin, positions = [*node.inputs, None][:4]
    if x is None or x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[-1], int) \
            or attr(node, "interleaved", 0):
        return False
    head = x.shape[-1]
    rotated = attr(node, "rotary_embedding_dim", 0) or head
    half = rotated // 2
    b = Builder(node.name)

    def part(start: int, end: int) -> ir.Value:
        return b.op("Slice", [x, b.const([start], np.int64), b.const([end], np.int64), b.const([-1], np.int64)])

    def per_token(table: ir.Value) -> ir.Value:  # [B, S, half] (gathered by position where given) -> [B, 1, S, half]
        rows = b.op("Gather", [table, positions]) if positions is not None else table
        return b.op("Unsqueeze", [rows, b.const([1], np.int64)])

    x1, x2, c, s = part(0, half), part(half, rotated), per_token(cos), per_token(sin)
    pieces = [b.op("Sub", [b.op("Mul", [x1, c]), b.op("Mul", [x2, s])]),
              b.op("Add", [b.op("Mul", [x2, c]), b.op("Mul", [x1, s])])]
    if rotated < head:
        pieces.append(part(rotated, head))
    y = b.op("Concat", pieces, {"axis": -1})
    replace_node(graph, node, b.nodes, [y])
    return True


def _function_body(node: ir.Node, version: int) -> ir.Function | None:
    types = []
    for value in node.inputs:
        if value is None:
            types.append(b"")
            continue
        if value.dtype is None or value.shape is None:
            return None
        dims = [d if isinstance(d, int) else f"d{i}" for i, d in enumerate(value.shape)]
        types.append(helper.make_tensor_type_proto(value.dtype.value, dims).SerializeToString())
    try:
        schema = onnx.defs.get_schema(node.op_type, version, "")
        proto = ir.serde.serialize_node(node).SerializeToString()
        body = onnx.FunctionProto.FromString(schema.get_context_dependent_function(proto, types))
    except Exception:  # an opset or form ONNX does not define a body for: the node stays
        return None
    return ir.serde.deserialize_function(body) if len(body.node) else None


def _inline(graph: ir.Graph, node: ir.Node, body: ir.Function) -> None:
    """`node` replaced by `body`'s nodes, reading `node`'s inputs and giving its outputs' names and readers."""
    for inner, outer in zip(body.inputs, node.inputs):
        if outer is not None:
            inner.replace_all_uses_with(outer)
    nodes = list(body)
    body.graph.remove(nodes)
    for i, inner_node in enumerate(nodes):
        inner_node.name = f"{node.name}/{i}_{inner_node.op_type}"
        for out in inner_node.outputs:
            out.name = f"{node.name}/{out.name}"
    replace_node(graph, node, nodes, body.outputs)
