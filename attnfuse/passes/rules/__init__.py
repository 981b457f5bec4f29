"""The rewrite rules, written once for both front-ends (see core/rule.py), and the one order they run in."""
from __future__ import annotations

from attnfuse.core.options import PassOptions
from attnfuse.core.rule import Rule


def pipeline(options: PassOptions) -> list[Rule]:
    """Every rule, in the order both front-ends run them (padding-free comes after, on the fused graph)."""
    from attnfuse.passes.rules.attention import Attention
    from attnfuse.passes.rules.embed_layer_norm import EmbedLayerNorm
    from attnfuse.passes.rules.gelu import Gelu
    from attnfuse.passes.rules.normalization import Normalization
    from attnfuse.passes.rules.rotary import Rotary
    from attnfuse.passes.rules.skip_layer_norm import SkipLayerNorm

    # Rotary before attention: attention then reads rotated q and k. The norms and activations
    # after it: attention's replacement leaves the residual adds they fuse with in place.
    return [Rotary(), Attention(options), Normalization(), Gelu(), EmbedLayerNorm(), SkipLayerNorm()]
