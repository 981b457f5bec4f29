"""What a rewrite learned about the nodes it wrote, kept on those nodes for the passes after it.

Passes talk through typed facts on the graph's nodes (onnx_ir's and torch.fx's `node.meta`),
never through node names: the attention rule says which fused attention masks every padded
key, the rotary rule which rotary reads one position per token, padding-free knows its own nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_ATTENTION = "attnfuse.attention"
_PADDING_FREE = "attnfuse.padding_free"
_TOKEN_POSITIONS = "attnfuse.token_positions"
_SPELLS = "attnfuse.spells"


@dataclass(frozen=True)
class AttentionFacts:
    """What the attention rule proved about a fused attention node."""

    masks_padded_keys: bool  # its mask hides every key the padding mask marks as padded
    key_padding_only: bool  # its only mask is the padding mask (no causal triangle, no bias): it can
    # run on packed tokens without one, and a batch without padding can drop it
    mask_slot: str | None = None  # the input slot that holds the padding mask, if it takes it so
    causal_padding_only: bool = False  # its mask is the causal triangle and the padding mask, nothing else

    @property
    def per_sequence(self) -> bool:
        """Each sequence's real tokens attend among themselves (causally, or not) with no mask at all."""
        return self.masks_padded_keys and (self.key_padding_only or self.causal_padding_only)


def tag_attention(node: Any, facts: AttentionFacts) -> None:
    node.meta[_ATTENTION] = facts


def attention_facts(node: Any) -> AttentionFacts | None:
    return node.meta.get(_ATTENTION)


def tag_padding_free(node: Any) -> None:
    node.meta[_PADDING_FREE] = True


def is_padding_free(node: Any) -> bool:
    return bool(node.meta.get(_PADDING_FREE))


def tag_token_positions(node: Any) -> None:
    """A rotary whose position ids are [batch, seq], one per token: on packed tokens they are packed too."""
    node.meta[_TOKEN_POSITIONS] = True


def has_token_positions(node: Any) -> bool:
    return bool(node.meta.get(_TOKEN_POSITIONS))


def tag_spells(node: Any, op: Any) -> None:
    """`node` gives fused op `op` (a core.registry.FusedOp) spelled in standard ops: rules see that op, not
    the standard op (the LayerNormalization of a skip layernorm is no anchor for another fusion)."""
    node.meta[_SPELLS] = op


def spelled_op(node: Any) -> Any:
    """The fused op `node` spells, or None."""
    return node.meta.get(_SPELLS)
