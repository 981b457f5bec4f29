"""LayerNorm written out in elementwise ops (exports before opset 17, tf2onnx's x * s + (b - mean * s)),
recognised by evaluating its region, becomes one LayerNormalization node, which the layernorm
and embedding fusions then take like any other.

    y = (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * w + b     (last axis)

Every ReduceMean is a candidate. The region computing y from x around it is evaluated on chosen
rows: a LayerNorm does not move when a row is scaled or a constant is added to it (an RMSNorm
moves), a zero row gives b, a zero-mean row of +-1 and the same row made tiny give w and eps (as
for RMSNorm), and all the rows then check the whole formula. The node is written
with the graph's own w, b and eps and proved on the probe's values. ONNX Runtime runs
LayerNormalization under any opset (ONNX defines it from 17).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attnfuse.core import tolerance as precision
from attnfuse.passes.onnx import regions
from attnfuse.passes.onnx.graph import Builder, NoMatch, constant, observed, opset
from attnfuse.passes.onnx.proof import evaluate, prove, substitute
from attnfuse.passes.onnx.rmsnorm import OPS, as_vector, epsilon, graph_vector, own_constant, row_error
from attnfuse.core.outcome import Fusion

OP = "LayerNormalization"
_SHIFT = 3.0  # a row moved by this much gives the same output


def fuse(graph: ir.Graph, probe, exclude) -> list[Fusion]:
    fusions, claimed = [], set()
    for anchor in list(graph):
        if anchor.op_type != "ReduceMean" or id(anchor) in claimed or anchor.graph is None:
            continue
        found = _around(anchor, probe, opset(graph))
        if found is None:
            continue
        x, y, nodes, eps, scale, bias = found
        claimed.update(id(node) for node in nodes)
        if anchor.name in exclude:
            fusions.append(Fusion(anchor.name, OP, False, "excluded (rolled back)"))
            continue
        try:
            _replace(graph, anchor.name, x, y, eps, scale, bias, probe)
            fusions.append(Fusion(anchor.name, OP, True))
        except NoMatch as why:
            fusions.append(Fusion(anchor.name, OP, False, str(why)))
    return fusions


def _around(anchor: ir.Node, probe, version: int):
    """The widest region around a ReduceMean that is a LayerNorm: (x, y, nodes, eps, w, b) or None."""
    for x, y, nodes in regions.candidates(anchor, regions.downstream(anchor.outputs[0], OPS, steps=8), probe, OPS):
        try:
            read = read_layer_norm(nodes, x, y, probe, version)
        except NoMatch:
            continue
        if read is not None:
            return (x, y, nodes, *read)
    return None


def read_layer_norm(nodes: list[ir.Node], x: ir.Value, y: ir.Value, probe, version: int):
    """(eps, w, b), w and b graph values or None (ones, zeros), if the region is a LayerNorm over
    the last axis; None if it is not one; NoMatch if it normalises so but not exactly."""
    seen = observed(x, probe)
    if seen.ndim < 2 or seen.shape[-1] % 2:
        return None
    dtype, hidden = seen.dtype, seen.shape[-1]
    tiny = 1e-5 if dtype.itemsize >= 4 else 1e-2
    normal = np.random.default_rng(0).standard_normal((2, hidden))
    signs = np.resize([1.0, -1.0], hidden)  # mean 0, mean square 1
    # a zero row, +-1, +-tiny, a random row at two scales where eps is negligible, the first
    # one shifted, and a random row at an ordinary scale
    rows = np.concatenate([np.zeros((1, hidden)), signs[None], signs[None] * tiny, normal[:1] * 100.0,
                           normal[:1] * 1000.0, normal[:1] * 100.0 + _SHIFT, normal[1:]])
    points = rows.reshape((1,) * (seen.ndim - 2) + rows.shape).astype(dtype)
    try:
        (got,) = evaluate(nodes, [y], lambda value: points if value is x else observed(value, probe), version)
    except NoMatch:
        return None
    if got is None or got.shape != points.shape:
        return None
    got = got.reshape(rows.shape).astype(np.float64)
    tolerance = precision.tolerance(dtype)
    if not (row_error(got[3], got[4]) <= tolerance and row_error(got[3], got[5]) <= tolerance):
        return None  # moves with the row's scale or offset: not a LayerNorm
    shift = got[0]  # a zero row: b is left
    eps = own_constant(epsilon(got[1:3] - shift, tiny), nodes, probe)
    if not eps > tiny * tiny * 1e-3:
        raise NoMatch("the normalization has no epsilon")
    scale = graph_vector((got[1] - shift) * np.sqrt(1.0 + eps) * signs, nodes, probe, 1.0, "scale")
    bias = graph_vector(shift, nodes, probe, 0.0, "bias")
    w = constant(scale, probe).reshape(-1) if scale is not None else 1.0
    b = constant(bias, probe).reshape(-1) if bias is not None else 0.0
    centred = rows - rows.mean(-1, keepdims=True)
    expected = centred / np.sqrt((centred * centred).mean(-1, keepdims=True) + eps) * w + b
    error = max(row_error(e, g) for e, g in zip(expected, got))
    if not error <= tolerance:
        raise NoMatch(f"the normalization is not a LayerNorm with eps {eps:.3g} (relative error {error:.2g})")
    return eps, scale, bias


def _replace(graph: ir.Graph, name: str, x: ir.Value, y: ir.Value, eps: float, scale, bias, probe) -> None:
    builder = Builder(name)
    vectors = [as_vector(builder, scale, x, probe, 1.0), as_vector(builder, bias, x, probe, 0.0)]
    out = builder.op(OP, [x, *vectors], {"epsilon": eps, "axis": -1, "stash_type": 1}, name=f"{name}/{OP}")
    prove(builder.nodes, [(y, out)], probe, opset=opset(graph))
    builder.commit(graph, after=y.producer())
    substitute([(y, out)], probe)
