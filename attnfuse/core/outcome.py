"""What a rule reports about each place it looked at: plain data, the same for both front-ends.

An `AttentionSite` describes one attention block (heads, scale, mask, cache, rotary, ...)
and whether it was fused; a `Fusion` is any other rewrite (skip + layernorm, gelu,
RMSNorm, padding-free, ...). Neither holds a graph reference: the graph side of a match
stays in the rule's own typed match, so a report can outlive the graph it describes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnfuse.core.text_enum import TextEnum


class MaskKind(TextEnum):
    """What the scores' mask hides, from the simplest to the most general."""

    NONE = "none"
    KEY_PADDING = "key_padding"
    CAUSAL = "causal"
    CAUSAL_PADDING = "causal+key_padding"
    WINDOW = "window"
    ADDITIVE = "additive"


class BiasKind(TextEnum):
    """What is added to the scores besides the mask."""

    NONE = "none"
    ALIBI = "alibi"
    ADDITIVE = "additive"


class CacheKind(TextEnum):
    """Where k and v come from besides this step's projections."""

    NONE = "none"
    PAST = "past"  # concatenated with a past k/v input (a KV cache)
    CROSS = "cross"  # read directly from inputs (cross-attention)


class RotaryKind(TextEnum):
    HALF = "half"  # rotate-half (GPT-NeoX, Llama)
    INTERLEAVED = "interleaved"  # pairs of neighbours (GPT-J)


@dataclass
class Rotary:
    """Rotary position embedding applied to q and k before attention."""

    kind: RotaryKind
    dim: int  # rotated dims per head (head_size for full rotary)


@dataclass
class AttentionSite:
    """softmax(q @ k^T * scale + bias + mask) @ v, with its head split and merge: the report's view."""

    name: str
    num_heads: int = 0
    head_size: int = 0
    scale: float = 0.0
    mask: MaskKind = MaskKind.NONE
    causal: bool = False
    bias: BiasKind = BiasKind.NONE
    window: tuple[int, int] = (-1, -1)
    alibi_slopes: list[float] | None = None
    kv_heads: int = 0  # heads of k and v (grouped-query); 0 means num_heads
    rotary: Rotary | None = None
    cache: CacheKind = CacheKind.NONE
    softcap: float = 0.0  # scores soft-capped as softcap * tanh(scores / softcap); 0 means none
    fused: bool = False
    reason: str | None = None
    already_fused: bool = False  # a fused op the input model came with (kept as it is)
    note: str | None = None  # why a faster exact form was not used, when it was tried
    approximation: dict[str, Any] | None = None  # the error of an approximate mode against exact attention

    def summary(self) -> dict[str, Any]:
        """The JSON-able part, for reports and `attnfuse inspect`."""
        out = {
            "name": self.name,
            "fused": self.fused,
            "reason": self.reason,
            "already_fused": self.already_fused,
            "num_heads": self.num_heads,
            "head_size": self.head_size,
            "scale": self.scale,
            "mask": str(self.mask),
            "causal": self.causal,
            "bias": str(self.bias),
        }
        if self.window != (-1, -1):
            out["window"] = list(self.window)
        if self.alibi_slopes:
            out["alibi_slopes"] = [round(s, 6) for s in self.alibi_slopes]
        out["kv_heads"] = self.kv_heads or self.num_heads
        if self.rotary is not None:
            fraction = self.rotary.dim / self.head_size if self.head_size else 1.0
            out["rotary"] = {"kind": str(self.rotary.kind), "dim": self.rotary.dim, "fraction": round(fraction, 6)}
        out["cache"] = str(self.cache)
        if self.softcap:
            out["softcap"] = self.softcap
        if self.note:
            out["note"] = self.note
        if self.approximation is not None:
            out["approximation"] = self.approximation
        return out


@dataclass
class Fusion:
    """One rewrite other than attention: skip + bias + layernorm, bias + gelu, padding-free, ..."""

    name: str
    op: str
    fused: bool
    reason: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "fused": self.fused, "reason": self.reason}


Outcome = AttentionSite | Fusion
