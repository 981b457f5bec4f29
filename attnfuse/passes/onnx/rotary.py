"""Rotary embeddings on q and k -> RotaryEmbedding (com.microsoft).

    y = x * cos + rotate(x) * sin    on the first r entries of each head (the rest passes)

with rotate the rotate-half (-x2, x1) or the interleaved (-x1, x0, -x3, x2, ...) form. A
candidate is a value y that the graph computes from one activation x of the same shape
(q or k in any layout: [B, H, S, D], [B, S, H, D] or [B, S, H*D]) through layout ops,
negations, sums, and products with two other tensors, its cos and its sin however the
graph computes them (from position ids, from a table). The region is evaluated on random x
with the probe's cos and sin, and compared with the rotary of each form, width, head layout
and cos/sin assignment: the one it equals is the op to write. That op is then proved on
the probe's values like every rewrite.

The fused op takes the graph's own cos and sin as its caches, one row per token
([B*S, r/2]; [S, r/2] when every row of the batch shares them), with position ids that
pick each token's own row (arange(B*S) as [B, S]; the offset 0): exact for any positions,
with no table of a guessed maximum length. Where the graph gathers cos and sin from constant
tables by position ids, the op reads those tables and ids instead (cheaper: no per-token
rows to build). The caches and position ids are built once per cos/sin pair and shared by
every q and k that reads it.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from attnfuse.kernels import reference
from attnfuse.core import tolerance as precision
from attnfuse.passes.onnx import regions
from attnfuse.passes.onnx.graph import MS_DOMAIN, Builder, NoMatch, attr, constant, observed, opset, runs_seeing
from attnfuse.passes.onnx.proof import evaluate, prove, relative_error, substitute
from attnfuse.core.outcome import Fusion

OP = "RotaryEmbedding"
OPS = frozenset({"Mul", "Add", "Sub", "Neg", "Slice", "Split", "Concat", "Reshape", "Unsqueeze", "Squeeze",
                 "Transpose", "Gather", "Cast"})
_WALK_LIMIT = 64  # nodes: a rotary with its layout ops is some 10 to 20
HALF, EVEN, WHOLE = "first half", "even entries", "whole"  # which part of a cos row is the cache row
HEAD_TRANSPOSE = (0, 2, 1, 3)  # [B, S, H, D] <-> [B, H, S, D]


@dataclass(frozen=True)
class Layout:
    """How x holds its heads: the token axis and the heads (x is [B, H, S, D] when it is 2)."""

    token_axis: int
    heads: int
    head_size: int
    rank: int

    def to_bshd(self, x: np.ndarray) -> np.ndarray:
        if self.rank == 3:
            return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_size)
        return x.transpose(0, 2, 1, 3) if self.token_axis == 2 else x

    def from_bshd(self, x: np.ndarray) -> np.ndarray:
        if self.rank == 3:
            return x.reshape(x.shape[0], x.shape[1], -1)
        return x.transpose(0, 2, 1, 3) if self.token_axis == 2 else x


@dataclass
class Rotary:
    """A rotary region: y = rotary(x) with the cos and sin the graph multiplies by."""

    name: str
    x: ir.Value
    y: ir.Value
    nodes: list[ir.Node]
    cos: ir.Value
    sin: ir.Value
    cache_rows: str  # HALF, EVEN or WHOLE
    width: int  # r, the rotated entries of each head
    interleaved: bool
    layout: Layout
    batch_shared: bool  # one cos row per position, shared by the rows of the batch


def fuse(graph: ir.Graph, probe, exclude) -> list[Fusion]:
    fusions, claimed, failures = [], set(), []
    caches = _Caches(graph, probe)
    for node in reversed(list(graph)):  # the widest region first: a partial rotary before its rotated part
        if id(node) in claimed or node.op_type not in OPS:
            continue
        try:
            found = find_rotary(node.outputs[0], probe)
            if found is None:
                continue
            claimed.update(id(n) for n in found.nodes)  # excluded or not, no narrower rotary inside it
            if found.name in exclude:
                fusions.append(Fusion(found.name, OP, False, "excluded (rolled back)"))
                continue
            caches.replace(found)
        except NoMatch as why:
            failures.append((node, str(why), {id(n) for n in _walk(node.outputs[0], probe)[0]}))
            continue
        fusions.append(Fusion(found.name, OP, True))
    # A region that looked like a rotary and holds none that was fused: say why it was not.
    fusions += [Fusion(node.name, OP, False, why) for node, why, walked in failures if not walked & claimed]
    return fusions


def find_rotary(y: ir.Value, probe) -> Rotary | None:
    """The rotary that computes y, None if y is not one; NoMatch when y's region multiplies by a
    cos/sin pair but is no rotary this module can write."""
    if not _activation(y, probe) or not (y.uses() or y.is_graph_output()):
        return None
    walked, values = _walk(y, probe)
    for x in values[1:]:
        if not _same_shapes(x, y, probe):
            continue
        found = _region(x, y, walked, probe)
        if found is None:
            continue
        nodes, (first, second) = found
        if not _cos_and_sin(first, second, probe):
            continue
        return _recognise(y, x, nodes, first, second, probe)
    return None


def _activation(value: ir.Value, probe) -> bool:
    seen = probe.get(value.name) if value.name else None
    return seen is not None and seen.dtype.kind == "f" and seen.ndim in (3, 4) and constant(value, probe) is None


def _float(value: ir.Value, probe) -> bool:
    seen = probe.get(value.name) if value.name else None
    return seen is None or seen.dtype.kind == "f"


def _inside(node: ir.Node, probe) -> bool:
    if node.op_type not in OPS or node.domain not in ("", "ai.onnx"):
        return False
    return node.op_type != "Gather" or constant(node.inputs[1], probe) is not None


def _walk(y: ir.Value, probe) -> tuple[list[ir.Node], list[ir.Value]]:
    """The nodes (of OPS) that y is computed by, and the non-constant values they read, nearest first."""
    nodes, values, seen, queue = [], [y], {id(y)}, collections.deque([y])
    while queue and len(nodes) < _WALK_LIMIT:
        node = queue.popleft().producer()
        if node is None or not _inside(node, probe) or any(n is node for n in nodes):
            continue
        nodes.append(node)
        for value in node.inputs:
            if value is not None and id(value) not in seen and constant(value, probe) is None:
                seen.add(id(value))
                values.append(value)
                queue.append(value)
    return nodes, values


def _same_shapes(x: ir.Value, y: ir.Value, probe) -> bool:
    if not _activation(x, probe):
        return False
    runs = probe.runs_seeing(y.name)
    return all(probe.get(x.name, run) is not None and probe.get(x.name, run).shape == probe.get(y.name, run).shape
               for run in runs)


def _region(x: ir.Value, y: ir.Value, walked: list[ir.Node], probe):
    """(the nodes between x and y, the two tensors they multiply x by) when y is linear in x
    through them and reads nothing else but constants; else None."""
    depends, nodes, changed = {id(x)}, [], True
    while changed:  # the walked nodes that read x, directly or not
        changed = False
        for node in walked:
            if not any(n is node for n in nodes) and any(v is not None and id(v) in depends for v in node.inputs):
                nodes.append(node)
                depends.update(id(out) for out in node.outputs)
                changed = True
    if id(y) not in depends:
        return None
    factors = []
    for node in nodes:
        reads_x = [v for v in node.inputs if v is not None and id(v) in depends]
        others = [v for v in node.inputs if v is not None and id(v) not in depends and constant(v, probe) is None]
        if node.op_type == "Mul":
            if len(reads_x) != 1:
                return None  # x times x: not linear
            factors += [v for v in others if not any(v is f for f in factors)]
        elif any(_float(v, probe) for v in others):
            return None  # x combined with another activation other than by a product (shapes may vary)
    if len(factors) != 2 or not regions.closed(nodes, y):
        return None
    return regions.in_graph_order(nodes, y), factors


def _cos_and_sin(first: ir.Value, second: ir.Value, probe) -> bool:
    """The two factors look like a cos and a sin of the same angles (cos^2 + sin^2 the same everywhere,
    a scale such as YaRN's allowed)."""
    a, b = (probe.get(v.name) for v in (first, second))
    if a is None or b is None or a.shape != b.shape or a.dtype.kind != "f":
        return False
    total = a.astype(np.float64) ** 2 + b.astype(np.float64) ** 2
    return bool(total.size) and float(total.mean()) > 0 and np.allclose(total, total.mean(), rtol=1e-3)


def _recognise(y: ir.Value, x: ir.Value, nodes: list[ir.Node], first: ir.Value, second: ir.Value, probe) -> Rotary:
    """Evaluate the region on random x and find the rotary it equals. Raises NoMatch."""
    run = runs_seeing([y], probe)[0]
    shape, dtype = observed(x, probe, run).shape, observed(x, probe, run).dtype
    points = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    version = opset(y.graph) if y.graph is not None else 20
    (got,) = evaluate(nodes, [y], lambda value: points if value is x else observed(value, probe, run), version)
    factors = {id(v): observed(v, probe, run) for v in (first, second)}
    tolerance = precision.tolerance(dtype)
    for layout in _layouts(shape):
        for cos, sin in ((first, second), (second, first)):
            for rows in (HALF, EVEN, WHOLE):
                cache = _cache_rows(factors[id(cos)], factors[id(sin)], rows, shape[0], shape[layout.token_axis])
                if cache is None:
                    continue
                cos_rows, sin_rows, batch_shared = cache
                width = 2 * cos_rows.shape[-1]
                if width > layout.head_size:
                    continue
                for interleaved in (False, True):
                    expected = rotary_reference(points, layout, cos_rows, sin_rows, interleaved)
                    if relative_error(expected, got) <= tolerance:
                        return Rotary(y.producer().name, x, y, nodes, cos, sin, rows, width, interleaved, layout,
                                      batch_shared)
    raise NoMatch("the region multiplies by a cos/sin pair but equals no rotary (rotate-half or interleaved, "
                  "full or partial) of its input")


def _layouts(shape: tuple[int, ...]) -> list[Layout]:
    if len(shape) == 4:
        return [Layout(2, shape[1], shape[3], 4), Layout(1, shape[2], shape[3], 4)]
    hidden = shape[-1]
    return [Layout(1, hidden // size, size, 3) for size in range(2, hidden + 1, 2) if hidden % size == 0]


def _cache_rows(cos: np.ndarray, sin: np.ndarray, rows: str, batch: int, tokens: int):
    """Each token's cos and sin rows ([B or 1, S, r/2]) if the factors hold one row per token
    (per row of the batch, or shared by all), taking `rows` of each; else None."""
    width = cos.shape[-1]
    if cos.size == batch * tokens * width:
        lead, batch_shared = batch, False
    elif cos.size == tokens * width:
        lead, batch_shared = 1, True
    else:
        return None
    if rows != WHOLE and width % 2:
        return None
    pick = _pick(rows, width)
    return (cos.reshape(lead, tokens, width)[..., pick], sin.reshape(lead, tokens, width)[..., pick], batch_shared)


def _pick(rows: str, width: int) -> slice:
    """The entries of a cos row (of `width`) that are the cache row."""
    return {HALF: slice(0, width // 2, 1), EVEN: slice(0, width, 2), WHOLE: slice(0, width, 1)}[rows]


def rotary_reference(x: np.ndarray, layout: Layout, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """com.microsoft.RotaryEmbedding (kernels/reference.py's rotary) on x in its layout, with each
    token's cos and sin rows ([B or 1, S, r/2])."""
    tokens = torch.from_numpy(layout.to_bshd(x.astype(np.float64)))
    cos_rows, sin_rows = (torch.from_numpy(v.astype(np.float64))[:, :, None, :] for v in (cos, sin))
    return layout.from_bshd(reference.rotary(tokens, cos_rows, sin_rows, interleaved).numpy())


class _Caches:
    """The fused op's caches and position ids, built once per cos/sin pair and shared."""

    def __init__(self, graph: ir.Graph, probe):
        self.graph, self.probe = graph, probe
        self._built: dict[tuple, tuple[list[ir.Node], tuple[ir.Value, ir.Value, ir.Value], bool]] = {}

    def replace(self, rotary: Rotary) -> None:
        """Replace the rotary's region by the fused op, proved first. Raises NoMatch."""
        cos, sin = (_view_source(v, self.probe) for v in (rotary.cos, rotary.sin))
        key = (id(cos), id(sin), rotary.cache_rows, rotary.batch_shared)
        if key not in self._built:
            self._built[key] = (*self._build(rotary, cos, sin), False)
        shared, (cos_cache, sin_cache, positions), committed = self._built[key]
        builder = Builder(rotary.name)
        layout, x = rotary.layout, rotary.x
        attributes = {"interleaved": int(rotary.interleaved)}
        if rotary.width < layout.head_size or layout.rank == 3:
            attributes.update(rotary_embedding_dim=rotary.width, num_heads=layout.heads)
        heads_first = layout.rank == 4 and layout.token_axis == 2
        tokens = _before_head_transpose(x) if heads_first else (x if layout.rank == 4 else None)
        if tokens is not None:
            # [B, S, H, D] goes in as [B, S, H*D] (the op reads 4-D input as [B, H, S, D]). Heads-first x
            # is rotated before its head transpose, which then follows the op: ONNX Runtime cancels
            # it against attention's transpose back, as it does around the decomposed rotary.
            attributes.update(rotary_embedding_dim=rotary.width, num_heads=layout.heads)
            given = builder.op("Reshape", [tokens, builder.const([0, 0, -1], np.int64)])
        else:
            given = x
        out = builder.op(OP, [given, positions, cos_cache, sin_cache], attributes, domain=MS_DOMAIN,
                         name=f"{rotary.name}/{OP}")
        if tokens is not None:
            out = builder.op("Reshape", [out, builder.op("Shape", [tokens])])
            if heads_first:
                out = builder.op("Transpose", [out], {"perm": list(HEAD_TRANSPOSE)})
        claims = [(rotary.y, out)]
        prove(shared + builder.nodes, claims, self.probe, opset=opset(self.graph))
        if not committed:
            self._insert_after_all([cos, sin], shared)
            self._built[key] = (shared, (cos_cache, sin_cache, positions), True)
        builder.commit(self.graph, after=rotary.y.producer())
        substitute(claims, self.probe)

    def _build(self, rotary: Rotary, cos: ir.Value, sin: ir.Value):
        """The caches and position ids from `cos` and `sin`, the tensors (or views of the tensors)
        the region multiplies by: the constant tables and their indices when cos and sin are rows
        gathered from tables (measured cheaper on ONNX Runtime's CPU provider, see
        benchmarks/decoder_fusions.py), else one row per token."""
        b = Builder(f"{rotary.name}/caches")
        width = self.probe.get(cos.name).shape[-1]
        pick = _pick(rotary.cache_rows, width)
        tables = None if rotary.batch_shared else _tables(cos, sin, self.probe)
        if tables is not None:
            indices = tables[2]
            positions = indices if self.probe.get(indices.name).dtype == np.int64 else \
                b.op("Cast", [indices], {"to": ir.DataType.INT64})
            return b.nodes, (b.const(tables[0][:, pick]), b.const(tables[1][:, pick]), positions)

        def rows(value: ir.Value) -> ir.Value:
            flat = b.op("Reshape", [value, b.const([-1, width], np.int64)])
            if rotary.cache_rows == WHOLE:
                return flat
            return b.op("Slice", [flat, b.const([pick.start], np.int64), b.const([pick.stop], np.int64),
                                  b.const([1], np.int64), b.const([pick.step], np.int64)])

        cos_cache, sin_cache = rows(cos), rows(sin)
        if rotary.batch_shared:
            positions = b.const([0], np.int64)  # token s reads row 0 + s
        else:
            count = b.op("Squeeze", [b.op("Shape", [cos_cache], {"start": 0, "end": 1}), b.const([0], np.int64)])
            every = b.op("Range", [b.const(0, np.int64), count, b.const(1, np.int64)])
            axes = _token_axes(cos, self.probe)
            positions = b.op("Reshape", [every, b.op("Gather", [b.op("Shape", [cos]), b.const(axes, np.int64)])])
        return b.nodes, (cos_cache, sin_cache, positions)

    def _insert_after_all(self, values: list[ir.Value], nodes: list[ir.Node]) -> None:
        order = {id(node): i for i, node in enumerate(self.graph)}
        producers = [v.producer() for v in values if v.producer() is not None and id(v.producer()) in order]
        if producers:
            self.graph.insert_after(max(producers, key=lambda n: order[id(n)]), nodes)
        else:
            self.graph.insert_before(next(iter(self.graph)), nodes)


def _before_head_transpose(x: ir.Value) -> ir.Value | None:
    """The [B, S, H, D] tensor that heads-first x is the transpose of, or None."""
    node = x.producer()
    if node is None or node.op_type != "Transpose" or tuple(attr(node, "perm", ())) != HEAD_TRANSPOSE:
        return None
    return node.inputs[0]


def _view_source(value: ir.Value, probe) -> ir.Value:
    """The tensor `value` is a view of (through Unsqueeze, Squeeze, Reshape) with the same last
    axis: each layer's Unsqueeze of one cos reads the same rows, and shares its caches."""
    width = probe.get(value.name).shape[-1]
    while (node := value.producer()) is not None and node.op_type in ("Unsqueeze", "Squeeze", "Reshape"):
        source = node.inputs[0]
        seen = probe.get(source.name) if source.name else None
        if seen is None or seen.ndim == 0 or seen.shape[-1] != width or constant(source, probe) is not None:
            break
        value = source
    return value


def _tables(cos: ir.Value, sin: ir.Value, probe):
    """(cos table, sin table, indices) when cos and sin are rows of constant tables gathered by the
    same [B, S] indices (the position ids); else None."""
    gathers = [v.producer() for v in (cos, sin)]
    if any(g is None or g.op_type != "Gather" or attr(g, "axis", 0) != 0 for g in gathers) \
            or gathers[0].inputs[1] is not gathers[1].inputs[1]:
        return None
    tables = [constant(g.inputs[0], probe) for g in gathers]
    indices = gathers[0].inputs[1]
    seen = probe.get(indices.name) if indices.name else None
    if any(t is None or t.ndim != 2 for t in tables) or seen is None or seen.ndim != 2 or seen.dtype.kind not in "iu":
        return None
    return tables[0], tables[1], indices


def _token_axes(cos: ir.Value, probe) -> list[int]:
    """The batch and token axes of a per-token cos: the axes before the last that are not 1 in
    some run. Raises NoMatch."""
    shapes = [probe.get(cos.name, run).shape for run in probe.runs_seeing(cos.name)]
    axes = [axis for axis in range(len(shapes[0]) - 1) if any(shape[axis] != 1 for shape in shapes)]
    if len(axes) != 2:
        raise NoMatch("the cos tensor has no batch and token axes to read the positions from")
    return axes
