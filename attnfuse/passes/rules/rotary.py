"""Rotary embeddings on q and k -> one fused rotary op (RotaryEmbedding; attnfuse::rotary in fx).

    y = x * cos + rotate(x) * sin    on the first rd entries of each head (the rest passes)

A candidate is a value y that the graph computes from one activation x of y's shape and dtype
(q or k in any layout: [B, H, S, D], [B, S, H, D] or [B, S, H*D]) through layout ops, negations,
sums, and products with exactly two other tensors: its cos and its sin, however the graph
computes them (from position ids, from a table). The region is evaluated on random x with the
probe's cos and sin, and the form it equals is found (core/measure/rotary.py); the fused op is
then proved on the probe's runs like every rewrite. The widest region is tried first (a partial
rotary's concat before its rotated part), and no narrower one inside it after.

The fused op rotates x's heads tokens first, read from the [B, S, H*D] tensor they were split
from where the graph has one (attention then reads q and k as token-wise rows), and is viewed
back to x's layout. Its cos and sin are built once per cos/sin pair and shared by every q and k
that reads it (the builders' `rotary_caches`).
"""
from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnfuse.core import regions, registry
from attnfuse.core.graph import Graph, Node, Op, Value
from attnfuse.core.measure import rotary as measure
from attnfuse.core.measure.rotary import RotaryForm
from attnfuse.core.outcome import Fusion
from attnfuse.core.rule import NoMatch, Replacement
from attnfuse.core.view import View

# What a rotary region is made of.
OPS = frozenset({Op.MUL, Op.ADD, Op.SUB, Op.NEG, Op.SLICE, Op.SPLIT, Op.ITEM, Op.CONCAT, Op.STACK, Op.RESHAPE,
                 Op.UNSQUEEZE, Op.SQUEEZE, Op.TRANSPOSE, Op.GATHER, Op.CAST, Op.IDENTITY})
_VIEWS = frozenset({Op.RESHAPE, Op.SQUEEZE, Op.UNSQUEEZE})  # views of a cos that keep its rows
_HEAD_SPLIT = frozenset({Op.RESHAPE, Op.TRANSPOSE, Op.IDENTITY})  # how q and k are split into heads
_WALK_LIMIT = 64  # nodes: a rotary with its layout ops is some 10 to 20
NOT_A_ROTARY = ("the region multiplies by a cos/sin pair but is not a rotation: it equals no rotary "
                "(rotate-half or interleaved, full or partial) of its input")


@dataclass(frozen=True)
class Tables:
    """Constant tables [positions, width] whose rows cos and sin are, gathered by `positions` ([B, S])."""

    cos: Value
    sin: Value
    positions: Value


@dataclass
class RotaryMatch:
    anchor: Node
    x: Value
    y: Value  # rotary(x)
    nodes: list[Node]  # the region computing y from x, cos and sin
    cos: Value  # the tensors the region multiplies by (the tensors they are views of), one row per token
    sin: Value
    form: RotaryForm
    batch_axis: int | None  # the axis of cos that counts the rows of the batch (None: the batch shares them)
    tokens: Value | None  # x's heads tokens first ([B, S, H*D] or [B, S, H, D]), the farthest up the head split
    tables: Tables | None  # when cos and sin are gathered from constant tables


