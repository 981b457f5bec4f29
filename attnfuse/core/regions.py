"""Regions of a graph that compute one tensor from another, found to be evaluated.

The rules that recognise a construct by what it computes (gelu, RMSNorm, LayerNorm,
rotary) look for a region around a core node: the values it reaches through a set of
ops, backward and forward, and the nodes that compute y from x and constants alone.
Evaluating that region on chosen points (View.evaluate) then says what it is.
"""
from __future__ import annotations

from collections.abc import Iterator

from attnfuse.core.graph import Graph, Node, Op, Value
from attnfuse.core.view import View, dtype_of


def forward(graph: Graph, value: Value, ops: frozenset[Op], steps: int) -> list[Value]:
    """The values reached from `value` through single readers in `ops`, nearest first."""
    values = []
    for _ in range(steps):
        users = graph.users(value)
        if len(users) != 1 or graph.op(users[0]) not in ops:
            break
        value = graph.outputs(users[0])[0]
        values.append(value)
    return values


def downstream(graph: Graph, value: Value, ops: frozenset[Op], steps: int) -> list[Value]:
    """The values computed from `value` through ops in `ops` (every reader, not only single ones: a
    region may fan out and join again, as x * s + (b - mean * s) does), nearest first."""
    found, frontier, seen = [], [value], {id(value)}
    for _ in range(steps):
        next_frontier = []
        for current in frontier:
            for user in graph.users(current):
                if graph.op(user) not in ops:
                    continue
                for out in graph.outputs(user):
                    if id(out) not in seen:
                        seen.add(id(out))
                        found.append(out)
                        next_frontier.append(out)
        frontier = next_frontier
    return found


def backward(graph: Graph, view: View, core: Node, ops: frozenset[Op], depth: int) -> list[Value]:
    """Non-constant tensors feeding `core` through ops in `ops`, nearest first."""
    found: list[Value] = []
    frontier = list(graph.operands(core))
    for _ in range(depth):
        next_frontier = []
        for value in frontier:
            if value is None or view.constant(value) is not None or any(value is f for f in found):
                continue
            found.append(value)
            node = graph.producer(value)
            if node is not None and graph.op(node) in ops:
                next_frontier.extend(graph.operands(node))
        frontier = next_frontier
    return found


def candidates(graph: Graph, view: View, anchor: Node, outputs: list[Value], ops: frozenset[Op],
               same_dtype: bool = True, depth: int = 6) -> Iterator[tuple[Value, Value, list[Node]]]:
    """(x, y, nodes) for each region computing y from x through `anchor`: y from `outputs`, farthest
    first (the widest region wins), x from the tensors feeding `anchor`, nearest first (and of y's
    dtype, with `same_dtype`)."""
    for y in reversed(outputs):
        for x in backward(graph, view, anchor, ops, depth):
            nodes = region(graph, view, x, y, ops)
            if nodes is not None and (not same_dtype or dtype_of(view, x) == dtype_of(view, y)):
                yield x, y, nodes


def region(graph: Graph, view: View, x: Value, y: Value, ops: frozenset[Op]) -> list[Node] | None:
    """The nodes computing y from x and constants alone (each in `ops`), in graph order, or None if
    y reads anything else or an intermediate is read outside the region."""
    nodes, stack, seen = [], [y], set()
    while stack:
        value = stack.pop()
        if value is None or value is x or id(value) in seen or view.constant(value) is not None:
            continue
        seen.add(id(value))
        node = graph.producer(value)
        if node is None or graph.op(node) not in ops:
            return None
        if not any(node is n for n in nodes):
            nodes.append(node)
        stack.extend(graph.operands(node))
    return in_graph_order(graph, nodes) if closed(graph, nodes, y) else None


def closed(graph: Graph, nodes: list[Node], y: Value) -> bool:
    """No value the nodes compute, other than y, is read outside them."""
    inside = {id(n) for n in nodes}
    return all(out is y or (not graph.is_output(out) and all(id(user) in inside for user in graph.users(out)))
               for node in nodes for out in graph.outputs(node))


def in_graph_order(graph: Graph, nodes: list[Node]) -> list[Node]:
    wanted = {id(n) for n in nodes}
    return [node for node in graph.nodes() if id(node) in wanted]


def constant_inputs(graph: Graph, view: View, nodes: list[Node]) -> list[Value]:
    """The constants the region reads, each once, in order."""
    found: list[Value] = []
    for node in nodes:
        for value in graph.operands(node):
            if value is not None and view.constant(value) is not None and not any(value is f for f in found):
                found.append(value)
    return found
