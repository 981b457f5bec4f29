"""RMSNorm, however it is spelled, and its residual: SimplifiedLayerNormalization /
SkipSimplifiedLayerNormalization.

    y = x / sqrt(mean(x^2, last axis) + eps) * w

(Gemma's (1 + w) is a w the graph computes; casts to float32 inside are fine.) Every
reduction is a candidate: the region computing y from x around it is evaluated on chosen
rows, and says what it is. A row of ones gives w, a row of tiny values gives eps (where
eps is not negligible against mean(x^2)), and random rows at several scales, tiny ones
and a zero row then check the whole formula with that w and eps. The fused op is built
with exactly that eps and proved on the probe's values. With a residual sum before it
(x = h + r, the sum read later as in every Llama layer) the norm becomes
SkipSimplifiedLayerNormalization, whose output 3 replaces the sum.

SimplifiedLayerNormalization is one of ONNX Runtime's own ops in the ONNX domain (it runs
in no other); the skip form is com.microsoft's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from attnfuse.core import tolerance as precision
from attnfuse.passes.onnx import regions
from attnfuse.passes.onnx.graph import MS_DOMAIN, Builder, NoMatch, constant, observed, opset
from attnfuse.passes.onnx.layernorm import residual_sum, skip_claims
from attnfuse.passes.onnx.proof import evaluate, prove, substitute
from attnfuse.core.outcome import Fusion

PLAIN, SKIP = "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"
REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2"})
OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Cast"}) | REDUCTIONS
# A random row at two scales where eps is negligible (their squares within float16's range in
# float16): a normalization gives both the same.
_SCALES = {4: (100.0, 1000.0), 2: (4.0, 16.0)}


@dataclass
class Norm:
    """An RMSNorm region: y = x / sqrt(mean(x^2) + eps) * scale."""

    name: str
    x: ir.Value
    y: ir.Value
    nodes: list[ir.Node]
    eps: float
    scale: ir.Value | None  # None: no weight (ones)


def fuse(graph: ir.Graph, probe, exclude) -> list[Fusion]:
    fusions = []
    for found in find_norms(graph, probe):
        if isinstance(found, Fusion):
            fusions.append(found)
            continue
        op = SKIP if _residual(found.x, probe) else PLAIN
        if found.name in exclude:
            fusions.append(Fusion(found.name, op, False, "excluded (rolled back)"))
            continue
        try:
            fusions.append(Fusion(found.name, _replace(graph, found, probe), True))
        except NoMatch as why:
            fusions.append(Fusion(found.name, op, False, str(why)))
    return fusions


def find_norms(graph: ir.Graph, probe):
    """A Norm for every RMSNorm region; a Fusion (not fused, with the reason) for a region that
    normalises its rows but not as an RMSNorm does."""
    claimed: set[int] = set()
    for anchor in list(graph):
        if anchor.op_type not in REDUCTIONS or id(anchor) in claimed:
            continue
        found = _around(anchor, graph, probe)
        if found is None:
            continue
        claimed.update(id(node) for node in getattr(found, "nodes", ()))
        yield found


def _around(anchor: ir.Node, graph: ir.Graph, probe) -> Norm | Fusion | None:
    """The widest region around a reduction that is an RMSNorm; else why a normalization is not one."""
    why_not = None
    for x, y, nodes in regions.candidates(anchor, regions.forward(anchor.outputs[0], OPS, steps=8), probe, OPS):
        try:
            eps, scale = read_norm(nodes, x, y, probe, opset(graph))
        except NoMatch as why:
            why_not = why_not or str(why)
            continue
        if eps is not None:
            return Norm(anchor.name, x, y, nodes, eps, scale)
    return Fusion(anchor.name, PLAIN, False, why_not) if why_not else None


def read_norm(nodes: list[ir.Node], x: ir.Value, y: ir.Value, probe, version: int):
    """(eps, scale) if the region is x / sqrt(mean(x^2) + eps) * scale; (None, None) if it does not
    normalise its rows at all; NoMatch (the reason) if it normalises them some other way."""
    seen = observed(x, probe)
    if seen.ndim < 2:
        return None, None
    dtype, hidden = seen.dtype, seen.shape[-1]
    tiny = 1e-5 if dtype.itemsize >= 4 else 1e-2  # tiny rows: mean(x^2) near eps (1e-10 in float32)
    rows = _rows(hidden, tiny, _SCALES[min(dtype.itemsize, 4)])
    points = rows.reshape((1,) * (seen.ndim - 2) + rows.shape).astype(dtype)
    try:
        (got,) = evaluate(nodes, [y], lambda value: points if value is x else observed(value, probe), version)
    except NoMatch:
        return None, None
    if got is None or got.shape != points.shape:
        return None, None
    got = got.reshape(rows.shape).astype(np.float64)
    tolerance = precision.tolerance(dtype)
    if not row_error(got[-2], got[-1]) <= tolerance or not np.abs(got[-1]).max() > 0:
        return None, None  # not scale-invariant: not a normalization
    eps = own_constant(epsilon(got, tiny), nodes, probe)
    if not eps > tiny * tiny * 1e-3:
        raise NoMatch("the normalization has no epsilon: it divides by the root mean square itself")
    scale = graph_vector(got[0] * np.sqrt(1.0 + eps), nodes, probe)
    weight = constant(scale, probe).reshape(-1) if scale is not None else 1.0
    expected = rows / np.sqrt((rows * rows).mean(-1, keepdims=True) + eps) * weight
    error = max(row_error(e, g) for e, g in zip(expected, got))
    if not error <= tolerance:
        raise NoMatch(f"the normalization is not x / sqrt(mean(x^2) + {eps:.3g}) * w (relative error {error:.2g})")
    return eps, scale


def _rows(hidden: int, tiny: float, scales: tuple[float, float]) -> np.ndarray:
    """Ones, tiny ones, random rows at ordinary and tiny scale, a zero row, then a random row
    at the two `scales` (last, for the scale-invariance test)."""
    rng = np.random.default_rng(0)
    normal = rng.standard_normal((3, hidden))
    return np.concatenate([np.ones((1, hidden)), np.full((1, hidden), tiny), normal, normal * 1e-3, normal[:1] * tiny,
                           np.zeros((1, hidden)), normal[:1] * scales[0], normal[:1] * scales[1]])


def row_error(expected: np.ndarray, got: np.ndarray) -> float:
    if not np.array_equal(np.isfinite(expected), np.isfinite(got)):
        return float("inf")
    finite = np.isfinite(expected)
    scale = max(float(np.abs(expected[finite]).max(initial=0.0)), 1e-30)
    return float(np.abs(expected[finite] - got[finite]).max(initial=0.0)) / scale


def epsilon(got: np.ndarray, tiny: float) -> float:
    """eps from a row of ones (y = w / sqrt(1 + eps)) and a row of `tiny` (y = tiny w / sqrt(tiny^2 + eps)):
    their ratio t gives u = (tiny / t)^2 = (tiny^2 + eps) / (1 + eps)."""
    ones, small = got[0], got[1]
    large = np.abs(ones) >= 0.5 * np.abs(ones).max()
    ratio = float(np.median(small[large] / ones[large]))
    if not ratio > 0:
        return float("nan")
    u = (tiny / ratio) ** 2
    return (u - tiny * tiny) / (1.0 - u) if u < 1 else float("nan")


def own_constant(eps: float, nodes: list[ir.Node], probe) -> float:
    """The region's own scalar constant when it is the eps measured (to the measurement's
    precision), so that the fused op carries exactly the graph's value."""
    for value in _constant_inputs(nodes, probe):
        array = constant(value, probe)
        if array.size == 1 and abs(float(array.reshape(())) - eps) <= 1e-3 * abs(eps):
            return float(array.reshape(()))
    return eps


