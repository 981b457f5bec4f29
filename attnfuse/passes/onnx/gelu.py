"""Gelu, however it is spelled, and its bias: BiasGelu / FastGelu / Gelu (com.microsoft).

Canonicalise first: an elementwise region of the graph that computes
gelu(x), exactly (erf) or in the tanh approximation, is recognised by
evaluating it, not by its ops; ONNX's own Gelu op is read directly. Then one
rule: gelu(h + b) with a constant bias b becomes BiasGelu (erf) or FastGelu
(tanh) with the bias folded in.
"""
from __future__ import annotations

from math import erf, sqrt, tanh, pi

import numpy as np
import onnx_ir as ir

from attnfuse.core import tolerance as precision
from attnfuse.passes.onnx import regions
from attnfuse.passes.onnx.graph import MS_DOMAIN, Builder, NoMatch, attr, constant, opset
from attnfuse.core.outcome import Fusion
from attnfuse.passes.onnx.proof import evaluate, prove, substitute

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Cast"}
_X = np.linspace(-6.0, 6.0, 97, dtype=np.float32)
_REFERENCE = {
    "none": np.array([0.5 * x * (1 + erf(x / sqrt(2))) for x in _X.astype(np.float64)]),
    "tanh": np.array([0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3))) for x in _X.astype(np.float64)]),
}


def fuse(graph: ir.Graph, probe, exclude) -> list:
    fusions = []
    for gelu in find_gelus(graph, probe):
        x, y, approximate, name = gelu
        op = "BiasGelu" if approximate == "none" else "FastGelu"
        if name in exclude:
            fusions.append(Fusion(name, op, False, "excluded (rolled back)"))
            continue
        builder = Builder(name)
        h, bias = split_bias(x, probe)
        if bias is None:
            op = "Gelu" if approximate == "none" else "FastGelu"
        new = builder.op(op, [h, bias] if bias is not None else [x], domain=MS_DOMAIN, name=f"{name}/{op}")
        try:
            prove(builder.nodes, [(y, new)], probe, opset=opset(graph))
        except NoMatch as why:
            fusions.append(Fusion(name, op, False, str(why)))
            continue
        builder.commit(graph, after=y.producer())
        substitute([(y, new)], probe)
        fusions.append(Fusion(name, op, True))
    return fusions


def find_gelus(graph: ir.Graph, probe):
    """(x, y, approximate, name) for every gelu(x) = y in the graph."""
    for node in list(graph):
        if node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
            yield node.inputs[0], node.outputs[0], attr(node, "approximate", "none"), node.name
        elif node.op_type in ("Erf", "Tanh"):
            found = _decomposed(node, graph, probe)
            if found:
                yield (*found, node.name)


def _decomposed(core: ir.Node, graph: ir.Graph, probe):
    """The widest elementwise region around an Erf/Tanh that computes gelu."""
    outputs = regions.forward(core.outputs[0], ELEMENTWISE, steps=5)
    for x, y, region in regions.candidates(core, outputs, probe, ELEMENTWISE, same_dtype=False):
        kind = _which_gelu(region, x, y, opset(graph), regions.dtype(x, probe))
        if kind:
            return x, y, kind
    return None


def _which_gelu(region: list[ir.Node], x: ir.Value, y: ir.Value, version: int, dtype: np.dtype) -> str | None:
    """Evaluate the region on points of x's dtype; which gelu it is, to that dtype's precision."""
    try:
        (got,) = evaluate(region, [y], lambda value: _X.astype(dtype) if value is x else None, version)
    except NoMatch:
        return None
    if got is None or got.shape != _X.shape:
        return None
    closeness = 1e-5 if dtype.itemsize >= 4 else precision.tolerance(dtype)
    got = got.astype(np.float64)
    # In float16 the two gelus differ by less than a rounding step at some points: the one the
    # region is closest to on average is the one it computes.
    kind, reference = min(_REFERENCE.items(), key=lambda item: np.mean(np.abs(got - item[1])))
    return kind if np.allclose(got, reference, rtol=closeness, atol=closeness) else None


def split_bias(x: ir.Value, probe) -> tuple[ir.Value, ir.Value | None]:
    """x = h + b with b a constant vector over the last axis: (h, b); else (x, None)."""
    node = x.producer()
    if node is None or node.op_type != "Add":
        return x, None
    for i in (0, 1):
        bias = constant(node.inputs[i], probe)
        if bias is not None and bias.ndim == 1 and constant(node.inputs[1 - i], probe) is None:
            return node.inputs[1 - i], node.inputs[i]
    return x, None
