"""Gelu, however it is spelled, with its bias folded in -> one fused bias + gelu.

    gelu(h + b)            ->  BiasGelu(h, b) / FastGelu(h, b)    (attnfuse::bias_gelu in fx)
    gelu(linear(x, W, b))  ->  bias_gelu(linear(x, W), b)

A gelu is ONNX's Gelu op, aten.gelu, or any elementwise region around an Erf or a Tanh that
computes gelu exactly or in the tanh approximation: the region is evaluated on points and
compared with both (core/measure/gelu.py), never parsed. b is a constant vector over the last
axis; a linear's own bias moves into the fused op when nothing else reads the linear.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from attnfuse.core import regions, registry
from attnfuse.core.graph import Graph, Node, Op, Value, nodes_of
from attnfuse.core.measure import gelu as measure
from attnfuse.core.measure.activation import points
from attnfuse.core.measure.gelu import Approximation
from attnfuse.core.outcome import Fusion
from attnfuse.core.rule import NoMatch, Replacement
from attnfuse.core.view import View, dtype_of
from attnfuse.passes.rules.patterns import bias_add, read_elsewhere

# What a written-out gelu is made of, and how far its region reaches from the Erf or Tanh.
REGION = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.SQRT, Op.ERF, Op.TANH, Op.CAST})
_STEPS = 5


@dataclass
class GeluMatch:
    anchor: Node
    y: Value  # gelu(x)
    approximate: Approximation
    h: Value  # x without its bias (the linear's input, with `weight`)
    bias: Value | None
    weight: Value | None = None  # x = linear(h, weight, bias): the fused op reads linear(h, weight)


class Gelu:
    name = "bias_gelu"

    def anchors(self, graph: Graph, view: View) -> list[Node]:
        return nodes_of(graph, [Op.GELU, Op.ERF, Op.TANH])

    def match(self, anchor: Node, graph: Graph, view: View) -> GeluMatch | None:
        found = _gelu_op(anchor, graph) if graph.op(anchor) is Op.GELU else _written_out(anchor, graph, view)
        if found is None:
            return None
        x, y, approximate, region = found
        return GeluMatch(anchor, y, approximate, *_without_bias(x, region, graph, view))

    def lower(self, match: GeluMatch, graph: Graph, view: View) -> Iterator[Replacement]:
        b = graph.builder(graph.label(match.anchor))
        h = match.h if match.weight is None else b.linear(match.h, match.weight)
        y = b.bias_gelu(h, match.bias, match.approximate)
        yield b.replacement(_op_name(match, graph), [(match.y, y)])

    def report(self, anchor: Node, match: GeluMatch | None, graph: Graph) -> Fusion:
        return Fusion(graph.label(anchor), _op_name(match, graph), False)


def _gelu_op(node: Node, graph: Graph):
    try:
        approximate = Approximation(graph.attribute(node, "approximate"))
    except ValueError:
        raise NoMatch(f"gelu with approximate={graph.attribute(node, 'approximate')!r}") from None
    return graph.operands(node)[0], graph.outputs(node)[0], approximate, [node]


def _written_out(core: Node, graph: Graph, view: View):
    """(x, y, approximation, region) for the widest elementwise region around `core` that computes
    y = gelu(x); None if none does."""
    outputs = regions.forward(graph, graph.outputs(core)[0], REGION, steps=_STEPS)
    for x, y, region in regions.candidates(graph, view, core, outputs, REGION, same_dtype=False):
        approximate = _which(region, x, y, view)
        if approximate is not None:
            return x, y, approximate, region
    return None


def _which(region: list[Node], x: Value, y: Value, view: View) -> Approximation | None:
    """The region evaluated alone on points of x's dtype: which gelu it computes."""
    dtype = dtype_of(view, x)
    try:
        (got,) = view.evaluate(region, [y], {x: points(dtype)}, view.runs(x)[0])
    except NoMatch:
        return None
    return measure.which(got, dtype)


def _without_bias(x: Value, region: list[Node], graph: Graph, view: View) -> tuple[Value, Value | None, Value | None]:
    """(h, bias, weight): x = h + bias with a constant vector bias, or x = linear(h, weight, bias)
    read by the gelu alone; else (x, None, None)."""
    split = bias_add(graph, view, x)
    if split is not None:
        return split[0], split[1], None
    linear = graph.producer(x)
    if linear is not None and graph.op(linear) is Op.LINEAR and not read_elsewhere(graph, x, region):
        h, weight, bias = graph.operands(linear)
        if bias is not None:
            return h, bias, weight
    return x, None, None


def _op_name(match: GeluMatch | None, graph: Graph) -> str:
    if match is None:
        return graph.op_name(registry.BIAS_GELU)
    return graph.op_name(registry.BIAS_GELU, registry.gelu_form(match.approximate, match.bias is not None))