class Rotary:
    name = "rotary"

    def __init__(self):
        self._claimed: set[int] = set()  # the nodes of the regions found: no narrower rotary inside one
        self._caches: dict[tuple, tuple[list[Node], Any]] = {}  # per cos/sin pair: the nodes built, the caches

    def anchors(self, graph: Graph, view: View) -> list[Node]:
        return [node for node in reversed(graph.nodes()) if graph.op(node) in OPS]  # the widest region first

    def match(self, anchor: Node, graph: Graph, view: View) -> RotaryMatch | None:
        if id(anchor) in self._claimed:
            return None
        try:
            found = _find(anchor, graph, view)
        except NoMatch:
            if _holds_rotary(anchor, graph, view):
                return None  # wider than a rotary, which is fused at its own anchor
            raise
        if found is not None:
            self._claimed.update(id(node) for node in found.nodes)
        return found

    def lower(self, match: RotaryMatch, graph: Graph, view: View) -> Iterator[Replacement]:
        b = graph.builder(graph.label(match.anchor))
        shared, caches = self._shared_caches(match, graph, b)
        y = b.rotary(match.x, match.tokens, caches, match.form)
        replacement = b.replacement(graph.op_name(registry.ROTARY), [(match.y, y)])
        replacement.nodes = shared + replacement.nodes
        yield replacement

    def report(self, anchor: Node, match: RotaryMatch | None, graph: Graph) -> Fusion:
        return Fusion(graph.label(anchor), graph.op_name(registry.ROTARY), False)

    def _shared_caches(self, match: RotaryMatch, graph: Graph, b) -> tuple[list[Node], Any]:
        """The caches of the match's cos/sin pair: those an earlier rotary committed (with their nodes,
        which this replacement reads), or new ones built by `b`."""
        key = (id(match.cos), id(match.sin), match.form.rows, match.form.batch_shared)
        built = self._caches.get(key)
        if built is not None and all(graph.alive(node) for node in built[0]):
            return built
        before = len(b.nodes)
        caches = b.rotary_caches(match.cos, match.sin, match.batch_axis, match.form, match.tables)
        self._caches[key] = (b.nodes[before:], caches)
        return [], caches


def _find(anchor: Node, graph: Graph, view: View) -> RotaryMatch | None:
    """The rotary whose output is the anchor's, None if it is not one; NoMatch when its region
    multiplies by a cos/sin pair but is no rotary."""
    y = graph.outputs(anchor)[0]
    if not _activation(y, view) or not (graph.users(y) or graph.is_output(y)):
        return None
    walked, values = _walk(y, graph, view)
    for x in values[1:]:
        if not _like(x, y, view):
            continue
        found = _region(x, y, walked, graph, view)
        if found is not None and measure.cos_and_sin(*(view.value(f) for f in found[1])):
            return _recognise(anchor, x, y, *found, graph, view)
    return None


def _holds_rotary(anchor: Node, graph: Graph, view: View) -> bool:
    """Whether the region up from the anchor holds a rotary."""
    for node in _walk(graph.outputs(anchor)[0], graph, view)[0][1:]:
        try:
            if _find(node, graph, view) is not None:
                return True
        except NoMatch:
            continue
    return False


def _activation(value: Value, view: View) -> bool:
    seen = view.value(value)
    return measure.floating(seen) and seen.ndim in (3, 4) and view.constant(value) is None


def _like(x: Value, y: Value, view: View) -> bool:
    """x is an activation of y's shape and dtype on every run."""
    if not _activation(x, view):
        return False
    for run in view.runs(y):
        a, b = view.value(x, run), view.value(y, run)
        if a is None or a.shape != b.shape or a.dtype != b.dtype:
            return False
    return True


def _inside(node: Node, graph: Graph, view: View) -> bool:
    """A node a rotary region may hold: its ops, a gather only at constant indices."""
    op = graph.op(node)
    return op in OPS and (op is not Op.GATHER or all(view.constant(v) is not None for v in graph.operands(node)[1:]))


def _walk(y: Value, graph: Graph, view: View) -> tuple[list[Node], list[Value]]:
    """The nodes (of OPS) that y is computed by, and the non-constant values they read, nearest first."""
    nodes, values, seen, queue = [], [y], {id(y)}, collections.deque([y])
    while queue and len(nodes) < _WALK_LIMIT:
        node = graph.producer(queue.popleft())
        if node is None or not _inside(node, graph, view) or any(n is node for n in nodes):
            continue
        nodes.append(node)
        for value in graph.operands(node):
            if value is not None and id(value) not in seen and view.constant(value) is None:
                seen.add(id(value))
                values.append(value)
                queue.append(value)
    return nodes, values


