"""Regions of a graph that compute one tensor from another, found to be evaluated.

The fusions that recognise a construct by what it computes (gelu, RMSNorm, rotary) look
for a region around a core op: the values it reaches through a set of ops, backward
and forward, and the nodes that compute y from x and constants alone. Evaluating that
region on chosen points (proof.evaluate) then says what it is.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attnfuse.passes.onnx.graph import constant


def forward(value: ir.Value, ops: frozenset[str] | set[str], steps: int) -> list[ir.Value]:
    """The values reached from `value` through single readers in `ops`, nearest first."""
    values = []
    for _ in range(steps):
        users = [use.node for use in value.uses()]
        if len(users) != 1 or users[0].op_type not in ops:
            break
        value = users[0].outputs[0]
        values.append(value)
    return values


def downstream(value: ir.Value, ops: frozenset[str] | set[str], steps: int) -> list[ir.Value]:
    """The values computed from `value` through ops in `ops` (every reader, not only single ones:
    a region may fan out and join again, as x * s + (b - mean * s) does), nearest first."""
    found, frontier, seen = [], [value], {id(value)}
    for _ in range(steps):
        next_frontier = []
        for current in frontier:
            for use in current.uses():
                if use.node.op_type not in ops:
                    continue
                for out in use.node.outputs:
                    if id(out) not in seen:
                        seen.add(id(out))
                        found.append(out)
                        next_frontier.append(out)
        frontier = next_frontier
    return found


def backward(core: ir.Node, ops: frozenset[str] | set[str], probe, depth: int) -> list[ir.Value]:
    """Non-constant tensors feeding `core` through ops in `ops`, nearest first."""
    found, frontier = [], list(core.inputs)
    for _ in range(depth):
        next_frontier = []
        for value in frontier:
            if value is None or constant(value, probe) is not None or value in found:
                continue
            found.append(value)
            node = value.producer()
            if node is not None and node.op_type in ops:
                next_frontier.extend(node.inputs)
        frontier = next_frontier
    return found


def candidates(anchor: ir.Node, outputs: list[ir.Value], probe, ops: frozenset[str] | set[str],
               same_dtype: bool = True, depth: int = 6):
    """(x, y, nodes) for each region computing y from x through `anchor`: y from `outputs`, farthest
    first (the widest region wins), x from the tensors feeding `anchor`, nearest first (and of y's
    dtype, with `same_dtype`)."""
    for y in reversed(outputs):
        for x in backward(anchor, ops, probe, depth):
            nodes = region(x, y, probe, ops)
            if nodes is not None and (not same_dtype or dtype(x, probe) == dtype(y, probe)):
                yield x, y, nodes


def region(x: ir.Value, y: ir.Value, probe, ops: frozenset[str] | set[str]) -> list[ir.Node] | None:
    """The nodes computing y from x and constants alone (each in `ops`), in graph order, or
    None if y reads anything else or an intermediate is read outside the region."""
    nodes, stack, seen = [], [y], set()
    while stack:
        value = stack.pop()
        if value is x or constant(value, probe) is not None or id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None or node.op_type not in ops:
            return None
        nodes.append(node)
        stack.extend(node.inputs)
    return in_graph_order(nodes, y) if closed(nodes, y) else None


def closed(nodes: list[ir.Node], y: ir.Value) -> bool:
    """No value the nodes compute, other than y, is read outside them."""
    inside = {id(n) for n in nodes}
    return all(out is y or (not out.is_graph_output() and all(id(use.node) in inside for use in out.uses()))
               for node in nodes for out in node.outputs)


def in_graph_order(nodes: list[ir.Node], y: ir.Value) -> list[ir.Node]:
    order = {id(n): i for i, n in enumerate(y.graph)} if y.graph is not None else {}
    return sorted(nodes, key=lambda n: order.get(id(n), 0))


def dtype(x: ir.Value, probe) -> np.dtype:
    """The dtype the probe saw for x (float32 when it saw none)."""
    seen = probe.get(x.name) if x.name else None
    return seen.dtype if seen is not None else np.dtype(np.float32)
