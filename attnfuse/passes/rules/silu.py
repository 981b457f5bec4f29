"""x * sigmoid(alpha * x), however it is spelled -> one op.

    x * sigmoid(x), sigmoid(x) * x, x / (1 + exp(-x))  ->  QuickGelu(x, alpha=1)       (aten.silu in fx)
    x * sigmoid(1.702 * x)                             ->  QuickGelu(x, alpha=1.702)   (ONNX only)

Anchors are every Sigmoid and Exp. The widest elementwise region around one that computes y
from x alone is evaluated on points and its alpha read from the values (core/measure/silu.py),
never parsed; alpha is 1, or the graph's own constant, where it measures so. A gated MLP's
silu(gate) * up keeps its Mul: the region stops where up comes in. aten.silu is one op already.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from attnfuse.core import regions, registry
from attnfuse.core.graph import Graph, Node, Op, Value, nodes_of
from attnfuse.core.measure import silu as measure
from attnfuse.core.measure.activation import points
from attnfuse.core.outcome import Fusion
from attnfuse.core.rule import NoMatch, Replacement
from attnfuse.core.view import View, dtype_of

# What a written-out SiLU is made of, and how far its region reaches from the Sigmoid or Exp.
REGION = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG, Op.RECIPROCAL, Op.EXP, Op.SIGMOID, Op.CAST})
_STEPS = 4


@dataclass
class SiluMatch:
    anchor: Node
    x: Value
    y: Value  # x * sigmoid(alpha * x)
    alpha: float


class Silu:
    name = "silu"

    def anchors(self, graph: Graph, view: View) -> list[Node]:
        return nodes_of(graph, [Op.SIGMOID, Op.EXP])

    def match(self, anchor: Node, graph: Graph, view: View) -> SiluMatch | None:
        outputs = regions.forward(graph, graph.outputs(anchor)[0], REGION, steps=_STEPS)
        for x, y, region in regions.candidates(graph, view, anchor, outputs, REGION):
            alpha = _alpha(region, x, y, graph, view)
            if alpha is not None:
                return SiluMatch(anchor, x, y, alpha)
        return None

    def lower(self, match: SiluMatch, graph: Graph, view: View) -> Iterator[Replacement]:
        b = graph.builder(graph.label(match.anchor))
        yield b.replacement(graph.op_name(registry.SILU), [(match.y, b.silu(match.x, match.alpha))])

    def report(self, anchor: Node, match: SiluMatch | None, graph: Graph) -> Fusion:
        return Fusion(graph.label(anchor), graph.op_name(registry.SILU), False)


def _alpha(region: list[Node], x: Value, y: Value, graph: Graph, view: View) -> float | None:
    """The region evaluated alone on points of x's dtype: the alpha of the x * sigmoid(alpha * x) it
    computes, None if it computes none."""
    dtype = dtype_of(view, x)
    try:
        (got,) = view.evaluate(region, [y], {x: points(dtype)}, view.runs(x)[0])
    except NoMatch:
        return None
    measured = measure.alpha(got, dtype)
    if measured is None:
        return None
    return measure.own_alpha(measured, [view.constant(v) for v in regions.constant_inputs(graph, view, region)], dtype)
