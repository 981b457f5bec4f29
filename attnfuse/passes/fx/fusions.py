"""Residual + bias + layernorm -> attnfuse::skip_layernorm; bias + gelu -> attnfuse::bias_gelu.

Each rule is a pattern that reads like the math it matches, a check, and a
replacement; every replacement is evaluated on the probe and kept only if it
gives the original values.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from attnfuse.kernels import ops
from attnfuse.passes.fx.graph import (
    FxProbe, NoMatch, aten, close_enough,
    is_op, only_user, remove_dead, rewrite_unless_excluded,
)
from attnfuse.passes.site import Fusion

TOLERANCE = 1e-5


def _skip_layernorm(node: fx.Node, probe: FxProbe) -> tuple[Callable, tuple] | None:
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
    return ops.skip_layernorm, (x, skip, None, weight, beta, eps)


def _bias_gelu(node: fx.Node, probe: FxProbe) -> tuple[Callable, tuple] | None:
    """gelu(x + bias), the bias a vector over the last dim: a linear's own, or an add's."""
    if not is_op(node, aten.gelu.default):
        return None
    approximate = node.kwargs.get("approximate", "none")
    source = node.args[0]
    if only_user(source) is not node:
        return None
    if is_op(source, aten.linear.default) and len(source.args) > 2 and source.args[2] is not None:
        x, weight, bias = source.args
        return ops.bias_gelu, (("linear", x, weight), bias, approximate)
    if is_op(source, aten.add.Tensor) and probe.tensor(source.args[1], 0) is not None \
            and probe.tensor(source.args[1], 0).dim() == 1:
        return ops.bias_gelu, (source.args[0], source.args[1], approximate)
    return None


RULES = [("skip_layernorm", _skip_layernorm), ("bias_gelu", _bias_gelu)]


def fuse(graph: fx.Graph, probe: FxProbe, exclude: frozenset[str]) -> list[Fusion]:
    fusions = []
    for node in list(graph.nodes):
        for op_name, rule in RULES:
            found = rule(node, probe)
            if found is None:
                continue
            fusion = Fusion(f"{op_name}:{node.name}", op_name, fused=False)
            rewrite_unless_excluded(fusion, exclude, lambda: _replace(graph, node, *found, probe))
            fusions.append(fusion)
    remove_dead(graph)
    return fusions


def _replace(graph: fx.Graph, node: fx.Node, function: Callable, args: tuple, probe: FxProbe) -> None:
    first, rest = args[0], args[1:]
    inputs = []
    for run in range(probe.runs):
        # ("linear", x, weight): the linear without its bias, which moves into the fused op.
        x = F.linear(probe.get(first[1], run), probe.get(first[2], run)) if isinstance(first, tuple) \
            else probe.get(first, run)
        with torch.no_grad():
            got = function(x, *(probe.get(a, run) for a in rest))
        if not close_enough(got, probe.tensor(node, run), TOLERANCE):
            raise NoMatch("the fused op does not reproduce the original")
        inputs.append(x)
    with graph.inserting_before(node):
        if isinstance(first, tuple):
            first = graph.call_function(aten.linear.default, first[1:])
            for values, x in zip(probe.values, inputs):
                values[first] = x
        fused = graph.call_function(function, (first, *rest))
    node.replace_all_uses_with(fused)
    probe.alias(fused, node)
