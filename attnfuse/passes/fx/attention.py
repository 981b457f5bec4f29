"""Find attention in a torch.export graph by what it computes, and replace it with attnfuse::attention.

Every softmax over the last dim, and every `scaled_dot_product_attention`, is a
candidate. For a softmax, the scores are some function f of a product q @ k^T
(matmul, bmm or baddbmm), and the probabilities multiply v. Rather than parse f,
the matcher evaluates it: f(0) (the same ops with q zeroed) is the bias and mask,
(f(qk) - f(0)) / qk the scale, and the site is accepted only if
f(qk) == scale * qk + f(0) on the probe. The mask is classified from f(0) against
the model's padding mask (none, key padding, causal, causal + key padding, a causal
window, or an additive tensor kept as it is). q, k and v are traced back to the
[B, S, heads * head_size] tensors they were split from, whatever view/transpose/select
spelled the split (`heads.py`): k and v may hold fewer heads than q, repeated
(grouped-query attention), and may be a KV cache's [B, heads, T, head_size] tensors.
Last, the fused op is evaluated on the probe and must equal the original output on
real tokens.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from attnfuse.kernels import ops, reference
from attnfuse.passes import site as kinds
from attnfuse.passes.fx import heads
from attnfuse.passes.fx.graph import (
    LAYOUT, PASS_THROUGH, FxProbe, NoMatch, aten,
    close_enough, evaluate, is_op, only_user, remove_dead, rewrite_unless_excluded,
)
from attnfuse.passes.site import AttentionSite

PRODUCTS = (aten.matmul.default, aten.bmm.default, aten.baddbmm.default)
SOFTMAXES = (aten.softmax.int, aten._softmax.default)
SDPA = aten.scaled_dot_product_attention.default
SCORE_OPS = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self, aten.where.ScalarOther,
    aten.where.ScalarSelf, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.view.default, aten.reshape.default,
    *PASS_THROUGH,
}
HIDDEN = -1e4  # a score at or below this hides its key (masks use -10000, finfo.min or -inf)
TOLERANCE = 1e-4


@dataclass
class Match:
    """A softmax (or SDPA) recognised as attention, before anything in the graph changes."""

    site: AttentionSite
    output: fx.Node  # the attention output [B, H, S, Dv] (or [B*H, S, Dv])
    bias: list[torch.Tensor] | None  # f(0) per probe run: what the scores add besides scale * q.k
    make_bias: Callable[[fx.Graph], fx.Node]  # builds f(0) in the graph
    q: heads.Heads | None = None  # the tensors q, k, v are split from
    k: heads.Heads | None = None
    v: heads.Heads | None = None
    merged: fx.Node | None = None  # the [B, S, H*Dv] output the fused op replaces
    mask: fx.Node | None = None  # the padding mask input, when the site masks by key padding


def fuse_attention(graph: fx.Graph, probe: FxProbe, mask_input: fx.Node | None, exclude: frozenset[str]) -> list[AttentionSite]:
    """Replace every attention in `graph` that proves equal; return a site for each candidate."""
    sites = []
    for node in list(graph.nodes):
        if not _is_candidate(node, probe):
            continue
        site = AttentionSite(name=_site_name(node, len(sites)))
        try:
            match = (_match_sdpa if is_op(node, SDPA) else _match_softmax)(node, site, probe, mask_input)
            _prove(match, probe, mask_input)
            rewrite_unless_excluded(site, exclude, lambda: _replace(graph, match, probe))
        except NoMatch as e:
            site.reason = str(e)
        sites.append(site)
    remove_dead(graph)
    return sites


# ---------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------


def attention_operands(graph: fx.Graph, probe: FxProbe) -> list[fx.Node]:
    """The q and k (or k^T) nodes every attention candidate reads: where rotary embeddings end."""
    operands = []
    for node in graph.nodes:
        if not _is_candidate(node, probe):
            continue
        if is_op(node, SDPA):
            operands.extend(node.args[:2])
        else:
            try:
                product = _score_chain(node.args[0])[1]
            except NoMatch:
                continue
            operands.extend(product.args[-2:])
    return operands


def _is_candidate(node: fx.Node, probe: FxProbe) -> bool:
    """SDPA, or a softmax over the last dim: where attention may be."""
    return is_op(node, SDPA) or (is_op(node, *SOFTMAXES) and _last_dim(node, probe))


def _match_softmax(softmax: fx.Node, site: AttentionSite, probe: FxProbe, mask_input) -> Match:
    chain, product = _score_chain(softmax.args[0], site, probe)
    probs_matmul = _probabilities_times_v(softmax)
    q_node, kt_node = product.args[-2], product.args[-1]
    v_node = probs_matmul.args[1]
    queries = [_canonical(probe.tensor(q_node, r), probe, r) for r in range(probe.runs)]
    keys = [_canonical(probe.tensor(kt_node, r).transpose(-1, -2), probe, r) for r in range(probe.runs)]
    site.num_heads, site.head_size = queries[0].shape[1], queries[0].shape[3]
    bias = [_scores_with_zero_q(chain, product, probe, r) for r in range(probe.runs)]
    scale = _measured_scale(product, softmax.args[0], bias, probe)
    match = Match(site, probs_matmul, bias, lambda graph: _build_scores_with_zero_q(graph, chain, product, probe, mask_input))
    values = [_canonical(probe.tensor(v_node, r), probe, r) for r in range(probe.runs)]
    return _finish(match, scale, (q_node, queries), (kt_node, keys), (v_node, values), probe, mask_input)


def _match_sdpa(node: fx.Node, site: AttentionSite, probe: FxProbe, mask_input) -> Match:
    q_node, k_node, v_node = node.args[:3]
    attn_mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    causal = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
    queries = [_canonical(probe.tensor(q_node, r), probe, r) for r in range(probe.runs)]
    site.num_heads, site.head_size = queries[0].shape[1], queries[0].shape[3]
    # With enable_gqa, SDPA repeats k and v heads itself: read them repeated.
    keys = [reference.repeat_kv(_canonical(probe.tensor(k_node, r), probe, r), site.num_heads) for r in range(probe.runs)]
    scale = node.kwargs.get("scale") or site.head_size ** -0.5
    if causal and queries[0].shape[2] != keys[0].shape[2]:
        raise NoMatch("SDPA's is_causal with fewer queries than keys is top-left aligned; the fused op's is not")
    site.causal = causal
    bias = None
    if attn_mask is not None or causal:  # as additive tensors, the way the fused op reads them
        masks = [probe.tensor(attn_mask, r) if attn_mask is not None else None for r in range(probe.runs)]
        bias = [ops.additive_mask(None, m, causal, x.shape[2], k.shape[2], torch.float32, x.device)
                for m, x, k in zip(masks, queries, keys)]
    # The fused op takes SDPA's own mask, boolean or additive.
    match = Match(site, node, bias, lambda graph: attn_mask)
    values = [reference.repeat_kv(_canonical(probe.tensor(v_node, r), probe, r), site.num_heads) for r in range(probe.runs)]
    return _finish(match, scale, (q_node, queries), (k_node, keys), (v_node, values), probe, mask_input)


def _finish(match: Match, scale: float, queries, keys, values, probe: FxProbe, mask_input) -> Match:
    """Trace q, k, v to their sources (scalar factors on q and k fold into the scale; k and v
    may have fewer heads), find the merged output and classify the mask."""
    site = match.site
    match.q, match.k, match.v = (_heads_source(*operand, probe, name) for operand, name in zip((queries, keys, values), "qkv"))
    if match.v.factor != 1.0:
        raise NoMatch("v is scaled after the head split")
    if match.q.groups != site.num_heads:
        raise NoMatch("q's heads are repeated")
    if match.k.groups != match.v.groups:
        raise NoMatch(f"k has {match.k.groups} heads but v {match.v.groups}")
    site.scale = scale * match.q.factor * match.k.factor
    site.kv_heads = match.k.groups
    site.cache = _cache_kind(match.k.node)
    site.rotary = _rotary_of(match.q, probe)
    match.merged = _merged_output(match.output, probe)
    _classify(match, probe, mask_input)
    return match


def _cache_kind(source: fx.Node) -> str:
    """"past" for k concatenated with a graph input, "cross" for k read from one."""
    def is_input(node) -> bool:
        while is_op(node, *LAYOUT, *PASS_THROUGH):
            node = node.args[0]
        return isinstance(node, fx.Node) and node.op == "placeholder"

    if is_input(source):
        return kinds.CACHE_CROSS
    if is_op(source, aten.cat.default) and any(is_input(piece) for piece in source.args[0]):
        return kinds.CACHE_PAST
    return kinds.CACHE_NONE


def _rotary_of(q: heads.Heads, probe: FxProbe) -> kinds.Rotary | None:
    """The rotary embedding the rotary pass put on q, read back from its op."""
    node = q.node
    if not is_op(node, ops.rotary):
        return None
    half = probe.tensor(node.args[1], 0).shape[-1]
    return kinds.Rotary("interleaved" if node.args[4] else "half", 2 * half)


def _last_dim(softmax: fx.Node, probe: FxProbe) -> bool:
    value = probe.tensor(softmax, 0)
    dim = softmax.args[1]
    return value is not None and value.dim() >= 3 and dim in (-1, value.dim() - 1)


def _score_chain(scores: fx.Node, site: AttentionSite | None = None, probe: FxProbe | None = None) -> tuple[list[fx.Node], fx.Node]:
    """The ops between the q @ k^T product and the softmax, product first. A soft-cap (tanh) on
    the way is refused for `site`; without a site the product is still found."""
    chain, node = [], scores
    for _ in range(16):
        if is_op(node, *PRODUCTS):
            return chain[::-1], node
        if is_op(node, aten.tanh.default) and site is not None:
            _refuse_softcap(node, site, probe)
        if not is_op(node, *SCORE_OPS, aten.tanh.default):
            break
        chain.append(node)
        path = [a for a in node.args if isinstance(a, fx.Node) and _reaches_product(a)]
        if len(path) != 1:
            break
        node = path[0]
    raise NoMatch("the softmax input is not a function of one q @ k^T product")


def _refuse_softcap(tanh: fx.Node, site: AttentionSite, probe: FxProbe) -> None:
    """Scores soft-capped as cap * tanh(scores / cap) (Gemma 2): measure the cap, then refuse."""
    user = only_user(tanh)
    if user is not None:
        ratios = [probe.tensor(user, r) / probe.tensor(tanh, r) for r in range(probe.runs)]
        seen = [ratio[probe.tensor(tanh, r).abs() > 1e-3] for r, ratio in enumerate(ratios)]
        if all(x.numel() for x in seen):
            cap = float(torch.cat(seen).median())
            if all(close_enough(x, torch.full_like(x, cap), 1e-4) for x in seen):
                site.softcap = cap
    raise NoMatch("the scores are soft-capped (cap * tanh(scores / cap)); MultiHeadAttention and SDPA have no soft-cap")


def _reaches_product(node: fx.Node, depth: int = 16) -> bool:
    if is_op(node, *PRODUCTS):
        return True
    if depth == 0 or not is_op(node, *SCORE_OPS, aten.tanh.default):
        return False
    return any(isinstance(a, fx.Node) and _reaches_product(a, depth - 1) for a in node.args)


def _probabilities_times_v(softmax: fx.Node) -> fx.Node:
    node = softmax
    for _ in range(8):
        user = only_user(node)
        if user is None:
            break
        if is_op(user, aten.matmul.default, aten.bmm.default) and user.args[0] is node:
            return user
        if not is_op(user, *PASS_THROUGH, aten.view.default, aten.reshape.default):
            break
        node = user
    raise NoMatch("the softmax output does not multiply v")


def _batch(probe: FxProbe, run: int) -> int:
    for node in probe.values[run]:
        if node.op == "placeholder" and isinstance(probe.values[run][node], torch.Tensor):
            return probe.values[run][node].shape[0]
    raise NoMatch("the graph has no tensor input")


def _canonical(x: torch.Tensor | None, probe: FxProbe, run: int) -> torch.Tensor:
    """[B, H, L, D] from [B, H, L, D] or [B*H, L, D]."""
    if x is None or x.dim() not in (3, 4):
        raise NoMatch("q, k or v is not a [batch, heads, seq, head_size] tensor")
    if x.dim() == 3:
        batch = _batch(probe, run)
        if x.shape[0] % batch:
            raise NoMatch("q, k or v has a first dim that is not batch x heads")
        x = x.reshape(batch, -1, *x.shape[1:])
    return x


def _heads_source(node: fx.Node, canonical: list[torch.Tensor], probe: FxProbe, name: str) -> heads.Heads:
    found = heads.trace(node, canonical, probe)
    if found is None:
        raise NoMatch(f"cannot trace {name} back to a [batch, seq, hidden] tensor")
    return found


def _merged_output(output: fx.Node, probe: FxProbe) -> fx.Node:
    """The first tensor after the attention output that holds it as [B, S, H*Dv]."""
    values = [_canonical(probe.tensor(output, r), probe, r) for r in range(probe.runs)]
    merged = [v.transpose(1, 2).flatten(2) for v in values]
    node = output
    for _ in range(8):
        user = only_user(node)
        if user is None or not is_op(user, *LAYOUT, *PASS_THROUGH):
            break
        node = user
        if all(close_enough(probe.tensor(node, r), merged[r], 1e-6) for r in range(probe.runs)):
            return node
    raise NoMatch("the attention output is not merged back to [batch, seq, hidden]")


# ---------------------------------------------------------------------------
# Scores: scale, bias and mask, measured
# ---------------------------------------------------------------------------


def _scores_with_zero_q(chain: list[fx.Node], product: fx.Node, probe: FxProbe, run: int) -> torch.Tensor:
    """f(0): the softmax input recomputed with q zeroed (the bias and mask the scores carry)."""
    q = product.args[-2]
    env = {q: torch.zeros_like(probe.tensor(q, run))}
    env[product] = evaluate(product, env, probe, run)
    for node in chain:
        env[node] = evaluate(node, env, probe, run)
    return env[chain[-1]] if chain else env[product]


def _measured_scale(product: fx.Node, scores: fx.Node, bias: list[torch.Tensor], probe: FxProbe) -> float:
    """The s with f(qk) == s * qk + f(0), checked on every probe run."""
    scale = None
    for run, zero in enumerate(bias):
        # baddbmm's alpha is a scale like any other: measured, not read.
        qk = torch.matmul(probe.tensor(product.args[-2], run), probe.tensor(product.args[-1], run))
        got = probe.tensor(scores, run)
        qk = qk.reshape(got.shape) if qk.numel() == got.numel() else qk
        if qk.shape != got.shape:
            raise NoMatch("the scores do not have the q @ k^T product's shape")
        unmasked = (zero > HIDDEN).expand_as(got)
        seen = unmasked & (qk.abs() > 1e-3 * qk.abs().max())
        if not seen.any():
            raise NoMatch("no unmasked score to measure the scale on")
        if scale is None:  # measured on the first run, checked on every run
            scale = float(((got - zero) / qk)[seen].median())
        predicted = scale * qk + zero
        if not close_enough(predicted[unmasked], got[unmasked], TOLERANCE):
            raise NoMatch("the scores are not scale * q.k + bias")
    return scale


def _classify(match: Match, probe: FxProbe, mask_input: fx.Node | None) -> None:
    """Set the site's mask kind; keep the additive bias only when no simpler kind fits."""
    site = match.site
    if match.bias is None:
        site.mask = kinds.MASK_NONE
        return
    cached = site.cache == kinds.CACHE_PAST
    for kind, causal, by_padding in (
        (kinds.MASK_NONE, False, False), (kinds.MASK_KEY_PADDING, False, True),
        (kinds.MASK_CAUSAL, True, False), (kinds.MASK_CAUSAL_PADDING, True, True),
    ):
        if by_padding and mask_input is None:
            continue
        if all(_bias_is(match.bias[r], probe, r, mask_input if by_padding else None, causal, cached=cached)
               for r in range(probe.runs)):
            site.mask, site.causal = kind, causal
            match.mask = mask_input if by_padding else None
            match.bias = None
            return
    left = _window(match.bias, probe, mask_input, cached)
    if left is not None:  # lowered as the additive bias it is, reported as the window it is
        site.mask, site.causal, site.window = kinds.MASK_WINDOW, True, (left, 0)
        return
    site.mask, site.bias = kinds.MASK_ADDITIVE, kinds.BIAS_ADDITIVE


