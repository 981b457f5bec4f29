"""Several projections of one activation by stored weights -> one product, split.

    x @ W_1 (+ b_1), ..., x @ W_n (+ b_n)   ->  split(x @ [W_1 | ... | W_n] (+ [b_1 | ... | b_n]))

A projection is a MatMul of x by a stored 2-D weight [in, out] (ONNX; aten.matmul / mm in fx) or a
linear (weight [out, in], with its own bias), its bias the constant vector an Add alone adds to
it. All the projections of the same x become one: q, k and v of an attention, gate and up of a
gated MLP, the cross-attention k and v of every decoder layer reading the encoder's output. The
weights are concatenated along their outputs (a projection without a bias adds zeros), and the
product is split back into the pieces, each claimed equal to the projection it replaces. A
lone projection (Phi-3's and ModernBERT's qkv, fused already) is left as it is, and so is a
weight the graph computes or takes as an input (a dequantized weight, a LoRA sum): it is not
stored, and concatenating it would copy it on every run.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from attnfuse.core.graph import Graph, Node, Op, Value, single_user
from attnfuse.core.outcome import Fusion
from attnfuse.core.rule import NoMatch, Replacement
from attnfuse.core.view import View, dtype_of
from attnfuse.passes.rules.patterns import bias_add

OP = "MatMul + Split"  # what the report calls the fused projection: standard ops, no fused op of the registry


@dataclass(frozen=True)
class Projection:
    """One projection of x: x @ weight (+ bias)."""

    node: Node  # the MatMul or linear
    weight: Value  # stored: [in, out], or [out, in] for a linear
    out_in: bool  # the weight is laid out [out, in] (a linear's)
    bias: Value | None  # a constant vector [width]
    output: Value  # what its piece of the fused product replaces: the sum with the bias, else the product
    width: int


@dataclass
class ProjectionsMatch:
    anchor: Node  # the first projection of x
    x: Value
    projections: list[Projection]  # in graph order

    def bias(self, view: View) -> np.ndarray | None:
        """The biases end to end (zeros for a projection without one); None when none has one."""
        if all(p.bias is None for p in self.projections):
            return None
        dtype = dtype_of(view, self.x)
        return np.concatenate([np.zeros(p.width, dtype) if p.bias is None else view.constant(p.bias).astype(dtype)
                               for p in self.projections])


class Projections:
    name = "projections"

    def __init__(self):
        self._here: set[int] = set()  # the nodes of the graph being rewritten (not of its subgraphs)

    def anchors(self, graph: Graph, view: View) -> list[Node]:
        """The first projection of each activation that has several."""
        nodes = graph.nodes()
        self._here = {id(node) for node in nodes}
        found, seen = [], set()
        for node in nodes:
            if _projection(graph, view, node) is None:
                continue
            x = graph.operands(node)[0]
            if id(x) not in seen:
                seen.add(id(x))
                if len(self._projections_of(graph, view, x)) >= 2:
                    found.append(node)
        return found

    def match(self, anchor: Node, graph: Graph, view: View) -> ProjectionsMatch | None:
        x = graph.operands(anchor)[0]
        projections = self._projections_of(graph, view, x)
        if len(projections) < 2:
            return None
        if any(graph.stored_elsewhere(p.weight) for p in projections):
            # A large model's weights stay in its data file; joined, they would be held twice in memory.
            raise NoMatch("the weights are in external data: joining them would copy them into memory")
        return ProjectionsMatch(anchor, x, projections)

    def lower(self, match: ProjectionsMatch, graph: Graph, view: View) -> Iterator[Replacement]:
        b = graph.builder(graph.label(match.anchor))
        pieces = b.projections(match.x, match.projections, match.bias(view))
        yield b.replacement(OP, [(p.output, piece) for p, piece in zip(match.projections, pieces)])

    def report(self, anchor: Node, match: ProjectionsMatch | None, graph: Graph) -> Fusion:
        return Fusion(graph.label(anchor), OP, False)

    def _projections_of(self, graph: Graph, view: View, x: Value) -> list[Projection]:
        """x's projections in this graph of x's dtype, in graph order."""
        dtype = dtype_of(view, x)
        readers = [node for node in graph.users(x) if id(node) in self._here and graph.operands(node)[0] is x]
        found = [_projection(graph, view, node) for node in readers]
        return [p for p in found if p is not None and view.constant(p.weight).dtype == dtype]


def _projection(graph: Graph, view: View, node: Node) -> Projection | None:
    """`node` as a projection of its first operand by a stored weight; None if it is none."""
    op = graph.op(node)
    if op is Op.LINEAR:
        x, weight, bias = graph.operands(node)
    elif op is Op.MATMUL:
        (x, weight), bias = graph.operands(node)[:2], None
    else:
        return None
    array = _stored(graph, view, weight)
    if array is None or array.ndim != 2 or view.constant(x) is not None:
        return None
    out_in = op is Op.LINEAR
    width = array.shape[0 if out_in else 1]
    if bias is not None and (_stored(graph, view, bias) is None or view.constant(bias).shape != (width,)):
        return None
    output = graph.outputs(node)[0]
    if bias is None:
        output, bias = _bias_added(graph, view, output, width) or (output, None)
    return Projection(node, weight, out_in, bias, output, width)


def _stored(graph: Graph, view: View, value: Value | None) -> np.ndarray | None:
    """The value of a weight the graph stores (no node computes it, no input gives it)."""
    if value is None or graph.producer(value) is not None or graph.is_input(value):
        return None
    return view.constant(value)


def _bias_added(graph: Graph, view: View, product: Value, width: int) -> tuple[Value, Value] | None:
    """(product + bias, bias) when the product's one reader adds a constant vector [width] to it."""
    reader = single_user(graph, product)
    if reader is None or graph.op(reader) is not Op.ADD:
        return None
    total = graph.outputs(reader)[0]
    found = bias_add(graph, view, total)
    if found is None or found[0] is not product or view.constant(found[1]).shape != (width,):
        return None
    return total, found[1]
