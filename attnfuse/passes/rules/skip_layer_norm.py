"""Residual + bias + LayerNorm -> one skip layernorm.

    layernorm(h + bias + skip)  ->  SkipLayerNormalization(h, skip, gamma, beta, bias)

h and skip are activations of the sum's shape (the residual stream and a sublayer's output),
bias a constant vector. The fused op also gives the sum back, which replaces it where anything
else reads it (the next residual).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from attnfuse.core import registry
from attnfuse.core.graph import Graph, Node, Op, Value, nodes_of
from attnfuse.core.outcome import Fusion
from attnfuse.core.rule import NoMatch, Replacement
from attnfuse.core.view import View
from attnfuse.passes.rules.patterns import read_elsewhere, residual_sum


@dataclass
class SkipLayerNormMatch:
    norm: Node
    total: Value  # h + bias + skip: the norm's input
    h: Value
    skip: Value
    bias: Value | None
    gamma: Value | None
    beta: Value | None
    eps: float


class SkipLayerNorm:
    name = "skip_layernorm"

    def anchors(self, graph: Graph, view: View) -> list[Node]:
        return nodes_of(graph, [Op.LAYER_NORM])

    def match(self, anchor: Node, graph: Graph, view: View) -> SkipLayerNormMatch | None:
        x, gamma, beta = (graph.operands(anchor) + [None, None])[:3]
        rank = view.value(x).ndim
        if tuple(a % rank for a in graph.axes(anchor)) != (rank - 1,):
            raise NoMatch("layernorm is not over the last axis")
        found = residual_sum(graph, view, x)
        if found is None:
            raise NoMatch("the input is not a residual sum")
        h, skip, bias = found
        return SkipLayerNormMatch(anchor, x, h, skip, bias, gamma, beta, graph.attribute(anchor, "epsilon"))

    def lower(self, match: SkipLayerNormMatch, graph: Graph, view: View) -> Iterator[Replacement]:
        b = graph.builder(graph.label(match.norm))
        y, total = b.skip_layer_norm(match.h, match.skip, match.gamma, match.beta, match.bias, match.eps)
        claims = [(graph.outputs(match.norm)[0], y)]
        if read_elsewhere(graph, match.total, [match.norm]):
            claims.append((match.total, total))
        yield b.replacement(graph.op_name(registry.SKIP_LAYER_NORM), claims)

    def report(self, anchor: Node, match: SkipLayerNormMatch | None, graph: Graph) -> Fusion:
        return Fusion(graph.label(anchor), graph.op_name(registry.SKIP_LAYER_NORM), False)
