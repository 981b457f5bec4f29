"""Small patterns several rules share: a bias added to an activation, and a residual sum."""
from __future__ import annotations

from attnfuse.core.graph import Graph, Op, Value
from attnfuse.core.view import View


def bias_add(graph: Graph, view: View, x: Value) -> tuple[Value, Value] | None:
    """(h, b) when x = h + b with b a constant vector over the last axis and h not constant; else None."""
    node = graph.producer(x)
    if node is None or graph.op(node) is not Op.ADD:
        return None
    a, b = graph.operands(node)[:2]
    for h, bias in ((a, b), (b, a)):
        vector = view.constant(bias)
        if vector is not None and vector.ndim == 1 and view.constant(h) is None:
            return h, bias
    return None


def residual_sum(graph: Graph, view: View, x: Value) -> tuple[Value, Value, Value | None] | None:
    """(h, skip, bias) when x = h (+ bias) + skip, h and skip activations of x's shape and bias a
    constant vector; else None."""
    total = graph.producer(x)
    if total is None or graph.op(total) is not Op.ADD:
        return None
    a, b = graph.operands(total)[:2]
    if any(view.constant(v) is not None for v in (a, b)) or not all(_same_shape(view, v, x) for v in (a, b)):
        return None
    for skip, other in ((a, b), (b, a)):
        split = bias_add(graph, view, other)
        if split is not None:
            return split[0], skip, split[1]
    return b, a, None


def read_elsewhere(graph: Graph, value: Value, inside: list) -> bool:
    """Whether anything besides the nodes `inside` reads `value` (or it is a graph output)."""
    ids = {id(node) for node in inside}
    return graph.is_output(value) or any(id(user) not in ids for user in graph.users(value))


def _same_shape(view: View, a: Value, b: Value) -> bool:
    runs = view.runs(b)
    return all(view.value(a, run) is not None and view.value(a, run).shape == view.value(b, run).shape for run in runs)