def _window(bias: list[torch.Tensor], probe: FxProbe, mask_input, cached: bool) -> int | None:
    """The w of a causal sliding window (query i sees keys i - w .. i, as Mistral's), if the
    bias is one (with or without key padding) that hides more than causality on some run."""
    left = 0
    for run, b in enumerate(bias):
        if b.dim() != 4:
            return None
        seen = b.float() > HIDDEN
        if mask_input is not None:
            seen = seen & _query_rows(probe.tensor(mask_input, run) != 0, b.shape[-2], b.shape[0], cached)
        if seen.any():
            left = max(left, int(_distances(b)[seen].max()))
    if not any(left < b.shape[-1] - 1 for b in bias):
        return None
    for padding in ((None, mask_input) if mask_input is not None else (None,)):
        if all(_bias_is(bias[r], probe, r, padding, True, cached, left) for r in range(probe.runs)):
            return left
    return None


def _distances(bias: torch.Tensor) -> torch.Tensor:
    """i - j for every score, query i counted among the keys' positions (bottom-right aligned)."""
    queries, keys = bias.shape[-2:]
    rows = torch.arange(queries)[:, None] + keys - queries
    return (rows - torch.arange(keys)[None, :]).expand_as(bias)


def _bias_is(bias: torch.Tensor, probe: FxProbe, run: int, mask_input, causal: bool, cached: bool,
             window: int = -1) -> bool:
    """Whether `bias`, on real query rows, hides exactly what the mask kind hides and adds nothing
    else. Causal masks are bottom-right aligned: with a KV cache the queries are the last positions."""
    bias = bias.float()
    if bias.dim() != 4 or bias.shape[-2] > bias.shape[-1]:
        return False
    queries, length = bias.shape[-2:]
    hidden = torch.zeros(1, 1, queries, length, dtype=torch.bool)
    if causal:
        distance = _distances(hidden)
        hidden = (distance < 0) | (distance > window if window >= 0 else False)
    rows = torch.ones(bias.shape[0], 1, queries, 1, dtype=torch.bool)
    if mask_input is not None:
        real = probe.tensor(mask_input, run) != 0
        if real.shape[-1] != length:
            return False
        hidden = hidden | ~real[:, None, None, :]
        rows = _query_rows(real, queries, bias.shape[0], cached)
    hidden, bias = torch.broadcast_tensors(hidden, bias)
    rows = rows.expand_as(bias)
    hides = bias <= HIDDEN
    return bool(((hides == hidden) | ~rows).all()) and bool((bias[rows & ~hidden].abs() < 1e-6).all())


