"""Trace a head-split tensor back to where its heads were laid out, by value.

Attention reads q, k and v as [batch, heads, seq, head_size]; the fused ops take them
as the tensors they were split from: [B, L, G*D] (merged, as a projection writes
them), [B, L, G, D] (tokens first) or, where there is nothing earlier (a KV cache),
[B, G, L, D] itself. G may be fewer heads than attention reads (grouped-query and
multi-query attention): then each of the G heads must be repeated H / G times in a
row, whatever spelled the repeat (expand + reshape, repeat_interleave). Every
candidate is accepted by comparing values on the probe, never by its op names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from attnfuse.kernels import reference
from attnfuse.passes.fx.graph import LAYOUT, PASS_THROUGH, FxProbe, aten, close_enough, is_op

MERGED, TOKENS, HEADS = "merged", "tokens", "heads"
# Ops the walk goes through besides layout ops: slices (a no-op one is common), head repeats.
_REPEATS = {aten.slice.Tensor, aten.repeat_interleave.self_int, aten.repeat.default}


@dataclass
class Heads:
    """Where a [B, H, L, D] operand's heads come from."""

    node: fx.Node
    layout: str  # MERGED [B, L, G*D], TOKENS [B, L, G, D] or HEADS [B, G, L, D]
    groups: int  # G: the heads the source holds (H / G repeats each)
    factor: float  # a constant the operand was multiplied by after the source

    def value(self, probe: FxProbe, run: int) -> torch.Tensor:
        """The source as the fused ops take it: merged, or [B, G, L, D]."""
        x = probe.tensor(self.node, run)
        return x.flatten(2) if self.layout == TOKENS else x


def trace(node: fx.Node, canonical: list[torch.Tensor], probe: FxProbe) -> Heads | None:
    """The farthest tensor up from `node` whose heads, repeated, are `canonical` ([B, H, L, D]
    per probe run) up to a constant factor; None if there is none."""
    found, factor, current = None, 1.0, node
    for _ in range(32):
        match = _match(current, canonical, factor, probe)
        if match is not None:
            found = Heads(current, *match, factor)
        if is_op(current, *LAYOUT, *PASS_THROUGH, *_REPEATS):
            current = current.args[0]
        elif is_op(current, aten.mul.Tensor, aten.div.Tensor) and isinstance(current.args[1], (int, float)):
            factor *= current.args[1] if current.target == aten.mul.Tensor else 1.0 / current.args[1]
            current = current.args[0]
        elif is_op(current, aten.cat.default) and (nonempty := _only_nonempty(current, probe)) is not None:
            current = nonempty  # a cat with empty tensors (an empty cache) changes nothing
        else:
            break
    return found


def _only_nonempty(cat: fx.Node, probe: FxProbe) -> fx.Node | None:
    pieces = [p for p in cat.args[0] if not all(_empty(probe.tensor(p, r)) for r in range(probe.runs))]
    return pieces[0] if len(pieces) == 1 and isinstance(pieces[0], fx.Node) else None


def _empty(x: torch.Tensor | None) -> bool:
    return x is not None and x.numel() == 0


def _match(node: fx.Node, canonical: list[torch.Tensor], factor: float, probe: FxProbe) -> tuple[str, int] | None:
    """(layout, groups) if `node` holds the canonical heads in some layout on every run."""
    answers = {_layout(probe.tensor(node, r), heads, factor) for r, heads in enumerate(canonical)}
    answer = answers.pop()
    return answer if not answers else None


def _layout(x: torch.Tensor | None, heads: torch.Tensor, factor: float) -> tuple[str, int] | None:
    if x is None or not x.dtype.is_floating_point:
        return None
    batch, num_heads, length, size = heads.shape
    for layout, split in _splits(x, batch, length, size):
        groups = split.shape[1]
        if groups and num_heads % groups == 0 and close_enough(reference.repeat_kv(split, num_heads) * factor, heads, 1e-6):
            return layout, groups
    return None


def _splits(x: torch.Tensor, batch: int, length: int, size: int):
    """Each way x can hold heads of `size` for `batch` x `length` tokens, as [B, G, L, D]."""
    if x.shape[0] != batch or x.shape[-1] % size:
        return
    if x.dim() == 3 and x.shape[1] == length:
        yield MERGED, x.unflatten(-1, (-1, size)).transpose(1, 2)
    if x.dim() == 4 and x.shape[-1] == size:
        if x.shape[1] == length:
            yield TOKENS, x.transpose(1, 2)
        if x.shape[2] == length:
            yield HEADS, x
