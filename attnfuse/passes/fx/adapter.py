"""A torch.fx graph of aten ops as the rules see it (core/graph.py): aten ops mapped onto canonical
ones (operands in the canonical order: masked_fill(x, m, v) is where(m, v, x)), navigation, and
commits that keep the graph in a valid order.
"""
from __future__ import annotations

import heapq
import operator
from typing import Any

import torch
import torch.fx as fx

from attnfuse.core import registry
from attnfuse.core.graph import Op
from attnfuse.core.outcome import Rotary, RotaryKind
from attnfuse.core.rule import Replacement
from attnfuse.passes.fx import attention_lowering
from attnfuse.passes.fx.spelling import FxBuilder

aten = torch.ops.aten

_OPS = {
    aten.add.Tensor: Op.ADD, aten.add.Scalar: Op.ADD, aten.sub.Tensor: Op.SUB, aten.sub.Scalar: Op.SUB,
    aten.rsub.Scalar: Op.SUB, aten.rsub.Tensor: Op.SUB, aten.mul.Tensor: Op.MUL, aten.mul.Scalar: Op.MUL,
    aten.div.Tensor: Op.DIV, aten.div.Scalar: Op.DIV, aten.pow.Tensor_Scalar: Op.POW, aten.pow.Tensor_Tensor: Op.POW,
    aten.neg.default: Op.NEG, aten.sqrt.default: Op.SQRT, aten.rsqrt.default: Op.RSQRT,
    aten.reciprocal.default: Op.RECIPROCAL, aten.exp.default: Op.EXP, aten.erf.default: Op.ERF,
    aten.tanh.default: Op.TANH, aten.sigmoid.default: Op.SIGMOID,
    aten.to.dtype: Op.CAST, aten.to.dtype_layout: Op.CAST, aten._to_copy.default: Op.CAST, aten.type_as.default: Op.CAST,
    aten.clone.default: Op.IDENTITY, aten.contiguous.default: Op.IDENTITY, aten.alias.default: Op.IDENTITY,
    aten.detach.default: Op.IDENTITY, aten.dropout.default: Op.IDENTITY,
    aten.where.self: Op.WHERE, aten.where.ScalarOther: Op.WHERE, aten.where.ScalarSelf: Op.WHERE,
    aten.where.Scalar: Op.WHERE, aten.masked_fill.Scalar: Op.WHERE, aten.masked_fill.Tensor: Op.WHERE,
    aten.isnan.default: Op.ISNAN,
    aten.mean.dim: Op.REDUCE_MEAN, aten.sum.dim_IntList: Op.REDUCE_SUM,
    aten.view.default: Op.RESHAPE, aten.reshape.default: Op.RESHAPE, aten._unsafe_view.default: Op.RESHAPE,
    aten.flatten.using_ints: Op.RESHAPE, aten.unflatten.int: Op.RESHAPE,
    aten.transpose.int: Op.TRANSPOSE, aten.permute.default: Op.TRANSPOSE, aten.t.default: Op.TRANSPOSE,
    aten.squeeze.dim: Op.SQUEEZE, aten.squeeze.dims: Op.SQUEEZE, aten.unsqueeze.default: Op.UNSQUEEZE,
    aten.expand.default: Op.EXPAND, aten.repeat.default: Op.EXPAND, aten.repeat_interleave.self_int: Op.EXPAND,
    aten.slice.Tensor: Op.SLICE, aten.select.int: Op.GATHER, aten.index_select.default: Op.GATHER,
    aten.embedding.default: Op.GATHER,
    aten.split.Tensor: Op.SPLIT, aten.split_with_sizes.default: Op.SPLIT, aten.chunk.default: Op.SPLIT,
    aten.unbind.int: Op.SPLIT, aten.cat.default: Op.CONCAT, aten.stack.default: Op.STACK, operator.getitem: Op.ITEM,
    aten.sym_size.int: Op.SHAPE,
    aten.matmul.default: Op.MATMUL, aten.bmm.default: Op.MATMUL, aten.mm.default: Op.MATMUL,
    aten.baddbmm.default: Op.BADDBMM,
    aten.linear.default: Op.LINEAR,
    aten.softmax.int: Op.SOFTMAX, aten._softmax.default: Op.SOFTMAX,
    aten.layer_norm.default: Op.LAYER_NORM, aten.gelu.default: Op.GELU,
    aten.scaled_dot_product_attention.default: Op.SDPA,
}
_REVERSED = {aten.rsub.Scalar, aten.rsub.Tensor}  # rsub(x, y) = y - x


