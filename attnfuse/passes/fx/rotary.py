"""Rotary position embeddings on q and k -> attnfuse::rotary, recognised by what they compute.

Where attention reads q or k, the walk up through layout ops stops at the op that
wrote it: the end of a rotary embedding, if there is one. Its region is the ops
between a tensor x of the same shape (the heads before rotation) and that end; a
rotary region reads exactly two other tensors, the cosines and sines, from the graph.
Rather than parse the region (rotate-half or interleaved, full or partial, negated
halves concatenated or strided copies), it is evaluated: the region is accepted when
its output equals reference.rotary(x, cos, sin) on every probe run for one of the
ways to read the two tensors (which is cos, rotate-half or interleaved pairs, given at
full or half width). The replacement rotates x's merged source [B, S, heads * D], so
that attention and padding-free see token-wise rows.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.fx as fx

from attnfuse.core.measure.heads import Layout
from attnfuse.kernels import ops, reference
from attnfuse.passes.fx.adapter import FxGraph
from attnfuse.passes.fx.view import TorchView, to_numpy
from attnfuse.passes.rules.attention import attention_operands, heads_source
from attnfuse.passes.fx.graph import (
    LAYOUT, PASS_THROUGH, FxProbe, NoMatch, aten, between, close_enough,
    is_op, region_inputs, remove_dead, rewrite_unless_excluded,
)
from attnfuse.core.outcome import Fusion

TOLERANCE = 1e-5
_WALK = (*LAYOUT, *PASS_THROUGH, aten.slice.Tensor, aten.repeat_interleave.self_int)


@dataclass
class Rotation:
    """x's heads rotated by the graph's cos and sin tensors, as the region computes them."""

    end: fx.Node  # the region's output, [B, H, L, D] or [B, L, H, D]
    x: fx.Node  # the heads before rotation, same shape and layout
    cos: fx.Node
    sin: fx.Node
    interleaved: bool
    halved: bool  # cos and sin hold each angle twice (full width): take one of each pair
    head_dim: int  # the dim of x that counts heads (1 or 2)


def fuse(graph: fx.Graph, probe: FxProbe, exclude: frozenset[str]) -> list[Fusion]:
    fusions, seen = [], set()
    view = TorchView(probe)
    for operand in attention_operands(FxGraph(graph, view), view):
        candidates = [(end, *c) for end in _ends(operand, probe) if end not in seen for c in _candidates(end, probe)]
        if not candidates:
            continue
        # The first that proves: a partial rotary's concat before its parts, a cache's concat after.
        end, rotation = next(((c[0], r) for c in candidates if (r := _proven(*c, probe))), (candidates[0][0], None))
        seen.add(end)
        fusion = Fusion(f"rotary:{end.name}", "rotary", fused=False)
        rewrite_unless_excluded(fusion, exclude, lambda: _replace(graph, rotation, probe))
        fusions.append(fusion)
    remove_dead(graph)
    return fusions


def _ends(operand: fx.Node, probe: FxProbe) -> list[fx.Node]:
    """Where the walk up from an attention operand through layout ops stops; for a concat
    (a partial rotary's, or a KV cache's), its parts too."""
    node = operand
    while is_op(node, *_WALK):
        node = node.args[0]
    ends = [node, *(node.args[0] if is_op(node, aten.cat.default) else [])]
    return [n for n in ends if isinstance(n, fx.Node) and n.op == "call_function" and _heads_like(n, probe)]


def _heads_like(node: fx.Node, probe: FxProbe) -> bool:
    value = probe.tensor(node, 0)
    return value is not None and value.dim() == 4 and value.dtype.is_floating_point and value.numel() > 0


def _candidates(end: fx.Node, probe: FxProbe) -> list[tuple[fx.Node, list[fx.Node]]]:
    """Each (x, [two tensors]) such that `end` is the output of a region that reads a same-shaped
    x and exactly two other tensors that hold a row per token, the same for every head."""
    shape = probe.tensor(end, 0).shape
    found = []
    for x in _ancestors(end):
        if probe.tensor(x, 0) is None or probe.tensor(x, 0).shape != shape:
            continue
        region = between(x, end)
        if region is None:
            continue
        tables = [t for t in region_inputs(region, x) if isinstance(probe.tensor(t, 0), torch.Tensor)]
        if len(tables) == 2 and all(_table_like(probe.tensor(t, 0), shape) for t in tables):
            found.append((x, tables))
    return found


def _ancestors(node: fx.Node, depth: int = 8) -> list[fx.Node]:
    """Nodes up from `node`, nearest first."""
    found, frontier = [], [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in found]
        found.extend(dict.fromkeys(frontier))
    return found


def _table_like(value: torch.Tensor, shape: torch.Size) -> bool:
    """Per-token values over the last dim that broadcast over the heads of [B, H, L, D] or [B, L, H, D]."""
    return value.dtype.is_floating_point and value.numel() > 0 and 2 <= value.dim() <= 4 \
        and 0 < value.shape[-1] <= shape[-1] and (value.dim() < 4 or 1 in value.shape[1:3])


def _proven(end: fx.Node, x: fx.Node, tables: list[fx.Node], probe: FxProbe) -> Rotation | None:
    """The reading of the two tables under which the region is reference.rotary, if any."""
    for (cos, sin), interleaved, halved, head_dim in itertools.product(
            itertools.permutations(tables), (False, True), (True, False), (1, 2)):
        rotation = Rotation(end, x, cos, sin, interleaved, halved, head_dim)
        if all(_reproduces(rotation, probe, run) for run in range(probe.runs)):
            return rotation
    return None


def _reproduces(rotation: Rotation, probe: FxProbe, run: int) -> bool:
    cos, sin = (_half(probe.tensor(t, run), rotation) for t in (rotation.cos, rotation.sin))
    x = probe.tensor(rotation.x, run)
    if cos is None or 2 * cos.shape[-1] > x.shape[-1] or not _broadcasts(cos, rotation.head_dim):
        return False
    try:
        got = reference.rotary(x, _per_head(cos, rotation.head_dim), _per_head(sin, rotation.head_dim), rotation.interleaved)
    except RuntimeError:  # the tables do not broadcast against x this way
        return False
    return close_enough(got, probe.tensor(rotation.end, run), TOLERANCE)


def _half(table: torch.Tensor, rotation: Rotation) -> torch.Tensor | None:
    """One angle per rotated pair: of a full-width table, the first half or every other entry."""
    if not rotation.halved:
        return table
    if table.shape[-1] % 2:
        return None
    return table[..., 0::2] if rotation.interleaved else table[..., : table.shape[-1] // 2]


def _broadcasts(table: torch.Tensor, head_dim: int) -> bool:
    """Whether the table holds one row per token, the same for every head."""
    dims = 4 - table.dim()
    return head_dim < dims or table.shape[head_dim - dims] == 1


def _per_head(table: torch.Tensor, head_dim: int) -> torch.Tensor:
    return table.reshape(*([1] * (4 - table.dim())), *table.shape)


def _replace(graph: fx.Graph, rotation: Rotation | None, probe: FxProbe) -> None:
    """x's merged source rotated by attnfuse::rotary, viewed back as the region's output."""
    if rotation is None:
        raise NoMatch("the region between the projection and attention is not a rotation by the graph's cos and sin")
    x = probe.tensor(rotation.x, 0)
    canonical = [_heads_first(probe.tensor(rotation.x, r), rotation.head_dim) for r in range(probe.runs)]
    view = TorchView(probe)
    try:
        source = heads_source(FxGraph(graph, view), view, rotation.x, [to_numpy(c) for c in canonical],
                              list(range(probe.runs)))
    except NoMatch:
        source = None
    if source is None or source.layout not in (Layout.TOKENS, Layout.TOKENS_HEADS) or source.factor != 1.0 \
            or source.heads != x.shape[rotation.head_dim]:
        raise NoMatch("the rotated heads do not come from a [batch, seq, heads * head_size] tensor")
    count, size = x.shape[rotation.head_dim], x.shape[-1]
    added = []

    def add(target, *args):
        added.append(graph.call_function(target, args))
        return added[-1]

    with graph.inserting_before(rotation.end):
        merged = add(aten.flatten.using_ints, source.value, 2) if source.layout is Layout.TOKENS_HEADS \
            else source.value
        tables = [_token_table(add, table, rotation, probe) for table in (rotation.cos, rotation.sin)]
        rotated = add(ops.rotary, merged, *tables, count, rotation.interleaved)
        out = add(aten.unflatten.int, rotated, -1, (count, size))
        if rotation.head_dim == 1:
            out = add(aten.transpose.int, out, 1, 2)
    probe.record(*added)
    if not all(close_enough(probe.tensor(out, r), probe.tensor(rotation.end, r), TOLERANCE) for r in range(probe.runs)):
        for node in reversed(added):
            graph.erase_node(node)
        raise NoMatch("the fused rotary does not reproduce the original")
    rotation.end.replace_all_uses_with(out)
    probe.alias(out, rotation.end)


def _heads_first(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x if head_dim == 1 else x.transpose(1, 2)


def _token_table(add, table: fx.Node, rotation: Rotation, probe: FxProbe) -> fx.Node:
    """The table as attnfuse::rotary takes it: [B or 1, L, rd / 2], one row per token."""
    for _ in range(4 - probe.tensor(table, 0).dim()):
        table = add(aten.unsqueeze.default, table, 0)
    table = add(aten.select.int, table, rotation.head_dim, 0)
    if rotation.halved:
        width = probe.tensor(rotation.cos, 0).shape[-1]
        table = add(aten.slice.Tensor, table, -1, 0, None, 2) if rotation.interleaved \
            else add(aten.slice.Tensor, table, -1, 0, width // 2)
    return table