def _query_rows(real: torch.Tensor, queries: int, batch: int, cached: bool) -> torch.Tensor:
    """[B, 1, S, 1]: which query rows are real tokens. With a KV cache the [B, T] mask covers the
    cache's positions and then the S new tokens: the queries are its last S positions."""
    if real.shape[0] == batch and (real.shape[1] == queries or cached and real.shape[1] > queries):
        return real[:, None, -queries:, None]
    return torch.ones(batch, 1, queries, 1, dtype=torch.bool)


# ---------------------------------------------------------------------------
# Proof and replacement
# ---------------------------------------------------------------------------


def _prove(match: Match, probe: FxProbe, mask_input: fx.Node | None) -> None:
    """The fused op on the probe's values must give the original output on real tokens."""
    site = match.site
    for run in range(probe.runs):
        q, k, v = (source.value(probe, run) for source in (match.q, match.k, match.v))
        mask = probe.tensor(match.mask, run) if match.mask is not None else None
        bias = match.bias[run] if match.bias is not None else None
        got = ops.attention_op(q, k, v, mask, bias, site.num_heads, site.scale, site.causal)
        want = probe.tensor(match.merged, run)
        if mask_input is not None:
            rows = _query_rows(probe.tensor(mask_input, run) != 0, want.shape[1], want.shape[0],
                               site.cache == kinds.CACHE_PAST)
            got, want = got[rows[:, 0, :, 0]], want[rows[:, 0, :, 0]]
        if not close_enough(got, want, TOLERANCE):
            raise NoMatch("the fused attention does not reproduce the original output")