def _nodes_in(args) -> list[fx.Node]:
    found = []
    for a in args:
        if isinstance(a, fx.Node):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(_nodes_in(a))
    return found


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class FxGraph:
    """An fx graph through canonical ops. Builders put their nodes into the graph at once (fx nodes
    live in a graph); `settle` takes out those no commit used."""

    def __init__(self, graph: fx.Graph, view):
        self.graph, self.view = graph, view
        self._builders: list[FxBuilder] = []

    def nodes(self) -> list[fx.Node]:
        return [node for node in self.graph.nodes if node.op not in ("output",)]

    def op(self, node: fx.Node) -> Op | None:
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        if registry.of_torch(node.target) is not None:
            return Op.FUSED
        found = _OPS.get(node.target)
        if found in (Op.ADD, Op.SUB) and _arg(node, 2, "alpha", 1) != 1:
            return None  # x + alpha * y
        if found is Op.DIV and node.kwargs.get("rounding_mode") is not None:
            return None
        if found is Op.IDENTITY and node.target is aten.dropout.default and _arg(node, 2, "train", False):
            return None
        return found

    def operands(self, node: fx.Node) -> list[Any]:
        found = self.op(node)
        args = node.args
        if node.target in _REVERSED:
            return [args[1], args[0]]
        if found is Op.WHERE and node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            return [args[1], args[2], args[0]]  # masked_fill(x, m, v) = where(m, v, x)
        if found in (Op.CONCAT, Op.STACK):
            return list(args[0])
        if found is Op.LAYER_NORM:
            return [args[0], _arg(node, 2, "weight"), _arg(node, 3, "bias")]
        if found is Op.LINEAR:
            return [args[0], args[1], _arg(node, 2, "bias")]
        if found is Op.GATHER and node.target is aten.embedding.default:
            return [args[0], args[1]]  # embedding(table, indices)
        if found is Op.SDPA:
            return [args[0], args[1], args[2], _arg(node, 3, "attn_mask")]
        if found is Op.BADDBMM:
            return [args[0], args[1], args[2]]
        if found in (Op.RESHAPE, Op.EXPAND, Op.TRANSPOSE, Op.SLICE, Op.GATHER, Op.SQUEEZE, Op.UNSQUEEZE, Op.SPLIT,
                     Op.REDUCE_MEAN, Op.REDUCE_SUM, Op.SOFTMAX, Op.CAST, Op.IDENTITY, Op.ITEM, Op.SHAPE):
            return [args[0], *_nodes_in(args[1:])]  # the data, then sizes computed in the graph
        return [a for a in args if isinstance(a, (fx.Node, int, float, bool))] if found is not None \
            else _nodes_in(args) + _nodes_in(node.kwargs.values())

    def outputs(self, node: fx.Node) -> list[fx.Node]:
        return [node]

    def producer(self, value) -> fx.Node | None:
        return value if isinstance(value, fx.Node) and value.op == "call_function" else None

    def users(self, value) -> list[fx.Node]:
        if not isinstance(value, fx.Node):
            return []
        return [user for user in value.users if user.op != "output"]

    def is_output(self, value) -> bool:
        return isinstance(value, fx.Node) and any(user.op == "output" for user in value.users)

    def is_input(self, value) -> bool:
        return isinstance(value, fx.Node) and value.op == "placeholder"

    def stored_elsewhere(self, value) -> bool:
        return False  # a module's parameters are in memory

    def label(self, node: fx.Node) -> str:
        return node.name

    def axes(self, node: fx.Node) -> tuple[int, ...] | None:
        found = self.op(node)
        if found is Op.SOFTMAX:
            return (node.args[1],)
        if found is Op.LAYER_NORM:
            return tuple(range(-len(node.args[1]), 0))
        if found in (Op.REDUCE_MEAN, Op.REDUCE_SUM):
            dims = _arg(node, 1, "dim")
            return None if dims is None else tuple(int(d) for d in dims)
        return None

    def keepdims(self, node: fx.Node) -> bool:
        return bool(_arg(node, 2, "keepdim", False))

    def attribute(self, node: fx.Node, name: str, default: Any = None) -> Any:
        if name == "epsilon":
            return _arg(node, 4, "eps", 1e-5)
        if name == "approximate":
            return node.kwargs.get("approximate", "none")
        if name == "fused_op":
            return registry.of_torch(node.target) or default
        if name == "causal" and self.op(node) is Op.SDPA:
            return bool(_arg(node, 5, "is_causal", False))
        if name == "rotary" and registry.of_torch(node.target) is registry.ROTARY:
            # rotary(x, cos, sin, heads, interleaved): cos holds one angle per pair of rotated dims
            cos = self.view.value(node.args[1])
            return Rotary(RotaryKind.INTERLEAVED if node.args[4] else RotaryKind.HALF, 2 * cos.shape[-1])
        return node.kwargs.get(name, default)

    def alive(self, node: fx.Node) -> bool:
        return not node._erased and (bool(node.users) or node.op == "output")

    def op_name(self, op: registry.FusedOp, form: registry.OnnxForm | None = None) -> str:
        return op.name

    def builder(self, label: str) -> FxBuilder:
        builder = FxBuilder(self.graph, self.view, label)
        self._builders.append(builder)
        return builder

    def padding_mask(self) -> fx.Node | None:
        return self.view.mask

    def attention_lowerings(self, match, view, options):
        return attention_lowering.lowerings(match, self, view, options)

    def commit(self, replacement: Replacement) -> None:
        new = set(replacement.nodes)
        for old, value in replacement.claims:
            old.replace_all_uses_with(value, delete_user_cb=lambda user: user not in new)
        replacement.builder.committed = True
        sort(self.graph)

    def settle(self) -> None:
        """Take out the nodes of every builder whose rewrite was not committed."""
        for builder in self._builders:
            if not builder.committed:
                builder.discard()
        self._builders.clear()


def sort(graph: fx.Graph) -> None:
    """Order the nodes so that each follows what it reads, keeping the present order where it may."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    waiting = {node: len(set(node.all_input_nodes)) for node in nodes}
    readers: dict[fx.Node, list[fx.Node]] = {node: [] for node in nodes}
    for node in nodes:
        for source in set(node.all_input_nodes):
            readers[source].append(node)
    ready = [(position[node], node.name, node) for node in nodes if waiting[node] == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        _, _, node = heapq.heappop(ready)
        ordered.append(node)
        for reader in readers[node]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, (position[reader], reader.name, reader))
    if ordered == nodes:
        return
    previous = ordered[0]
    for node in ordered[1:]:
        previous.append(node)
        previous = node