def _region(x: Value, y: Value, walked: list[Node], graph: Graph, view: View):
    """(the nodes between x and y, the two tensors they multiply x by) when y is linear in x through
    them and reads nothing else but constants and integers (shapes); else None."""
    depends, nodes, changed = {id(x)}, [], True
    while changed:  # the walked nodes that read x, directly or not
        changed = False
        for node in walked:
            if not any(n is node for n in nodes) and any(id(v) in depends for v in graph.operands(node)):
                nodes.append(node)
                depends.update(id(out) for out in graph.outputs(node))
                changed = True
    if id(y) not in depends:
        return None
    factors: list[Value] = []
    for node in nodes:
        operands = [v for v in graph.operands(node) if v is not None]
        reads_x = [v for v in operands if id(v) in depends]
        others = [v for v in operands if id(v) not in depends and view.constant(v) is None]
        if graph.op(node) is Op.MUL:
            if len(reads_x) != 1:
                return None  # x times x: not linear
            factors += [v for v in others if not any(v is f for f in factors)]
        elif any(measure.floating(view.value(v)) for v in others):
            return None  # x combined with another activation other than by a product
    if len(factors) != 2 or not regions.closed(graph, nodes, y):
        return None
    return regions.in_graph_order(graph, nodes), factors


def _recognise(anchor: Node, x: Value, y: Value, nodes: list[Node], factors: list[Value], graph: Graph,
               view: View) -> RotaryMatch:
    """Evaluate the region on random x and find the rotary it equals. NoMatch if none."""
    # On the run with the most rows: there a cos shared by the rows of the batch tells itself apart.
    run = max(view.runs(y), key=lambda r: view.value(x, r).shape[0])
    seen = view.value(x, run)
    points = np.random.default_rng(0).standard_normal(seen.shape).astype(seen.dtype)
    (got,) = view.evaluate(nodes, [y], {x: points}, run)
    form = measure.find(points, got, *(view.value(f, run) for f in factors))
    if form is None:
        raise NoMatch(NOT_A_ROTARY)
    cos, sin = (_viewed(f, graph, view) for f in (factors[::-1] if form.swapped else factors))
    tables = batch = None
    if not form.batch_shared:
        tables, batch = _tables(cos, sin, graph, view), _batch_axis(cos, x, view)
    return RotaryMatch(anchor, x, y, nodes, cos, sin, form, batch, _tokens_first(x, form, graph, view), tables)


def _batch_axis(cos: Value, x: Value, view: View) -> int:
    runs = view.runs(cos, x)
    found = measure.batch_axis([view.value(cos, r).shape for r in runs], [view.value(x, r).shape[0] for r in runs])
    if found is None:
        raise NoMatch("the cos tensor has no axis of the batch's rows")
    return found


def _viewed(value: Value, graph: Graph, view: View) -> Value:
    """The tensor `value` is a view of with the same rows (each layer's unsqueezed cos reads the
    model's one cos, and shares its caches)."""
    width = view.value(value).shape[-1]
    while (node := graph.producer(value)) is not None and graph.op(node) in _VIEWS:
        source = graph.operands(node)[0]
        seen = view.value(source)
        if seen is None or seen.ndim == 0 or seen.shape[-1] != width or view.constant(source) is not None:
            break
        value = source
    return value


def _tables(cos: Value, sin: Value, graph: Graph, view: View) -> Tables | None:
    """The constant tables cos and sin are rows of, gathered by the same [B, S] indices (the
    position ids), on every run; else None."""
    gathers = [graph.producer(v) for v in (cos, sin)]
    if any(g is None or graph.op(g) is not Op.GATHER or len(graph.operands(g)) < 2 for g in gathers):
        return None
    (cos_table, positions), (sin_table, other) = (graph.operands(g)[:2] for g in gathers)
    if positions is not other:
        return None
    for run in view.runs(cos, sin):
        indices = view.value(positions, run)
        if not all(measure.gathered(view.value(rows, run), view.constant(table), indices)
                   for rows, table in ((cos, cos_table), (sin, sin_table))):
            return None
    return Tables(cos_table, sin_table, positions)


def _tokens_first(x: Value, form: RotaryForm, graph: Graph, view: View) -> Value | None:
    """The farthest value up x's head split that holds x's heads tokens first, on every run."""
    runs = view.runs(x)
    found, value = None, x
    for _ in range(8):
        if all(measure.holds_tokens(view.value(value, run), view.value(x, run), form.layout) for run in runs):
            found = value
        node = graph.producer(value)
        if node is None or graph.op(node) not in _HEAD_SPLIT:
            break
        value = graph.operands(node)[0]
    return found
