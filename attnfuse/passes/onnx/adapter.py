"""An onnx_ir graph as the rules see it (core/graph.py): ONNX ops mapped onto canonical ones,
navigation that ignores nodes a rewrite built but did not commit, and commits.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from attnfuse.core import registry
from attnfuse.core.facts import spelled_op
from attnfuse.core.graph import Op
from attnfuse.core.outcome import Rotary, RotaryKind
from attnfuse.core.rule import Replacement
from attnfuse.kernels.onnx_forms import ROTARY_EMBEDDING, STANDARD_ATTENTION
from attnfuse.passes.onnx import attention_lowering
from attnfuse.passes.onnx.graph import attr, constant, replace_uses
from attnfuse.passes.onnx.spelling import OnnxBuilder

_OPS = {
    "Add": Op.ADD, "Sub": Op.SUB, "Mul": Op.MUL, "Div": Op.DIV, "Pow": Op.POW, "Neg": Op.NEG, "Sqrt": Op.SQRT,
    "Reciprocal": Op.RECIPROCAL, "Exp": Op.EXP, "Erf": Op.ERF, "Tanh": Op.TANH, "Sigmoid": Op.SIGMOID,
    "Cast": Op.CAST, "CastLike": Op.CAST, "Identity": Op.IDENTITY, "Dropout": Op.IDENTITY, "Where": Op.WHERE,
    "IsNaN": Op.ISNAN, "ReduceMean": Op.REDUCE_MEAN, "ReduceSum": Op.REDUCE_SUM,
    "ReduceSumSquare": Op.REDUCE_SUM_SQUARE, "ReduceL2": Op.REDUCE_L2, "Reshape": Op.RESHAPE, "Flatten": Op.RESHAPE,
    "Transpose": Op.TRANSPOSE, "Squeeze": Op.SQUEEZE, "Unsqueeze": Op.UNSQUEEZE, "Expand": Op.EXPAND,
    "Tile": Op.EXPAND, "Slice": Op.SLICE, "Split": Op.SPLIT, "Concat": Op.CONCAT, "Gather": Op.GATHER,
    "Shape": Op.SHAPE, "MatMul": Op.MATMUL, "Softmax": Op.SOFTMAX, "LayerNormalization": Op.LAYER_NORM,
    "Gelu": Op.GELU,
}
# ONNX's default attribute values, where an op's canonical reading needs one.
_EPSILON = 1e-5


class OnnxGraph:
    """One onnx_ir graph (the model's, or a subgraph) through canonical ops; `mask` is the model's padding
    mask input (a subgraph reads it from the model's graph); `standard`: its builders write standard ONNX
    ops only (spelling.py)."""

    def __init__(self, graph: ir.Graph, view, mask: ir.Value | None = None, standard: bool = False):
        self.graph, self.view, self.mask, self.standard = graph, view, mask, standard

    def nodes(self) -> list[ir.Node]:
        return list(self.graph)

    def op(self, node: ir.Node) -> Op | None:
        if spelled_op(node) is not None:
            return Op.FUSED
        if _is_sdpa(node):
            return Op.SDPA
        if node.domain in ("", "ai.onnx"):
            found = _OPS.get(node.op_type)
            if found is not None:
                return found
        return Op.FUSED if registry.of_onnx(node.domain, node.op_type) is not None else None

    def operands(self, node: ir.Node) -> list[ir.Value | None]:
        if _is_sdpa(node):  # (q, k, v, mask)
            return [*node.inputs, None, None, None, None][:4]
        return list(node.inputs)

    def outputs(self, node: ir.Node) -> list[ir.Value]:
        return list(node.outputs)

    def producer(self, value: ir.Value) -> ir.Node | None:
        return value.producer() if value is not None else None

    def users(self, value: ir.Value) -> list[ir.Node]:
        """Readers in a graph: a node a rewrite built and did not commit is none."""
        found: list[ir.Node] = []
        for use in value.uses():
            if use.node.graph is not None and not any(use.node is n for n in found):
                found.append(use.node)
        return found

    def is_output(self, value: ir.Value) -> bool:
        return value.is_graph_output()

    def is_input(self, value: ir.Value) -> bool:
        return value.is_graph_input()

    def stored_elsewhere(self, value: ir.Value) -> bool:
        return isinstance(value.const_value, ir.ExternalTensor)

    def label(self, node: ir.Node) -> str:
        return node.name

    def axes(self, node: ir.Node) -> tuple[int, ...] | None:
        if node.op_type == "LayerNormalization":
            return (attr(node, "axis", -1),)
        if node.op_type == "Softmax":
            return (attr(node, "axis", -1 if self._opset() >= 13 else 1),)
        axes = attr(node, "axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = constant(node.inputs[1], self.view.probe)
        return None if axes is None else tuple(int(a) for a in np.asarray(axes).reshape(-1))

    def keepdims(self, node: ir.Node) -> bool:
        return bool(attr(node, "keepdims", 1))

    def attribute(self, node: ir.Node, name: str, default: Any = None) -> Any:
        if name == "epsilon":
            return attr(node, "epsilon", _EPSILON)
        if name == "approximate":
            return attr(node, "approximate", "none")
        if name == "fused_op":
            found = registry.of_onnx(node.domain, node.op_type)
            return spelled_op(node) or (found[0] if found else default)
        if name == "fused_attention":  # fused attention the model came with: its domain and type
            return f"{node.domain}.{node.op_type}" if registry.is_fused_attention(node.domain, node.op_type) \
                and not _is_sdpa(node) else default
        if name == "causal" and _is_sdpa(node):
            return bool(attr(node, "is_causal", 0))
        if name == "rotary" and (node.domain, node.op_type) == (ROTARY_EMBEDDING.domain, ROTARY_EMBEDDING.op_type):
            kind = RotaryKind.INTERLEAVED if attr(node, "interleaved", 0) else RotaryKind.HALF
            return Rotary(kind, attr(node, "rotary_embedding_dim", 0))  # 0: every dim of each head
        return attr(node, name, default)

    def alive(self, node: ir.Node) -> bool:
        return node.graph is not None and any(out.is_graph_output() or self.users(out) for out in node.outputs)

    def op_name(self, op: registry.FusedOp, form: registry.OnnxForm | None = None) -> str:
        return (form or op.onnx[0]).op_type

    def builder(self, label: str) -> OnnxBuilder:
        return OnnxBuilder(label, self.view, self.standard)

    def settle(self) -> None:
        """Nodes built and not committed are in no graph: navigation skips them, remove_unused drops them."""

    def commit(self, replacement: Replacement) -> None:
        """Insert the nodes after the last node that made a claimed value, and point the claimed values'
        readers at their replacements. (The pass sorts the graph at its end: a new node may read a
        value made further down.) Nodes an earlier rewrite committed, which this one shares, stay where they are."""
        order = {id(node): i for i, node in enumerate(self.graph)}
        makers = [old.producer() for old, _ in replacement.claims if old.producer() is not None]
        after = max(makers, key=lambda node: order.get(id(node), -1))
        self.graph.insert_after(after, [node for node in replacement.nodes if node.graph is None])
        for weight in replacement.builder.initializers:
            self.graph.register_initializer(weight)
        for old, new in replacement.claims:
            replace_uses(old, new)

    def padding_mask(self) -> ir.Value | None:
        return self.mask

    def attention_lowerings(self, match, view, options):
        return attention_lowering.lowerings(match, self, view, options)

    def _opset(self) -> int:
        return self.view.opset


def _is_sdpa(node: ir.Node) -> bool:
    """ONNX's own Attention (opset 23; torch.onnx writes it for scaled_dot_product_attention) as plain
    SDPA(q, k, v, mask): q, k and v with their heads first (no q_num_heads: 3-D inputs), no cache, no
    soft cap, and only its output read. The rules match it like any attention and write the target's op
    (ONNX Runtime runs its MultiHeadAttention faster than this op; padding-free packs it)."""
    if (node.domain, node.op_type) != (STANDARD_ATTENTION.domain, STANDARD_ATTENTION.op_type):
        return False
    extra_inputs = [x for x in node.inputs[4:] if x is not None]
    extra_outputs = [out for out in node.outputs[1:] if out.uses() or out.is_graph_output()]
    return not extra_inputs and not extra_outputs and not attr(node, "softcap", 0.0) \
        and attr(node, "q_num_heads") is None and attr(node, "kv_num_heads") is None
