"""A normalization written out in elementwise ops -> one layer norm, RMSNorm, or residual + RMSNorm.

    (x - mean(x)) / sqrt(var(x) + eps) * w + b      ->  layer_norm(x, w, b, eps)
    x / sqrt(mean(x^2) + eps) * w                   ->  rms_norm(x, w, eps)
    the same of x = h + r (+ bias)                  ->  skip_rms_norm(h, r, w, bias, eps), the sum too

Every reduction is an anchor. The region computing y from x around it (elementwise ops and
reductions only; the widest that is a normalization wins) is evaluated once on chosen rows,
and core/measure/norms.py reads from its outputs what it is, and its eps, w and b. The fused
op carries the graph's own eps constant and weight and bias values where they are those
(Gemma's 1 + w is a value the graph computes; casts inside are fine). A LayerNorm becomes one
layer norm, which the embedding and skip-layernorm rules then take like any. A region that
normalises its rows some other way (no epsilon, over the tokens too, a scaled mean) is
reported with the reason.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from attnfuse.core import registry
from attnfuse.core.graph import REDUCTIONS, Graph, Node, Op, Value, nodes_of
from attnfuse.core.measure import norms
from attnfuse.core.measure.norms import NormKind, Reading
from attnfuse.core.outcome import Fusion
from attnfuse.core.regions import candidates, constant_inputs, downstream
from attnfuse.core.rule import NoMatch, Replacement
from attnfuse.core.view import View, dtype_of
from attnfuse.passes.rules.patterns import read_elsewhere, residual_sum

OPS = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.SQRT, Op.RSQRT, Op.RECIPROCAL, Op.CAST,
                 Op.IDENTITY}) | REDUCTIONS
STEPS = 8  # how far past the reduction a norm's output may be
_NO_OP = frozenset({Op.CAST, Op.IDENTITY})


@dataclass
class Residual:
    """x is the sum h + skip (+ bias), maybe through casts that change nothing."""

    total: Value
    h: Value
    skip: Value
    bias: Value | None
    casts: list[Node]  # from the sum to x


@dataclass
class NormMatch:
    anchor: Node
    x: Value
    y: Value
    nodes: list[Node]
    kind: NormKind
    eps: float
    weight: Value | None  # None: ones
    bias: Value | None  # None: zeros
    residual: Residual | None
    op: registry.FusedOp = field(init=False)  # the op built last (the report's)

    def __post_init__(self):
        self.op = _op(self.kind, self.residual is not None)


class Normalization:
    name = "normalization"

    def __init__(self):
        # The regions the anchors so far were read as, fused or refused: a reduction inside one
        # is part of that normalization, not one of its own.
        self._claimed: set[int] = set()
        self._refused: dict[int, NormKind | None] = {}  # anchor -> what the refused region resembles

    def anchors(self, graph: Graph, view: View) -> list[Node]:
        self._claimed.clear()
        self._refused.clear()
        return nodes_of(graph, REDUCTIONS)

    def match(self, anchor: Node, graph: Graph, view: View) -> NormMatch | None:
        if id(anchor) in self._claimed:
            return None
        refusal = None
        for x, y, nodes in candidates(graph, view, anchor, downstream(graph, graph.outputs(anchor)[0], OPS, STEPS),
                                      OPS):
            reading = _read(view, x, y, nodes)
            if reading.kind is None and reading.reason is None:
                continue  # not a normalization
            try:
                found = _matched(anchor, graph, view, x, y, nodes, reading)
            except NoMatch as why:
                refusal = refusal or (nodes, reading.kind, str(why))
                continue
            self._claimed.update(map(id, nodes))
            return found
        if refusal is None:
            return None
        nodes, kind, why = refusal
        self._claimed.update(map(id, nodes))
        self._refused[id(anchor)] = kind
        raise NoMatch(why)

    def lower(self, match: NormMatch, graph: Graph, view: View) -> Iterator[Replacement]:
        label = graph.label(match.anchor)
        if match.kind is NormKind.LAYER:
            b = graph.builder(label)
            yield self._built(match, registry.LAYER_NORM, b, graph,
                              [(match.y, b.layer_norm(match.x, match.weight, match.bias, match.eps))])
            return
        residual = match.residual
        if residual is not None:
            b = graph.builder(label)
            y, total = b.skip_rms_norm(residual.h, residual.skip, match.weight, residual.bias, match.eps)
            claims = [(match.y, y)]
            if read_elsewhere(graph, residual.total, match.nodes + residual.casts):
                claims.append((residual.total, total))  # the next residual reads the sum
            yield self._built(match, registry.SKIP_RMS_NORM, b, graph, claims)
        b = graph.builder(label)  # the plain norm where the skip form does not prove
        yield self._built(match, registry.RMS_NORM, b, graph, [(match.y, b.rms_norm(match.x, match.weight, match.eps))])

    def report(self, anchor: Node, match: NormMatch | None, graph: Graph) -> Fusion:
        op = match.op if match is not None else _op(self._refused.get(id(anchor)), False)
        return Fusion(graph.label(anchor), graph.op_name(op), False)

    @staticmethod
    def _built(match: NormMatch, op: registry.FusedOp, builder, graph: Graph, claims) -> Replacement:
        match.op = op
        return builder.replacement(graph.op_name(op), claims)


def _op(kind: NormKind | None, residual: bool) -> registry.FusedOp:
    if kind is NormKind.LAYER:
        return registry.LAYER_NORM
    return registry.SKIP_RMS_NORM if residual else registry.RMS_NORM


def _read(view: View, x: Value, y: Value, nodes: list[Node]) -> Reading:
    """What the region computing y from x is, from one evaluation on norms.points."""
    seen = view.value(x)
    if seen is None or seen.ndim < 2 or seen.shape[-1] < 2 or not norms.floating(seen.dtype):
        return Reading()
    points = norms.points(seen.shape[-1], seen.dtype, seen.ndim)
    try:
        (got,) = view.evaluate(nodes, [y], {x: points}, view.runs(x)[0])
    except NoMatch:
        return Reading()
    if got is None or got.shape != points.shape:
        return Reading()
    return norms.read(points, got)


def _matched(anchor: Node, graph: Graph, view: View, x: Value, y: Value, nodes: list[Node],
             reading: Reading) -> NormMatch:
    """The match, with the graph's own eps, weight and bias; NoMatch where the reading is refused or
    its vectors are not the graph's."""
    if not reading.fits:
        raise NoMatch(reading.reason)
    dtype = dtype_of(view, x)
    values = constant_inputs(graph, view, nodes)
    arrays = [view.constant(v) for v in values]
    eps = norms.own_scalar(reading.eps, arrays, dtype)
    weight = _vector(values, arrays, reading.weight, 1.0, "scale", dtype)
    bias = _vector(values, arrays, reading.bias, 0.0, "bias", dtype) if reading.kind is NormKind.LAYER else None
    residual = _residual(graph, view, x) if reading.kind is NormKind.RMS else None
    return NormMatch(anchor, x, y, nodes, reading.kind, eps, weight, bias, residual)


def _vector(values: list[Value], arrays: list, measured, fill: float, what: str, dtype) -> Value | None:
    """The graph's value equal to the measured vector; None where it is `fill` everywhere (none)."""
    index = norms.matching_vector(measured, arrays, dtype)
    if index is not None:
        return values[index]
    if norms.is_filled(measured, fill, dtype):
        return None
    raise NoMatch(f"the norm's {what} is not one vector of the graph")


def _residual(graph: Graph, view: View, x: Value) -> Residual | None:
    total, casts = x, []
    while (node := graph.producer(total)) is not None and graph.op(node) in _NO_OP \
            and dtype_of(view, graph.operands(node)[0]) == dtype_of(view, total):
        casts.append(node)
        total = graph.operands(node)[0]
    found = residual_sum(graph, view, total)
    return None if found is None else Residual(total, *found, casts)