def graph_vector(measured: np.ndarray, nodes: list[ir.Node], probe, default: float = 1.0,
                 what: str = "scale") -> ir.Value | None:
    """The graph's vector equal to the `measured` one (Gemma's 1 + w is a value the graph computes);
    None when it is `default` everywhere (a norm without that vector)."""
    for value in _constant_inputs(nodes, probe):
        array = constant(value, probe)
        if array.size == measured.size and np.allclose(array.reshape(-1), measured, rtol=1e-4,
                                                       atol=1e-6 * max(np.abs(measured).max(), 1e-30)):
            return value
    if np.allclose(measured, default, rtol=1e-4, atol=1e-6):
        return None
    raise NoMatch(f"the norm's {what} is not one vector of the graph")


def _constant_inputs(nodes: list[ir.Node], probe) -> list[ir.Value]:
    return [value for node in nodes for value in node.inputs
            if value is not None and constant(value, probe) is not None]


def _residual(x: ir.Value, probe):
    try:
        return residual_sum(x, probe)
    except NoMatch:
        return None


def _replace(graph: ir.Graph, norm: Norm, probe) -> str:
    """Replace the region by the fused op (the skip form when x is a residual sum, else or if
    that fails, the plain one); returns the op written. Raises NoMatch."""
    residual = _residual(norm.x, probe)
    if residual is not None:
        try:
            return _build(graph, norm, probe, residual)
        except NoMatch:
            pass
    return _build(graph, norm, probe, None)


def _build(graph: ir.Graph, norm: Norm, probe, residual) -> str:
    builder = Builder(norm.name)
    scale = as_vector(builder, norm.scale, norm.x, probe)
    if residual is None:
        op = PLAIN
        out = builder.op(op, [norm.x, scale], {"epsilon": norm.eps, "axis": -1, "stash_type": 1},
                         name=f"{norm.name}/{op}")
        claims = [(norm.y, out)]
    else:
        op = SKIP
        h, skip, bias = residual
        outputs = builder.op(op, [h, skip, scale, bias], {"epsilon": norm.eps}, domain=MS_DOMAIN, num_outputs=4,
                             name=f"{norm.name}/{op}")
        claims = skip_claims(norm.x, norm.y, outputs, norm.nodes)
    prove(builder.nodes, claims, probe, opset=opset(graph))
    builder.commit(graph, after=norm.y.producer())
    substitute(claims, probe)
    return op


def as_vector(builder: Builder, value: ir.Value | None, x: ir.Value, probe, default: float = 1.0) -> ir.Value:
    """A norm's scale or bias as a 1-D vector of x's dtype, as the fused ops take it (`default`
    everywhere when the graph has none)."""
    dtype = regions.dtype(x, probe)
    if value is None:
        return builder.const(np.full(observed(x, probe).shape[-1], default, dtype))
    array = constant(value, probe)
    if array.ndim != 1:
        value = builder.op("Reshape", [value, builder.const([-1], np.int64)])
    if array.dtype != dtype:
        value = builder.op("Cast", [value], {"to": ir.DataType.from_numpy(dtype)})
    return value
