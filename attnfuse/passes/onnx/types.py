"""Element types for the values the rewrites made, which the builders leave untyped.

ONNX Runtime infers what a file leaves out, but tools that read the file do not: quantize_dynamic
writes the Cast after each MatMulInteger with the MatMul output's recorded type, and inside If
branches (where padding-free puts every MatMul) an untyped output gave `Cast(to=0)`, a model that
does not load. So every value gets its element type before the model leaves the passes: standard
ops by ONNX's own inference from their inputs' types, attnfuse's fused ops and quantized MatMuls (contrib
ops, whose schemas ONNX does not have) the type of their first floating-point input for their first
output, an If the types of its branch's outputs. Other contrib ops (QLinearAdd: int8 out) stay untyped
for the runtime to infer. Shapes are left as they are.
"""
from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import helper, shape_inference

from attnfuse.core import registry
from attnfuse.passes.onnx import quantized
from attnfuse.passes.onnx.graph import opset

_CONTROL_FLOW = ("If", "Loop", "Scan")


def fill_types(model: ir.Model) -> None:
    """Give each untyped output of every node in `model` its element type where its inputs tell it."""
    version = opset(model.graph)
    for _ in range(2):  # a branch reads outer values, and an If's outputs are its branch's: twice settles both
        for graph in model.graphs():
            for node in graph:
                if any(value.dtype is None for value in node.outputs):
                    for value, dtype in zip(node.outputs, _output_types(node, version)):
                        if value.dtype is None and dtype is not None:
                            value.dtype = dtype


def _output_types(node: ir.Node, version: int) -> list[ir.DataType | None]:
    if node.op_type == "If" and node.domain in ("", "ai.onnx"):
        branch = node.attributes["then_branch"].value
        return [value.dtype for value in branch.outputs]
    if node.domain not in ("", "ai.onnx"):
        if not _float_in_float_out(node):  # QLinearAdd and the like: the type is the runtime's to infer
            return []
        floats = [value.dtype for value in node.inputs if value is not None and value.dtype is not None
                  and value.dtype.is_floating_point()]
        return floats[:1]
    if node.op_type in _CONTROL_FLOW or any(value is not None and value.dtype is None for value in node.inputs):
        return []
    try:
        schema = onnx.defs.get_schema(node.op_type, version, "")
        proto = ir.serde.serialize_node(node)
        types = {value.name: helper.make_tensor_type_proto(value.dtype.value, None)
                 for value in node.inputs if value is not None}
        inferred = shape_inference.infer_node_outputs(schema, proto, types)
    except Exception:  # an op or opset ONNX cannot infer here: the value stays untyped, as it came
        return []
    elements = [inferred[value.name].tensor_type.elem_type if value.name in inferred else 0 for value in node.outputs]
    return [ir.DataType(element) if element else None for element in elements]  # 0: ONNX could not tell


def _float_in_float_out(node: ir.Node) -> bool:
    """A fused op of attnfuse's, or a quantized MatMul: its first output has its first float input's type."""
    found = quantized.quantized(node)
    return registry.of_onnx(node.domain, node.op_type) is not None or (found is not None and found.matmul)
