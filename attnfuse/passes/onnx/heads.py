"""How a tensor holds attention heads, told by its values, and how to bring it to a fused op's form.

Attention reads q, k and v as [batch, heads, length, size] ("heads first"), but graphs
keep them in many layouts before that: [B, L, hidden] from the projection, [B, L, H, D]
after a split, [B, H, L, D] after rotary embeddings or from a KV cache, [B*H, L, D]
in 3-D attention, [B*H, D, L] in BLOOM's key cache; and k and v may hold fewer heads
than q (grouped-query attention), repeated before the product. A layout is accepted
only when the tensor, read in it, equals what attention reads on every probe run.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from attnfuse.passes.onnx.graph import Builder, NoMatch

# Layouts, and how each is read as [B, H', L, D] given the batch, the head size and the length.
TOKENS = "B,L,H*D"
TOKENS_HEADS = "B,L,H,D"
HEADS_FIRST = "B,H,L,D"
HEADS_FIRST_T = "B,H,D,L"
FLAT_HEADS = "B*H,L,D"
FLAT_HEADS_T = "B*H,D,L"


def _read(layout: str, x: np.ndarray, batch: int, size: int, length: int) -> np.ndarray | None:
    """`x` as [B, H', L, D] if its shape fits `layout`, else None."""
    if layout == TOKENS and x.ndim == 3 and x.shape[:2] == (batch, length) and x.shape[2] % size == 0:
        return x.reshape(batch, length, -1, size).transpose(0, 2, 1, 3)
    if layout == TOKENS_HEADS and x.ndim == 4 and x.shape[:2] == (batch, length) and x.shape[3] == size:
        return x.transpose(0, 2, 1, 3)
    if layout == HEADS_FIRST and x.ndim == 4 and x.shape[0] == batch and x.shape[2:] == (length, size):
        return x
    if layout == HEADS_FIRST_T and x.ndim == 4 and x.shape[0] == batch and x.shape[2:] == (size, length):
        return x.transpose(0, 1, 3, 2)
    if layout == FLAT_HEADS and x.ndim == 3 and x.shape[0] % batch == 0 and x.shape[1:] == (length, size):
        return x.reshape(batch, -1, length, size)
    if layout == FLAT_HEADS_T and x.ndim == 3 and x.shape[0] % batch == 0 and x.shape[1:] == (size, length):
        return x.reshape(batch, -1, size, length).transpose(0, 1, 3, 2)
    return None


LAYOUTS = (TOKENS, TOKENS_HEADS, HEADS_FIRST, HEADS_FIRST_T, FLAT_HEADS, FLAT_HEADS_T)


@dataclass(frozen=True)
class Heads:
    """A tensor holding attention's q, k or v: its layout, its number of heads (k and v may
    repeat fewer heads than q has) and the factor attention multiplies it by."""

    value: ir.Value
    layout: str
    heads: int
    factor: float = 1.0


def recognise(value: ir.Value, factor: float, wanted: list[np.ndarray], seen: Callable[[ir.Value, int], np.ndarray],
              runs: list[int]) -> Heads | None:
    """`value` as q, k or v if, on every run, some layout of it (repeated per head group) times
    `factor` equals `wanted[run]` ([B, H, L, D], what attention reads)."""
    found = None
    for layout in LAYOUTS:
        heads = set()
        for run, target in zip(runs, wanted):
            batch, total, length, size = target.shape
            x = _read(layout, seen(value, run), batch, size, length)
            if x is None or total % x.shape[1] or not _close(np.repeat(x, total // x.shape[1], axis=1) * factor, target):
                break
            heads.add(x.shape[1])
        else:
            if len(heads) == 1:
                found = Heads(value, layout, heads.pop(), factor)
                break
    return found


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-6)
    return got.shape == want.shape and float(np.abs(got.astype(np.float64) - want).max(initial=0.0)) <= 1e-5 * scale


def as_tokens(b: Builder, x: Heads, size: int) -> ir.Value:
    """[B, L, heads * size] (what MultiHeadAttention takes as 3-D q, k, v)."""
    if x.layout == TOKENS:
        return x.value
    if x.layout == TOKENS_HEADS:
        return b.op("Reshape", [x.value, b.const([0, 0, x.heads * size], np.int64)])
    heads_first = as_heads_first(b, x, size)
    return b.op("Reshape", [b.op("Transpose", [heads_first], {"perm": [0, 2, 1, 3]}),
                            b.const([0, 0, x.heads * size], np.int64)])


def as_heads_first(b: Builder, x: Heads, size: int) -> ir.Value:
    """[B, heads, L, size] (MultiHeadAttention's 4-D key and value)."""
    if x.layout == HEADS_FIRST:
        return x.value
    if x.layout == HEADS_FIRST_T:
        return b.op("Transpose", [x.value], {"perm": [0, 1, 3, 2]})
    if x.layout in (TOKENS, TOKENS_HEADS):
        split = b.op("Reshape", [x.value, b.const([0, 0, x.heads, size], np.int64)]) if x.layout == TOKENS else x.value
        return b.op("Transpose", [split], {"perm": [0, 2, 1, 3]})
    if x.layout in (FLAT_HEADS, FLAT_HEADS_T):  # [B*H, a, b] -> [B, H, a, b]
        split = b.op("Reshape", [x.value, b.op("Concat", [b.const([-1, x.heads], np.int64),
                                                          b.op("Shape", [x.value], {"start": 1})], {"axis": 0})])
        return split if x.layout == FLAT_HEADS else b.op("Transpose", [split], {"perm": [0, 1, 3, 2]})
    raise NoMatch(f"no heads-first form of layout {x.layout}")


def repeated(b: Builder, heads_first: ir.Value, groups: int) -> ir.Value:
    """[B, H', L, D] with each head repeated `groups` times in a row: [B, H' * groups, L, D]."""
    if groups == 1:
        return heads_first
    grown = b.op("Unsqueeze", [heads_first, b.const([2], np.int64)])  # [B, H', 1, L, D]
    expanded = b.op("Expand", [grown, b.const([1, 1, groups, 1, 1], np.int64)])
    shape = b.op("Concat", [b.op("Shape", [heads_first], {"end": 1}), b.const([-1], np.int64),
                            b.op("Shape", [heads_first], {"start": 2})], {"axis": 0})
    return b.op("Reshape", [expanded, shape])
