"""Padding-free execution (after ByteTransformer): run token-wise ops on the real tokens only.

The real tokens are gathered once, where the first token-wise op reads a
[batch, seq, ...] activation, into [1, tokens, ...]: a batch of one sequence, so
every op keeps the rank it had. Token-wise ops (projections, bias adds, residual
adds, layernorms, gelus and their fused forms) then run on those rows. An op that
needs the padded layout (attention, pooling, a graph output, a Shape reader) gets
it back by one Gather from the packed rows plus a zero row: padded positions of
a restored tensor are zero.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attnfuse.passes.onnx.graph import MS_DOMAIN, Builder, NoMatch, attr, constant, replace_uses

NAME = "padding-free"

_UNARY = {"Cast", "Erf", "Tanh", "Relu", "Sigmoid", "Gelu", "Neg", "Sqrt", "Exp", "Softplus", "Identity", "FastGelu"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "BiasGelu", "FastGelu"}


def find_mask(graph: ir.Graph) -> ir.Value | None:
    """The padding mask input: rank 2, integer or bool, named as a mask."""
    for value in graph.inputs:
        dtype = value.dtype
        if "mask" in (value.name or "").lower() and value.shape is not None and len(value.shape) == 2 \
                and dtype is not None and (dtype.is_integer() or dtype == ir.DataType.BOOL):
            return value
    return None


class Layout:
    """Which values are token-major ([batch, seq, ...] float activations) and their ranks."""

    def __init__(self, probe, mask: ir.Value):
        self.probe = probe
        self.sizes = [probe.inputs(run).feeds[mask.name].shape for run in (0, 1)]
        self._rank: dict[int, int] = {}

    def rank(self, value: ir.Value | None) -> int:
        """The rank of a token-major value, 0 for anything else."""
        if value is None:
            return 0
        if id(value) not in self._rank:
            self._rank[id(value)] = self._observed_rank(value)
        return self._rank[id(value)]

    def set_rank(self, value: ir.Value, rank: int) -> None:
        self._rank[id(value)] = rank

    def _observed_rank(self, value: ir.Value) -> int:
        arrays = [self.probe.get(value.name, run) if value.name else None for run in (0, 1)]
        if any(a is None for a in arrays):
            return self._inferred_rank(value)
        ok = all(a.dtype.kind == "f" and a.ndim >= 3 and a.shape[:2] == tuple(size)
                 for a, size in zip(arrays, self.sizes))
        return arrays[0].ndim if ok else 0

    def _inferred_rank(self, value: ir.Value) -> int:
        """Values made by the fusion passes were never observed: follow their producer."""
        node = value.producer()
        if node is None:
            return 0
        if node.op_type == "EmbedLayerNormalization":
            return 3 if value.index() in (0, 2) else 0
        if node.op_type == "MultiHeadAttention":
            return self.rank(node.inputs[0]) if value.index() == 0 else 0
        if is_token_wise(node, self, self.probe):
            return max(self.rank(x) for x in node.inputs if x is not None)
        return 0


def is_token_wise(node: ir.Node, layout: Layout, probe) -> bool:
    """Each output token depends only on the same token of the inputs (and constants)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx", MS_DOMAIN) or len(node.outputs) == 0:
        return False
    if node.domain == MS_DOMAIN and op not in ("SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu"):
        return False
    inputs = [x for x in node.inputs if x is not None]
    token_major = [x for x in inputs if layout.rank(x)]
    if not token_major:
        return False
    if op == "MatMul":
        weight = constant(node.inputs[1], probe)
        return layout.rank(node.inputs[0]) > 0 and weight is not None and weight.ndim == 2
    if op == "LayerNormalization":
        return attr(node, "axis", -1) == -1 and layout.rank(node.inputs[0]) > 0 \
            and all(_broadcasts_per_token(x, probe) for x in inputs[1:])
    if op == "SkipLayerNormalization":
        return all(layout.rank(x) or _broadcasts_per_token(x, probe) for x in inputs)
    if op in _UNARY or op in _ELEMENTWISE:
        rank = max(layout.rank(x) for x in token_major)
        return all(layout.rank(x) == rank or _broadcasts_per_token(x, probe) for x in inputs)
    return False


def _broadcasts_per_token(value: ir.Value, probe) -> bool:
    """A constant that is the same for every token (shape [H], [1, 1, H], ...)."""
    array = constant(value, probe)
    return array is not None and (array.ndim <= 1 or all(d == 1 for d in array.shape[:-1]))


