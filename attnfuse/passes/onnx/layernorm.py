"""Residual + bias + LayerNorm -> SkipLayerNormalization (com.microsoft).

layernorm(a + b) where a and b are both activations (the residual sum) is a
skip layernorm; when one side is itself h + bias with a constant bias vector,
the bias folds in too.
"""
from __future__ import annotations

import onnx_ir as ir

from attnfuse.passes.onnx.adapter import OnnxGraph
from attnfuse.passes.onnx.graph import MS_DOMAIN, Builder, NoMatch, attr, constant, consumers, opset
from attnfuse.passes.onnx.view import OrtView
from attnfuse.passes.rules.patterns import bias_add
from attnfuse.passes.site import Fusion
from attnfuse.passes.onnx.proof import prove, substitute


def fuse(graph: ir.Graph, probe, exclude) -> list:
    fusions = []
    for node in list(graph):
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name
        if name in exclude:
            fusions.append(Fusion(name, "SkipLayerNormalization", False, "excluded (rolled back)"))
            continue
        try:
            fuse_one(graph, node, probe)
            fusions.append(Fusion(name, "SkipLayerNormalization", True))
        except NoMatch as why:
            fusions.append(Fusion(name, "SkipLayerNormalization", False, str(why)))
    return fusions


def fuse_one(graph: ir.Graph, layernorm: ir.Node, probe) -> None:
    x, gamma, beta = (list(layernorm.inputs) + [None, None])[:3]
    if attr(layernorm, "axis", -1) != -1:
        raise NoMatch("layernorm is not over the last axis")
    h, skip, bias = residual_sum(x, probe)
    builder = Builder(layernorm.name)
    outputs = builder.op(
        "SkipLayerNormalization",
        [h, skip, gamma, beta, bias],
        {"epsilon": attr(layernorm, "epsilon", 1e-5)},
        domain=MS_DOMAIN,
        num_outputs=4,
        name=f"{layernorm.name}/SkipLayerNormalization",
    )
    claims = skip_claims(x, layernorm.outputs[0], outputs, [layernorm])
    prove(builder.nodes, claims, probe, opset=opset(graph))
    builder.commit(graph, after=layernorm)
    substitute(claims, probe)


def residual_sum(x: ir.Value, probe) -> tuple[ir.Value, ir.Value, ir.Value | None]:
    """x = h (+ bias) + skip with h and skip activations and bias a constant vector: (h, skip, bias)."""
    total = x.producer()
    if total is None or total.op_type != "Add" or any(constant(v, probe) is not None for v in total.inputs):
        raise NoMatch("the input is not a residual sum")
    skip, other = total.inputs
    view = OrtView(probe, opset(x.graph))
    adapter = OnnxGraph(x.graph, view)
    h, bias = bias_add(adapter, view, other) or (other, None)
    if bias is None:
        skip, other = other, skip
        h, bias = bias_add(adapter, view, other) or (other, None)
    return (other if bias is None else h), skip, bias


def skip_claims(x: ir.Value, y: ir.Value, outputs: list[ir.Value], norm: list[ir.Node]) -> list:
    """What a skip-norm's outputs replace: the norm's result, and the residual sum (output 3)
    when anything besides the norm's own nodes reads it."""
    inside = {id(node) for node in norm}
    claims = [(y, outputs[0])]
    if x.is_graph_output() or any(id(user) not in inside for user in consumers(x)):
        claims.append((x, outputs[3]))
    return claims
