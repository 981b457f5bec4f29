"""The description of one attention block, shared by the ONNX and the fx passes.

Matching produces an `AttentionSite`; lowering consumes it. Nothing in here knows
which graph format the site came from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Mask kinds, from the simplest to the most general.
MASK_NONE = "none"
MASK_KEY_PADDING = "key_padding"
MASK_CAUSAL = "causal"
MASK_CAUSAL_PADDING = "causal+key_padding"
MASK_WINDOW = "window"
MASK_ADDITIVE = "additive"

# Bias kinds (what is added to the scores besides the mask).
BIAS_NONE = "none"
BIAS_ALIBI = "alibi"
BIAS_ADDITIVE = "additive"

# Where k and v come from besides this step's projections.
CACHE_NONE = "none"
CACHE_PAST = "past"  # concatenated with a past k/v input (a KV cache)
CACHE_CROSS = "cross"  # read directly from inputs (cross-attention)


@dataclass
class Rotary:
    """Rotary position embedding applied to q and k before attention."""

    kind: str  # "half" (rotate-half, GPT-NeoX / Llama) or "interleaved" (GPT-J)
    dim: int  # rotated dims per head (head_size for full rotary)


@dataclass
class AttentionSite:
    """softmax(q @ k^T * scale + bias + mask) @ v, with its head split and merge.

    `q`, `k`, `v` and `output` are references into the source graph (ONNX values or
    fx nodes): `q`/`k`/`v` hold [batch, seq, heads*head_size] before the head split,
    `output` holds the merged result the fused op replaces.
    """

    name: str
    num_heads: int = 0
    head_size: int = 0
    scale: float = 0.0
    mask: str = MASK_NONE
    causal: bool = False
    bias: str = BIAS_NONE
    window: tuple[int, int] = (-1, -1)
    alibi_slopes: list[float] | None = None
    kv_heads: int = 0  # heads of k and v (grouped-query); 0 means num_heads
    rotary: Rotary | None = None
    cache: str = CACHE_NONE
    softcap: float = 0.0  # scores soft-capped as softcap * tanh(scores / softcap); 0 means none
    fused: bool = False
    reason: str | None = None
    already_fused: bool = False  # a fused op the input model came with (kept as it is)
    # Graph references, filled by the matcher of each side.
    q: Any = None
    k: Any = None
    v: Any = None
    output: Any = None
    # What the lowering found, for the passes after it.
    fused_node: str | None = None  # the fused attention node's name; None for lowerings in standard ops
    masks_padded_keys: bool = False  # its bias masks every padded key (it can run on packed tokens)
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
            "mask": self.mask,
            "causal": self.causal,
            "bias": self.bias,
        }
        if self.window != (-1, -1):
            out["window"] = list(self.window)
        if self.alibi_slopes:
            out["alibi_slopes"] = [round(s, 6) for s in self.alibi_slopes]
        out["kv_heads"] = self.kv_heads or self.num_heads
        if self.rotary is not None:
            fraction = self.rotary.dim / self.head_size if self.head_size else 1.0
            out["rotary"] = {"kind": self.rotary.kind, "dim": self.rotary.dim, "fraction": round(fraction, 6)}
        out["cache"] = self.cache
        if self.softcap:
            out["softcap"] = self.softcap
        if self.note:
            out["note"] = self.note
        if self.approximation is not None:
            out["approximation"] = self.approximation
        return out


@dataclass
class Fusion:
    """One rewrite other than attention: skip+bias+layernorm, bias+gelu, padding-free, ..."""

    name: str
    op: str
    fused: bool
    reason: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "fused": self.fused, "reason": self.reason}