def _source_node(graph: fx.Graph, source: heads.Heads) -> fx.Node:
    """The source as the fused op takes it: [B, S, H, D] (heads not contiguous in memory) flattened."""
    if source.layout == heads.TOKENS:
        return graph.call_function(aten.flatten.using_ints, (source.node, 2))
    return source.node


def _replace(graph: fx.Graph, match: Match, probe: FxProbe) -> None:
    site = match.site
    with graph.inserting_before(match.merged):
        q, k, v = (_source_node(graph, source) for source in (match.q, match.k, match.v))
        bias = match.make_bias(graph) if match.bias is not None else None
        fused = graph.call_function(ops.attention, (q, k, v, match.mask, bias, site.num_heads, site.scale, site.causal))
    fused.meta["attnfuse"] = site.name
    match.merged.replace_all_uses_with(fused)
    probe.alias(fused, match.merged)
    site.q, site.k, site.v, site.output = q, k, v, fused


def _build_scores_with_zero_q(
    graph: fx.Graph, chain: list[fx.Node], product: fx.Node, probe: FxProbe, mask_input: fx.Node | None
) -> fx.Node:
    """f(0) as graph nodes: the product replaced by zeros of its shape (no q @ k^T computed).
    Sizes come from the mask input where there is one, so that the head-split q and k
    are not kept alive (padding-free could not run them on packed tokens)."""
    q, k = product.args[-2], product.args[-1]
    shape = probe.tensor(product, 0).shape
    if mask_input is not None and probe.tensor(mask_input, 0).shape[1] == shape[-1] == shape[-2]:
        batch, length = (graph.call_function(aten.sym_size.int, (mask_input, d)) for d in (0, 1))
        count = shape[1] if len(shape) == 4 else graph.call_function(operator.mul, (batch, shape[0] // _batch(probe, 0)))
        size = [batch, count, length, length] if len(shape) == 4 else [count, length, length]
    else:
        size = [graph.call_function(aten.sym_size.int, (q, d)) for d in range(len(shape) - 1)]
        size.append(graph.call_function(aten.sym_size.int, (k, len(shape) - 1)))
    like = probe.tensor(product, 0)
    zero = graph.call_function(aten.zeros.default, (size,), {"dtype": like.dtype, "device": like.device})
    if product.target == aten.baddbmm.default:
        zero = graph.call_function(aten.add.Tensor, (zero, product.args[0]), {"alpha": product.kwargs.get("beta", 1)})
    env = {product: zero}
    for node in chain:
        env[node] = graph.node_copy(node, lambda n: env.get(n, n))
    return env[chain[-1]] if chain else zero


def _site_name(node: fx.Node, index: int) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return f"{path}#{index}" if path else f"attention#{index}"
    return f"{node.name}#{index}"
