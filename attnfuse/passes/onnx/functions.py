"""ONNX ops that ONNX defines as functions of other ops, written out as those ops: opset 23's
RMSNormalization (torch.onnx writes it from opset 23).

The rules recognise a norm by evaluating the ops that compute it, whoever wrote them; a single
RMSNormalization node hides that, and ONNX Runtime then runs it apart from the residual sum before it.
Expanded into ONNX's own definition of it (the schema's function body for the node's attributes and
input types), it is one more spelling the normalization rule reads: fused with its residual into ONNX
Runtime's SkipSimplifiedLayerNormalization, or written back as RMSNormalization for OpenVINO.
(RotaryEmbedding's body computes its halves' sizes from Shape, which the rotary rule's regions do not
take: it stays, and ONNX Runtime runs ONNX's op.) A node whose inputs' types the graph does not record
stays as it is.
"""
from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import helper

from attnfuse.passes.onnx.graph import opset, replace_uses

EXPANDED = ("RMSNormalization",)


def expand_functions(model: ir.Model) -> int:
    """Replace each of the EXPANDED ops by its function body, in place; returns how many."""
    count = 0
    for graph in model.graphs():
        version = opset(graph)
        for node in list(graph):
            if node.domain in ("", "ai.onnx") and node.op_type in EXPANDED:
                body = _function_body(node, version)
                if body is not None:
                    _inline(graph, node, body)
                    count += 1
    return count


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
    graph.insert_before(node, nodes)
    for out, inner in zip(node.outputs, body.outputs):
        replace_uses(out, inner, take_name=True)
    graph.remove(node, safe=True)
