"""Embeddings + LayerNorm -> one embed layernorm (com.microsoft EmbedLayerNormalization).

    layernorm(word[ids] + position[positions] (+ segment[segments]))

with constant tables. The lookup that reads the token ids input is the word table's; of the
others, the one whose indices are nearest 0..S-1 is the position table's. The positions are
passed to the fused op as the graph computes them (RoBERTa's padding-aware positions
included), so nothing is assumed about them. The fused op also gives the sum back, which
replaces it where anything else reads it. torch has no such op: the fx builder refuses it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from attnfuse.core import registry
from attnfuse.core.graph import LAYOUT, Graph, Node, Op, Value, nodes_of, walk_back
from attnfuse.core.outcome import Fusion
from attnfuse.core.rule import NoMatch, Replacement
from attnfuse.core.view import View
from attnfuse.passes.rules.patterns import read_elsewhere

_FAR = 1 << 30  # the distance from 0..S-1 of indices never seen


@dataclass
class Lookup:
    """table[indices] along the table's rows."""

    table: Value
    indices: Value


@dataclass
class EmbedLayerNormMatch:
    norm: Node
    total: Value  # the sum of the lookups: the norm's input
    word: Lookup
    position: Lookup
    segment: Lookup | None
    gamma: Value | None
    beta: Value
    eps: float


class EmbedLayerNorm:
    name = "embed_layernorm"

    def anchors(self, graph: Graph, view: View) -> list[Node]:
        return nodes_of(graph, [Op.LAYER_NORM])

    def match(self, anchor: Node, graph: Graph, view: View) -> EmbedLayerNormMatch | None:
        x, gamma, beta = (graph.operands(anchor) + [None, None])[:3]
        lookups = _lookups(graph, view, x)
        if lookups is None or len(lookups) not in (2, 3):
            return None
        word = next((found for found in lookups if graph.is_input(walk_back(graph, found.indices, LAYOUT))), None)
        if word is None:
            raise NoMatch("no lookup reads the token ids input")
        rest = [found for found in lookups if found is not word]
        position = min(rest, key=lambda found: _distance_from_arange(view, found.indices))
        segment = next((found for found in rest if found is not position), None)
        rank = view.value(x).ndim
        if tuple(a % rank for a in graph.axes(anchor)) != (rank - 1,) or beta is None:
            raise NoMatch("layernorm is not over the last axis with a bias")
        return EmbedLayerNormMatch(anchor, x, word, position, segment, gamma, beta, graph.attribute(anchor, "epsilon"))

    def lower(self, match: EmbedLayerNormMatch, graph: Graph, view: View) -> Iterator[Replacement]:
        b = graph.builder(graph.label(match.norm))
        segment = match.segment or Lookup(None, None)
        y, total = b.embed_layer_norm(match.word.indices, segment.indices, match.word.table, match.position.table,
                                      segment.table, match.position.indices, match.gamma, match.beta, match.eps)
        claims = [(graph.outputs(match.norm)[0], y)]
        if read_elsewhere(graph, match.total, [match.norm]):
            claims.append((match.total, total))
        yield b.replacement(graph.op_name(registry.EMBED_LAYER_NORM), claims)

    def report(self, anchor: Node, match: EmbedLayerNormMatch | None, graph: Graph) -> Fusion:
        return Fusion(graph.label(anchor), graph.op_name(registry.EMBED_LAYER_NORM), False)


def _lookups(graph: Graph, view: View, value: Value) -> list[Lookup] | None:
    """The lookups from constant tables that `value` sums, or None if it sums anything else."""
    node = graph.producer(value)
    if node is None:
        return None
    if graph.op(node) is Op.GATHER:
        found = _lookup(graph, view, node)
        return None if found is None else [found]
    if graph.op(node) is Op.ADD:
        parts = [_lookups(graph, view, operand) for operand in graph.operands(node)[:2]]
        return None if None in parts else parts[0] + parts[1]
    return None


def _lookup(graph: Graph, view: View, node: Node) -> Lookup | None:
    """The gather's rows of a constant 2-D table (its output shaped indices + [width]), or None."""
    operands = graph.operands(node)
    if len(operands) < 2 or graph.attribute(node, "axis", 0) != 0:
        return None
    table, indices = operands[:2]
    array, ids, out = view.constant(table), view.value(indices), view.value(graph.outputs(node)[0])
    if array is None or array.ndim != 2 or ids is None or out is None or out.shape != ids.shape + array.shape[1:]:
        return None
    return Lookup(table, indices)


def _distance_from_arange(view: View, indices: Value) -> int:
    """0 when the indices are 0..S-1 along the last axis, more the further they are."""
    values = view.value(indices)
    if values is None or values.ndim == 0:
        return _FAR
    return int(np.abs(values - np.arange(values.shape[-1])).sum())
