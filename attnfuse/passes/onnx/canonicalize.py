"""Canonicalise: take out ops that do not change values, so matchers see fewer spellings."""
from __future__ import annotations

import onnx_ir as ir

from attnfuse.passes.onnx.graph import observed


def canonicalize(graph: ir.Graph, probe) -> None:
    for node in list(graph):
        if _is_noop(node, probe):
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            graph.remove(node, safe=True)


def _is_noop(node: ir.Node, probe) -> bool:
    if node.domain not in ("", "ai.onnx") or node.outputs[0].is_graph_output():
        return False
    if node.op_type == "Identity" or (node.op_type == "Concat" and len(node.inputs) == 1):
        return True
    if node.op_type == "Dropout":  # inference: Dropout is the identity
        return len(node.outputs) == 1 or not node.outputs[1].uses()
    if node.op_type == "Cast" and node.inputs[0] is not None:
        try:
            return observed(node.inputs[0], probe).dtype == observed(node.outputs[0], probe).dtype
        except Exception:
            return False
    return False
