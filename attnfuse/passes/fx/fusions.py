"""Residual + bias + layernorm -> attnfuse::skip_layernorm;
(residual +) RMSNorm -> attnfuse::rms_norm / skip_rms_norm (the rules in `rmsnorm.py`).

Each rule is a pattern that reads like the math it matches, a check, and a
replacement; every replacement is evaluated on the probe and kept only if it
gives the original values. A rule that finds its construct but cannot use it
raises NoMatch, and the fusion is reported with that reason.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from attnfuse.kernels import ops
from attnfuse.passes.fx import rmsnorm
from attnfuse.passes.fx.graph import (
    FxProbe, NoMatch, Rewrite, aten, close_enough,
    is_op, only_user, remove_dead, rewrite_unless_excluded,
)
from attnfuse.passes.site import Fusion

TOLERANCE = 1e-5


def _skip_layernorm(node: fx.Node, probe: FxProbe) -> Rewrite | None:
    """layer_norm(x + skip, [N], weight, beta, eps) with x and skip of the output's shape."""
    if not is_op(node, aten.layer_norm.default) or not is_op(node.args[0], aten.add.Tensor):
        return None
    add = node.args[0]
    x, skip = add.args[:2]
    weight = node.args[2] if len(node.args) > 2 else None
    if add.kwargs.get("alpha", 1) != 1 or weight is None or only_user(add) is not node:
        return None
    out = probe.tensor(node, 0)
    if any(probe.tensor(t, 0) is None or probe.tensor(t, 0).shape != out.shape for t in (x, skip)):
        return None
    beta = node.args[3] if len(node.args) > 3 else None
    eps = node.args[4] if len(node.args) > 4 else 1e-5
    return Rewrite(ops.skip_layernorm, (x, skip, None, weight, beta, eps))


RULES = [*rmsnorm.RULES]


def fuse(graph: fx.Graph, probe: FxProbe, exclude: frozenset[str]) -> list[Fusion]:
    fusions = []
    for node in list(graph.nodes):
        for op_name, rule in RULES:
            try:
                found = rule(node, probe)
            except NoMatch as e:
                fusions.append(Fusion(f"{op_name}:{node.name}", op_name, fused=False, reason=str(e)))
                continue
            if found is None:
                continue
            fusion = Fusion(f"{op_name}:{node.name}", op_name, fused=False)
            if found.name:
                fusion.name, fusion.op = f"{found.name}:{node.name}", found.name
            rewrite_unless_excluded(fusion, exclude, lambda: _replace(graph, found.replaces or [node], found, probe))
            fusions.append(fusion)
    remove_dead(graph)
    return fusions


def _replace(graph: fx.Graph, replaced: list[fx.Node], rewrite: Rewrite, probe: FxProbe) -> None:
    first, rest = rewrite.args[0], rewrite.args[1:]
    for run in range(probe.runs):
        with torch.no_grad():
            got = rewrite.function(probe.get(first, run), *(probe.get(a, run) for a in rest))
        outputs = got if isinstance(got, tuple) else (got,)
        if not all(close_enough(out, probe.tensor(node, run), TOLERANCE) for out, node in zip(outputs, replaced)):
            raise NoMatch("the fused op does not reproduce the original")
    with _insertion_point(graph, replaced, rewrite.args):
        fused = graph.call_function(rewrite.function, (first, *rest))
        outputs = [graph.call_function(operator.getitem, (fused, i)) for i in range(len(replaced))] \
            if len(replaced) > 1 else [fused]
    for values in probe.values:  # a proven replacement reads as the original in the probe
        values[fused] = tuple(values[node] for node in replaced) if len(replaced) > 1 else values[replaced[0]]
    for out, node in zip(outputs, replaced):
        node.replace_all_uses_with(out)
        probe.alias(out, node)


def _insertion_point(graph: fx.Graph, replaced: list[fx.Node], args: tuple):
    """Before the first node replaced. An argument computed later from weights alone (Gemma
    computes its norm's 1 + weight after the residual add) moves up there first."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    first = min(replaced, key=order.get)
    moved: set[fx.Node] = set()

    def hoist(node: fx.Node) -> None:
        if order[node] < order[first] or node in moved:
            return
        if node in replaced or node.op == "placeholder":
            raise NoMatch("an argument of the fused op depends on what it replaces")
        for a in node.all_input_nodes:
            hoist(a)
        first.prepend(node)
        moved.add(node)

    for arg in _nodes_in(args):
        hoist(arg)
    return graph.inserting_before(first)


def _nodes_in(args) -> list[fx.Node]:
    found = []
    for a in args:
        if isinstance(a, fx.Node):
            found.append(a)
        elif isinstance(a, (tuple, list)):
            found.extend(_nodes_in(a))
    return found
