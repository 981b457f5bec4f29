"""Fuse every attention site: lower, prove (or, for an opt-in approximation, measure), apply.

Each matched site is first lowered to MultiHeadAttention and proved; the values of
its bias then say what its mask is. A banded mask is lowered again, exactly, to
windowed attention; an approximation (`--attention window=...|performer=...|elu|
linformer=...`) replaces plain softmax attention and its error is measured on the
probe's inputs instead of proved.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attnfuse.core import modes, registry
from attnfuse.core.facts import AttentionFacts, tag_attention
from attnfuse.passes import site as kinds
from attnfuse.passes.onnx import attention, heads, lower_sparse, masks
from attnfuse.passes.onnx.graph import Builder, NoMatch, named_inputs, observed, opset, runs_seeing
from attnfuse.passes.onnx.lower_ort import (
    cache_concat, group_query_attention, like_merged, lower_to_mha, multi_head_attention,
)
from attnfuse.passes.onnx.padding_free import real_tokens
from attnfuse.passes.onnx.proof import evaluate, first_run, prove, relative_error, substitute
from attnfuse.passes.site import AttentionSite


def fuse_attention(graph: ir.Graph, probe, exclude, mode: modes.AttentionMode, mask_input: ir.Value | None
                   ) -> list[AttentionSite]:
    """Fuse the attention in `graph` (the model's or a subgraph); `mask_input` is the model's padding mask."""
    sites = []
    for found in attention.find_sites(graph, probe, exclude):
        if isinstance(found, AttentionSite):
            sites.append(found)
            continue
        try:
            builder, claims = lower(found, probe, graph, mask_input, mode)
        except NoMatch as why:
            found.site.reason = str(why)
            sites.append(found.site)
            continue
        builder.commit(graph, after=found.output_node)
        _tag_fused(builder, found.site)
        substitute(claims, probe)
        found.site.fused = True
        sites.append(found.site)
    return sites


def _tag_fused(builder: Builder, site: AttentionSite) -> None:
    """Say on the committed attention node what padding-free reads of it (core/facts.py)."""
    node = next((node for node in builder.nodes if node.name == site.fused_node), None)
    if node is None:
        return
    slot = "key_padding_mask"
    takes_mask = slot in named_inputs(node, registry.of_onnx(node.domain, node.op_type)[1])
    key_padding_only = site.masks_padded_keys and takes_mask \
        and (site.mask, site.bias) == (kinds.MASK_KEY_PADDING, kinds.BIAS_NONE)
    tag_attention(node, AttentionFacts(site.masks_padded_keys, key_padding_only, slot if key_padding_only else None))


def lower(found: attention.Candidate, probe, graph: ir.Graph, mask_input, mode) -> tuple[Builder, list]:
    """The fused form of a matched site, proved; returns its builder and the claims (original value,
    replacement) it proved."""
    site = found.site
    q, k, v = found.operands
    site.kv_heads = k.heads
    site.cache = kinds.CACHE_PAST if cache_concat(k) else kinds.CACHE_CROSS if _from_inputs(k) else kinds.CACHE_NONE
    if site.softcap:  # only GroupQueryAttention soft-caps
        return _grouped(found, probe, graph)
    if not mode.approximate and (site.cache == kinds.CACHE_PAST or k.heads < site.num_heads):
        try:
            return _grouped(found, probe, graph)
        except NoMatch as why:  # MultiHeadAttention is exact too; keep it
            site.note = f"kept MultiHeadAttention, not GroupQueryAttention: {why}"
    builder = Builder(site.name)
    output, bias = lower_to_mha(found, probe, builder)
    extras = prove(builder.nodes, [(site.output, output)], probe, [bias] if bias is not None else [], opset(graph))
    _describe(site, extras[0] if extras else None, probe)
    site.fused_node = f"{site.name}/MultiHeadAttention"
    key_real = _key_real(site, mask_input)
    if mode.approximate:
        return _approximate(found, probe, graph, mode, key_real)
    if site.mask == kinds.MASK_KEY_PADDING and site.bias == kinds.BIAS_NONE and key_real:
        return _key_padding(found, probe, graph, key_real)
    if site.mask == kinds.MASK_WINDOW and site.bias == kinds.BIAS_NONE:
        try:
            return _exact_window(found, probe, graph, key_real)
        except NoMatch as why:  # MultiHeadAttention is exact too; keep it and say why
            site.note = f"kept MultiHeadAttention, not windowed attention: {why}"
    return builder, [(site.output, output)]


def _describe(site, bias: np.ndarray | None, probe) -> None:
    """The site's mask and bias kinds, read from the values of the bias the fused op is given."""
    masks.describe(bias, site)
    inputs = probe.inputs(first_run(site.output, probe))
    keys = inputs.real_total if inputs.real_total is not None and bias is not None \
        and bias.shape[-1] == inputs.real_total.shape[1] else inputs.real  # with a cache the keys cover it too
    site.masks_padded_keys = masks.masks_padded_keys(bias, keys)
    if site.bias == kinds.BIAS_ALIBI:
        site.alibi_slopes = masks.alibi_slopes(bias)


def _grouped(found, probe, graph) -> tuple[Builder, list]:
    """GroupQueryAttention: k and v heads not repeated, the cache appended inside, soft-capping.
    Proved, present k and v included."""
    site = found.site
    b = Builder(site.name)
    claims, bias = group_query_attention(found, probe, b)
    extras = prove(b.nodes, claims, probe, [bias] if bias is not None else [], opset=opset(graph))
    _describe(site, extras[0] if extras else None, probe)
    site.fused_node = f"{site.name}/GroupQueryAttention"
    return b, claims


def _from_inputs(x) -> bool:
    """k or v read from a graph input, through layout ops at most (cross-attention over an encoder's cache)."""
    value = x.value
    while (node := value.producer()) is not None and node.op_type in attention.LAYOUT_OPS:
        value = node.inputs[0]
    return value.is_graph_input()


def _key_padding(found, probe, graph, key_real) -> tuple[Builder, list]:
    """Plain key padding: the mask input itself as MultiHeadAttention's key_padding_mask, instead
    of a [B, 1, S, T] bias (which costs S x T memory and time on long sequences). Proved."""
    site = found.site
    b = Builder(site.name)
    mask = b.op("Cast", [key_real(b)], {"to": ir.DataType.INT32})
    out = multi_head_attention(found, probe, b, key_padding_mask=mask)
    prove(b.nodes, [(site.output, out)], probe, opset=opset(graph))
    return b, [(site.output, out)]


def _tokens_only(found) -> None:
    """The block-wise lowerings read q, k and v as [batch, seq, hidden] with all heads."""
    if any(x.layout not in (heads.TOKENS, heads.TOKENS_HEADS) or x.heads != found.site.num_heads
           for x in found.operands):
        raise NoMatch("q, k and v are not [batch, seq, hidden] with every head (a cache, or grouped heads)")


def _exact_window(found, probe, graph, key_real) -> tuple[Builder, list]:
    """A banded mask: attention over each query's band only, proved like any rewrite."""
    _tokens_only(found)
    site = found.site
    b = Builder(site.name)
    left, right = site.window
    out = lower_sparse.windowed(b, site.q, site.k, site.v, **_geometry(site, probe, found), left=left, right=right,
                                causal=site.causal, global_tokens=0, key_real=key_real(b) if key_real else None)
    out = like_merged(site, probe, b, out)
    prove(b.nodes, [(site.output, out)], probe, opset=opset(graph))
    site.fused_node = None
    return b, [(site.output, out)]


def _approximate(found, probe, graph, mode, key_real) -> tuple[Builder, list]:
    site = found.site
    allowed = {kinds.MASK_NONE, kinds.MASK_KEY_PADDING, kinds.MASK_CAUSAL, kinds.MASK_CAUSAL_PADDING}
    if site.mask not in allowed or site.bias != kinds.BIAS_NONE:
        raise NoMatch(f"{mode} replaces plain softmax attention; this site has mask {site.mask}, bias {site.bias}")
    if site.mask in (kinds.MASK_KEY_PADDING, kinds.MASK_CAUSAL_PADDING) and key_real is None:
        raise NoMatch("the key padding does not come from the attention-mask input")
    if site.causal and mode.kind == modes.LINFORMER:
        raise NoMatch("linformer mixes future keys into every query: not for causal attention")
    _tokens_only(found)
    b = Builder(site.name)
    common = dict(_geometry(site, probe, found), key_real=key_real(b) if key_real else None)
    if mode.kind == modes.WINDOW:
        out = lower_sparse.windowed(b, site.q, site.k, site.v, left=mode.window, right=0 if site.causal else mode.window,
                                    causal=site.causal, global_tokens=mode.global_tokens, **common)
    elif mode.kind == modes.LINFORMER:
        out = lower_sparse.linformer(b, site.q, site.k, site.v, rank=mode.rank, **common)
    else:
        feature_map = "elu" if mode.kind == modes.ELU else "favor"
        out = lower_sparse.linear(b, site.q, site.k, site.v, feature_map=feature_map, features=mode.features,
                                  seed=mode.seed, causal=site.causal, **common)
    out = like_merged(site, probe, b, out)
    site.fused_node = None
    site.approximation = _measure(b, out, site, probe, opset(graph), str(mode))
    return b, [(site.output, out)]


def _measure(b: Builder, out: ir.Value, site, probe, version: int, mode: str) -> dict:
    """The approximation's error against exact attention on the probe's inputs."""
    errors, cosines = [], []
    for run in runs_seeing([site.output], probe):
        (got,) = evaluate(b.nodes, [out], lambda value: observed(value, probe, run), version)
        expected = observed(site.output, probe, run)
        real = probe.inputs(run).real
        errors.append(relative_error(expected, got, real))
        cosines.append(_mean_cosine(expected, got, real))
    return {"mode": mode, "max_rel_error": max(errors), "mean_cosine": float(np.mean(cosines))}


def _mean_cosine(expected: np.ndarray, got: np.ndarray, real) -> float:
    a, c = expected.reshape(-1, expected.shape[-1]), got.reshape(-1, got.shape[-1])
    if real is not None and expected.shape[:2] == real.shape:
        a, c = a[real.reshape(-1)], c[real.reshape(-1)]
    dot = (a * c).sum(-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(c, axis=-1)
    return float(np.mean(dot / np.maximum(norms, 1e-12)))


def _geometry(site, probe, found) -> dict:
    return dict(heads=site.num_heads, head_size=site.head_size, scale=site.scale,
                dtype=observed(found.softmax.inputs[0], probe).dtype)


def _key_real(site, mask_input):
    """A function building bool [B, T] of the real keys from the mask input, or None."""
    if mask_input is None or not site.masks_padded_keys:
        return None

    return lambda b: real_tokens(b, mask_input)
