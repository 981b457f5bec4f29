"""Attention lowered in a torch.fx graph: attnfuse::attention (kernels/ops.py: SDPA with enable_gqa on
the CPU, the Triton kernel on CUDA), with q, k and v as the tensors that hold their heads.

Its mask is the padding mask input and a causal flag where those are all the scores hide and
nothing is added; otherwise the graph's own bias: SDPA's mask, or f(0), the score chain
replayed on a zero product. Soft-capped scores are refused: no torch op here soft-caps.
"""
from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
import torch.fx as fx

from attnfuse.core.facts import AttentionFacts, tag_attention
from attnfuse.core.measure.heads import Layout
from attnfuse.core.options import PassOptions
from attnfuse.core.outcome import BiasKind, MaskKind
from attnfuse.core.rule import NoMatch, Replacement
from attnfuse.kernels import ops
from attnfuse.passes.fx.spelling import FxBuilder
from attnfuse.passes.rules.attention import AttentionMatch, Heads

aten = torch.ops.aten
LABEL = "attnfuse::attention"


def lowerings(match: AttentionMatch, graph, view, options: PassOptions) -> Iterator[Replacement]:
    if match.softcap:
        raise NoMatch("the scores are soft-capped (cap * tanh(scores / cap)); attnfuse::attention and SDPA "
                      "have no soft-cap")
    b = graph.builder(graph.label(match.anchor))
    q, k, v = (_operand(b, x) for x in (match.q, match.k, match.v))
    padding, causal, bias = _mask(match, graph.padding_mask())
    if bias is _OWN:
        bias = match.sdpa_mask if match.product is None else _zero_product_scores(b, match, view, graph.padding_mask())
    out = b.call(ops.attention, q, k, v, padding, bias, match.num_heads, match.scale, causal)
    tag_attention(out, AttentionFacts(match.mask.masks_padded_keys, padding is not None,
                                      "key_padding_mask" if padding is not None else None))
    shape = view.value(match.output).shape  # the merged output laid out [B*S, ...] or [B, S, H, Dv]
    if match.flat_output:
        out = b.call(aten.reshape.default, out, [-1, *shape[1:]])
    elif len(shape) == 4:
        out = b.call(aten.unflatten.int, out, -1, list(shape[2:]))
    yield b.replacement(LABEL, [(match.output, out)])


_OWN = object()  # the graph's own bias


def _mask(match: AttentionMatch, padding_mask: fx.Node | None):
    """(key_padding_mask, causal, bias): the padding mask and a causal flag where they are all the
    scores hide and nothing is added; else the graph's own bias (with SDPA's own causal flag)."""
    reading = match.mask
    if reading.bias is BiasKind.NONE:
        if reading.kind in (MaskKind.NONE, MaskKind.CAUSAL):
            return None, reading.causal, None
        if reading.kind in (MaskKind.KEY_PADDING, MaskKind.CAUSAL_PADDING) and reading.masks_padded_keys \
                and padding_mask is not None:
            return padding_mask, reading.causal, None
    return None, match.sdpa_causal, _OWN


def _operand(b: FxBuilder, x: Heads) -> fx.Node:
    """q, k or v as attnfuse::attention takes it: merged [B, L, G*D], or heads first [B, G, L, D]."""
    if x.layout in (Layout.TOKENS, Layout.HEADS_FIRST):
        return x.value
    if x.layout is Layout.TOKENS_HEADS:
        return b.call(aten.flatten.using_ints, x.value, 2)
    if x.layout is Layout.HEADS_FIRST_T:
        return b.call(aten.transpose.int, x.value, -1, -2)
    split = b.call(aten.unflatten.int, x.value, 0, [-1, x.heads])  # [B*G, a, b] -> [B, G, a, b]
    return split if x.layout is Layout.FLAT_HEADS else b.call(aten.transpose.int, split, -1, -2)


def _zero_product_scores(b: FxBuilder, match: AttentionMatch, view, padding_mask: fx.Node | None) -> fx.Node:
    """f(0) in the graph, as [B|1, H|1, S, T]: the score chain replayed on zeros of the product's shape
    (no q @ k^T computed). Sizes come from the padding mask where it covers queries and keys, so
    that the head-split q and k are not kept alive (padding-free could not run them on packed tokens)."""
    product = match.product
    q, kt = product.args[-2], product.args[-1]
    like = view.tensor(product, view.runs(product)[0])
    shape = like.shape
    mask_shape = view.tensor(padding_mask, 0).shape if padding_mask is not None else None
    if mask_shape is not None and mask_shape[1] == shape[-1] == shape[-2]:
        batch, length = (b.call(aten.sym_size.int, padding_mask, d) for d in (0, 1))
        first = shape[1] if len(shape) == 4 else b.call(operator.mul, batch, shape[0] // view.batch(0))
        size = [batch, first, length, length] if len(shape) == 4 else [first, length, length]
    else:
        size = [b.call(aten.sym_size.int, q, d) for d in range(len(shape) - 1)]
        size.append(b.call(aten.sym_size.int, kt, len(shape) - 1))
    scores = b.call(aten.zeros.default, size, dtype=like.dtype, device=like.device)
    if product.target == aten.baddbmm.default:  # beta * c + alpha * (a @ b): its c is part of f(0)
        scores = b.call(aten.add.Tensor, scores, product.args[0], alpha=product.kwargs.get("beta", 1))
    copies = {product: scores}
    for node in match.chain:
        copies[node] = b.copy(node, copies)
    scores = copies[match.chain[-1]] if match.chain else scores
    if view.value(match.scores).ndim == 3:
        scores = b.call(aten.unflatten.int, scores, 0, [-1, match.num_heads])
    return scores