class Packer:
    """Makes (and caches) the packed and padded forms of values."""

    def __init__(self, graph: ir.Graph, mask: ir.Value, layout: Layout):
        self.graph, self.layout = graph, layout
        self._packed: dict[int, ir.Value] = {}
        self._padded: dict[int, ir.Value] = {}
        b = Builder(NAME)
        flat = b.op("Reshape", [mask, b.const([-1], np.int64)])
        real = b.op("Not", [b.op("Equal", [flat, b.op("CastLike", [b.const(0, np.int64), flat])])])
        self.index = b.op("Reshape", [b.op("NonZero", [real]), b.const([-1], np.int64)])  # [tokens]
        tokens = b.op("Shape", [self.index])
        position = b.op("Sub", [b.op("CumSum", [b.op("Cast", [real], {"to": ir.DataType.INT64}), b.const(0, np.int64)]),
                                b.const(1, np.int64)])
        self.scatter = b.op("Where", [real, position, b.op("Squeeze", [tokens, b.const([0], np.int64)])])
        self.batch_seq = b.op("Shape", [mask])
        graph.insert_before(next(iter(graph)), b.nodes)

    def is_packed(self, value: ir.Value) -> bool:
        return id(value) in self._packed and self._packed[id(value)] is value

    def mark_packed(self, value: ir.Value, rank: int) -> None:
        self._packed[id(value)] = value
        self.layout.set_rank(value, rank)

    def packed(self, value: ir.Value) -> ir.Value:
        """[B, S, ...] -> [1, tokens, ...]"""
        if id(value) not in self._packed:
            b = Builder(f"{NAME}/pack")
            rows = b.op("Reshape", [value, b.op("Concat", [b.const([-1], np.int64), b.op("Shape", [value], {"start": 2})], {"axis": 0})])
            packed = b.op("Unsqueeze", [b.op("Gather", [rows, self.index], {"axis": 0}), b.const([0], np.int64)])
            self._insert_after(value, b)
            self.mark_packed(packed, self.layout.rank(value))
            self._packed[id(value)] = packed
        return self._packed[id(value)]

    def padded(self, value: ir.Value) -> ir.Value:
        """[1, tokens, ...] -> [B, S, ...], zeros at padded positions."""
        if id(value) not in self._padded:
            rank = self.layout.rank(value)
            b = Builder(f"{NAME}/restore")
            rows = b.op("Squeeze", [value, b.const([0], np.int64)])
            pads = np.zeros(2 * (rank - 1), np.int64)
            pads[rank - 1] = 1  # one zero row after the last token
            with_zero = b.op("Pad", [rows, b.const(pads)])
            gathered = b.op("Gather", [with_zero, self.scatter], {"axis": 0})
            shape = b.op("Concat", [self.batch_seq, b.op("Shape", [value], {"start": 2})], {"axis": 0})
            self._padded[id(value)] = b.op("Reshape", [gathered, shape])
            self._insert_after(value, b)
        return self._padded[id(value)]

    def padded_shape(self, value: ir.Value) -> ir.Value:
        b = Builder(f"{NAME}/shape")
        shape = b.op("Concat", [self.batch_seq, b.op("Shape", [value], {"start": 2})], {"axis": 0})
        self._insert_after(value, b)
        return shape

    def _insert_after(self, value: ir.Value, builder: Builder) -> None:
        producer = value.producer()
        if producer is None:
            self.graph.insert_before(next(iter(self.graph)), builder.nodes)
        else:
            self.graph.insert_after(producer, builder.nodes)


def apply(graph: ir.Graph, probe) -> None:
    """Rewrite `graph` to run its token-wise ops on real tokens only. Raises NoMatch."""
    mask = find_mask(graph)
    if mask is None:
        raise NoMatch("the model has no attention-mask input")
    layout = Layout(probe, mask)
    packer = Packer(graph, mask, layout)
    token_wise_ops = 0
    for node in list(graph):
        if node.name and node.name.startswith(NAME):
            continue
        if is_token_wise(node, layout, probe):
            rank = max(layout.rank(x) for x in node.inputs if x is not None)
            for i, x in enumerate(node.inputs):
                if x is not None and layout.rank(x):
                    node.replace_input_with(i, packer.packed(x))
            for out in node.outputs:
                packer.mark_packed(out, rank)
            token_wise_ops += 1
        else:
            for i, x in enumerate(node.inputs):
                if x is not None and packer.is_packed(x):
                    if node.op_type == "Shape" and not node.attributes:
                        replace_uses(node.outputs[0], packer.padded_shape(x))
                    else:
                        node.replace_input_with(i, packer.padded(x))
    if token_wise_ops == 0:
        raise NoMatch("no token-wise op reads a [batch, seq, ...] activation")
    for i, output in enumerate(list(graph.outputs)):
        if packer.is_packed(output):
            restored = packer.padded(output)
            restored.name, output.name = output.name, f"{output.name}__packed"
            restored.type, restored.shape = output.type, output.shape
            graph.outputs[i] = restored
