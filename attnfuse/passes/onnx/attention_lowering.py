"""Attention lowered to ONNX Runtime's ops: the replacements for a match, the preferred first.

    GroupQueryAttention     where kernels/onnx_forms.attention_form says so (k and v with fewer
                            heads than q, a KV cache, soft-capped scores): k and v not repeated,
                            the cache appended inside, the graph's own mask as attention_bias
    MultiHeadAttention      with the padding mask as key_padding_mask, when that is the only mask
    windowed attention      in standard ops (lower_sparse.py), for a banded mask
    MultiHeadAttention      with the graph's own bias otherwise

The graph's own bias is f(0), the score chain replayed on a zero product: whatever way the
exporter spelled the mask, the fused op sees the same numbers. With `--attention`, the
approximation replaces exact attention instead, and its error is measured, not proved.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from attnfuse.core import modes, tolerance
from attnfuse.core.facts import AttentionFacts, tag_attention
from attnfuse.core.graph import Op
from attnfuse.core.measure.heads import Layout
from attnfuse.core.options import PassOptions
from attnfuse.core.outcome import BiasKind, CacheKind, MaskKind
from attnfuse.core.rule import NoMatch, Replacement
from attnfuse.core.view import dtype_of
from attnfuse.kernels.onnx_forms import GROUP_QUERY_ATTENTION, MULTI_HEAD_ATTENTION, attention_form
from attnfuse.passes.onnx import lower_sparse
from attnfuse.passes.onnx.graph import attr
from attnfuse.passes.onnx.spelling import OnnxBuilder
from attnfuse.passes.rules.attention import AttentionMatch, Heads
from attnfuse.passes.rules.patterns import bias_add

GROUPED, KEY_PADDING, WINDOWED, MULTI_HEAD = (
    "GroupQueryAttention", "MultiHeadAttention with key_padding_mask", "windowed attention", "MultiHeadAttention")
# Layout ops a score chain may hold: the bias is kept [B|1, H|1, S, T] through them.
_RESHAPES = frozenset({Op.RESHAPE, Op.SQUEEZE, Op.UNSQUEEZE, Op.IDENTITY})


def lowerings(match: AttentionMatch, graph, view, options: PassOptions) -> Iterator[Replacement]:
    site = _Site(match, graph, view)
    if options.attention.approximate:
        yield _built("approximation", lambda: site.approximate(options.attention))
        return
    choice = attention_form(match.num_heads, match.kv_heads, match.head_size, match.value_size,
                            cache=match.cache is CacheKind.PAST, causal=match.mask.causal, softcap=bool(match.softcap))
    if choice.form is GROUP_QUERY_ATTENTION:
        yield _built(GROUPED, site.grouped)
    elif choice.why_not_grouped is not None:
        yield Replacement.unbuilt(GROUPED, choice.why_not_grouped)
    if choice.form is not MULTI_HEAD_ATTENTION and choice.form is not GROUP_QUERY_ATTENTION:
        return  # soft-capped scores: only GroupQueryAttention computes them
    if match.mask.key_padding_only and graph.padding_mask() is not None:
        yield _built(KEY_PADDING, site.key_padding)
    if match.mask.kind is MaskKind.WINDOW and match.mask.bias is BiasKind.NONE:
        yield _built(WINDOWED, site.windowed)
    yield _built(MULTI_HEAD, site.multi_head)


def _built(label: str, build: Callable[[], Replacement]) -> Replacement:
    try:
        return build()
    except NoMatch as why:
        return Replacement.unbuilt(label, str(why))


@dataclass
class _Site:
    """One match being lowered: its builders share the graph and the view."""

    match: AttentionMatch
    graph: object
    view: object

    def builder(self) -> OnnxBuilder:
        return self.graph.builder(self.graph.label(self.match.anchor))

    # ---- the replacements ------------------------------------------------------------------------

    def multi_head(self) -> Replacement:
        """MultiHeadAttention with the graph's own bias."""
        b = self.builder()
        inputs = self.mha_inputs(b)
        bias = self.score_bias(b, inputs.lengths)
        out = self.mha(b, inputs, "attention_bias", bias)
        return b.replacement(MULTI_HEAD, [(self.match.output, self.guarded(b, self.like_merged(b, out), bias))])

    def key_padding(self) -> Replacement:
        """Plain key padding: the mask input itself as key_padding_mask, instead of a [B, 1, S, T] bias
        (which costs S x T memory and time on long sequences)."""
        b = self.builder()
        mask = b.op("Cast", [self.real_keys(b)], {"to": ir.DataType.INT32})
        out = self.mha(b, self.mha_inputs(b), "key_padding_mask", mask)
        return b.replacement(KEY_PADDING, [(self.match.output, self.like_merged(b, out))])

    def grouped(self) -> Replacement:
        """GroupQueryAttention: k and v not repeated, a KV cache appended inside (its present k and v
        replace the Concats), soft-capping. Every cached position counts, so left padding is masked by
        the attention_bias: the padding mask's where the scores hide the padding (and the causal
        triangle) only, the graph's own bias otherwise."""
        m, b = self.match, self.builder()
        size = m.head_size
        cache = m.kv_cache
        if cache is not None and (m.k.layout, m.v.layout) != (Layout.HEADS_FIRST, Layout.HEADS_FIRST):
            raise NoMatch("GroupQueryAttention takes a cache laid out [batch, kv heads, length, head size]")
        q_tokens = _tokens(b, m.q, size)
        new = [Heads(x, Layout.HEADS_FIRST, m.kv_heads) for x in cache.new] if cache else [m.k, m.v]
        key, value = (_tokens(b, x, size) for x in new)
        past_k, past_v = cache.past if cache else (None, None)
        length = b.op("Shape", [q_tokens], {"start": 1, "end": 2})
        by_padding = self.padding_and_causal_only()
        if by_padding:  # the padding mask covers every key: the same nodes for every layer
            batch, total = (b.op("Shape", [self.graph.padding_mask()], {"start": i, "end": i + 1}) for i in (0, 1))
        else:
            past_length = b.op("Shape", [past_k], {"start": 2, "end": 3}) if cache else b.const([0], np.int64)
            batch, total = b.op("Shape", [q_tokens], {"end": 1}), b.op("Add", [past_length, length])
        per_row = lambda x: _int32(b, b.op("Expand", [x, batch]))  # noqa: E731
        lengths = b.op("Concat", [length, total], {"axis": 0})
        bias = self.padding_bias(b, lengths) if by_padding else self.score_bias(b, lengths)
        inputs = dict(query=q_tokens, key=key, value=value, past_key=past_k, past_value=past_v,
                      seqlens_k=per_row(b.op("Sub", [total, b.const([1], np.int64)])),
                      total_sequence_length=_int32(b, b.op("Squeeze", [total, b.const([0], np.int64)])),
                      attention_bias=bias)
        if cache:  # every new token is real here: the bias masks what is not
            inputs["query_seqlens"] = per_row(length)
        # With a cache, query_seqlens needs causal=1 (bottom-right, as a cache is): the bias masks the rest.
        attributes = {"num_heads": m.num_heads, "kv_num_heads": m.kv_heads, "scale": m.scale,
                      "causal": int(m.mask.causal or cache is not None)}
        if m.softcap:
            attributes["softcap"] = m.softcap
        out, present_k, present_v = b.fused(GROUP_QUERY_ATTENTION, inputs, attributes,
                                            outputs=("output", "present_key", "present_value"))
        self.tag(out, m.mask.key_padding_only, causal_padding_only=m.mask.causal_padding_only)
        guarded = out if by_padding else self.guarded(b, out, bias)  # padding_bias hides no row whole
        claims = [(m.output, self.like_merged(b, guarded))]
        if cache:
            (k_cat, v_cat), reads = cache.concats, [x for x in inputs.values() if x is not None]
            claims += [(k_cat.outputs[0], present_k), (v_cat.outputs[0], present_v),
                       *_shapes_without([k_cat, v_cat], reads, self.view, b)]
        return b.replacement(GROUPED, claims)

    def windowed(self) -> Replacement:
        """A banded mask: attention over each query's band only (lower_sparse.py)."""
        m, b = self.match, self.builder()
        self.tokens_only()
        left, right = m.mask.window
        out = lower_sparse.windowed(b, *self.qkv_tokens(), **self.geometry(b), left=left, right=right,
                                    causal=m.mask.causal, global_tokens=0)
        return b.replacement(WINDOWED, [(m.output, self.like_merged(b, out))])

    def approximate(self, mode: modes.AttentionMode) -> Replacement:
        """An opt-in approximation of plain softmax attention, with its error on the probe's runs."""
        m, b = self.match, self.builder()
        allowed = {MaskKind.NONE, MaskKind.KEY_PADDING, MaskKind.CAUSAL, MaskKind.CAUSAL_PADDING}
        if m.mask.kind not in allowed or m.mask.bias is not BiasKind.NONE:
            raise NoMatch(f"{mode} replaces plain softmax attention; this site has mask {m.mask.kind}, "
                          f"bias {m.mask.bias}")
        if m.mask.kind in (MaskKind.KEY_PADDING, MaskKind.CAUSAL_PADDING) and not self.has_padding_mask():
            raise NoMatch("the key padding does not come from the attention-mask input")
        if m.mask.causal and mode.kind == modes.LINFORMER:
            raise NoMatch("linformer mixes future keys into every query: not for causal attention")
        self.tokens_only()
        q, k, v = self.qkv_tokens()
        common = self.geometry(b)
        if mode.kind == modes.WINDOW:
            out = lower_sparse.windowed(b, q, k, v, left=mode.window, right=0 if m.mask.causal else mode.window,
                                        causal=m.mask.causal, global_tokens=mode.global_tokens, **common)
        elif mode.kind == modes.LINFORMER:
            out = lower_sparse.linformer(b, q, k, v, rank=mode.rank, **common)
        else:
            feature_map = "elu" if mode.kind == modes.ELU else "favor"
            out = lower_sparse.linear(b, q, k, v, feature_map=feature_map, features=mode.features, seed=mode.seed,
                                      causal=m.mask.causal, **common)
        out = self.like_merged(b, out)
        return Replacement(str(mode), b.nodes, [(m.output, out)], b, exact=False,
                           facts={"approximation": self.error(b, out, str(mode))})

    # ---- MultiHeadAttention's inputs --------------------------------------------------------------

    def mha_inputs(self, b: OnnxBuilder) -> _Inputs:
        """q as [B, S, hidden]; k and v as [B, T, hidden] when the graph holds them so (with their
        projection biases folded into one bias, which MultiHeadAttention adds while it lays out the
        heads), else heads first [B, H, T, D], repeated up to q's heads (grouped-query attention)."""
        m = self.match
        sizes = (m.head_size, m.head_size, m.value_size)
        q = _tokens(b, m.q, sizes[0])
        seq_q = b.op("Shape", [q], {"start": 1, "end": 2})
        if all(x.layout in (Layout.TOKENS, Layout.TOKENS_HEADS) and x.heads == m.num_heads for x in (m.k, m.v)):
            qkv = [q, _tokens(b, m.k, sizes[1]), _tokens(b, m.v, sizes[2])]
            seq_k = b.op("Shape", [qkv[1]], {"start": 1, "end": 2})
            # MultiHeadAttention adds the projections' bias while it lays out the heads; standard
            # Attention does not, so there q, k and v keep the graph's own bias Adds.
            qkv, bias = (qkv, None) if b.standard else self.projection_bias(b, qkv, sizes)
            return _Inputs(*qkv, bias, b.op("Concat", [seq_q, seq_k], {"axis": 0}))
        groups = m.num_heads // m.kv_heads
        k, v = (_repeated(b, _heads_first(b, x, size), groups) for x, size in ((m.k, sizes[1]), (m.v, sizes[2])))
        seq_k = b.op("Shape", [k], {"start": 2, "end": 3})
        return _Inputs(q, k, v, None, b.op("Concat", [seq_q, seq_k], {"axis": 0}))

    def projection_bias(self, b: OnnxBuilder, qkv: list[ir.Value], sizes) -> tuple[list[ir.Value], ir.Value | None]:
        """When q, k, v are h + bias with constant vectors: the h's and one [3 * hidden] bias."""
        split = [bias_add(self.graph, self.view, x) or (x, None) for x in qkv]
        widths = [self.match.num_heads * size for size in sizes]
        vectors = [None if bias is None else self.view.constant(bias) for _, bias in split]
        if all(v is None for v in vectors) or any(v is not None and v.shape != (w,) for v, w in zip(vectors, widths)):
            return qkv, None
        dtype = next(v.dtype for v in vectors if v is not None)
        bias = np.concatenate([np.zeros(w, dtype) if v is None else v for v, w in zip(vectors, widths)])
        return [h for h, _ in split], b.const(bias)

    def mha(self, b: OnnxBuilder, inputs: _Inputs, mask_slot: str, mask: ir.Value | None) -> ir.Value:
        """MultiHeadAttention with `mask` in its input `mask_slot` (attention_bias or key_padding_mask)."""
        m = self.match
        named = {"query": inputs.q, "key": inputs.k, "value": inputs.v, "bias": inputs.bias, mask_slot: mask}
        out = b.fused(MULTI_HEAD_ATTENTION, named, {"num_heads": m.num_heads, "scale": m.scale})
        key_padding_only = mask_slot == "key_padding_mask"
        self.tag(out, key_padding_only, b.slot(MULTI_HEAD_ATTENTION, mask_slot) if key_padding_only else None)
        return out

    def tag(self, out: ir.Value, key_padding_only: bool, mask_slot: str | None = None,
            causal_padding_only: bool = False) -> None:
        """What padding-free reads of the fused node (core/facts.py)."""
        tag_attention(out.producer(), AttentionFacts(self.match.mask.masks_padded_keys, key_padding_only, mask_slot,
                                                     causal_padding_only))

    # ---- the bias ---------------------------------------------------------------------------------

    def score_bias(self, b: OnnxBuilder, lengths: ir.Value) -> ir.Value | None:
        """f(0), what the scores add to scale * q.k, as [B|1, H|1, S, T] (`lengths`: [S, T]): the score
        chain replayed on a zero product, its layout ops left out (the bias keeps the [B, H, S, T] form;
        terms added to [B*H, S, T] scores are laid out so) and the very tensors it adds read as they are.
        Two masks of finfo.min add up to -inf, which weighs a key less than one of finfo.min in a row
        that hides every key, as in the original. None when f(0) is zero."""
        m, graph, view = self.match, self.graph, self.view
        if m.product is None:
            return self.sdpa_bias(b, lengths)
        bias, path = None, graph.outputs(m.product)[0]
        for node in m.chain:
            operands, out = graph.operands(node), graph.outputs(node)[0]
            scores_rank = view.value(path).ndim
            if graph.op(node) in _RESHAPES or (bias is None and graph.op(node) in (Op.MUL, Op.DIV, Op.NEG, Op.TANH,
                                                                                     Op.CAST)):
                path = out
                continue  # a zero stays zero
            terms = {x: self.as_4d(b, x, scores_rank) for x in operands if x is not None and x is not path}
            if bias is None and graph.op(node) is Op.ADD:
                bias = next(iter(terms.values()))
            else:
                scores = bias if bias is not None else b.const(np.zeros((), dtype_of(view, path)))
                bias = b.copy(node, {path: scores, **terms})
            path = out
        if bias is None:
            return None
        dtype = dtype_of(view, m.q.value)
        if dtype_of(view, path) != dtype:
            bias = b.op("Cast", [bias], {"to": ir.DataType.from_numpy(dtype)})
        return b.op("Expand", [bias, b.op("Concat", [b.const([1, 1], np.int64), lengths], {"axis": 0})])

    def sdpa_bias(self, b: OnnxBuilder, lengths: ir.Value) -> ir.Value | None:
        """SDPA's mask as the bias it adds (a boolean mask: 0 where a key is seen, the dtype's lowest number
        where not), with its causal triangle; None for neither."""
        m = self.match
        dtype = dtype_of(self.view, m.q.value)
        lowest = b.const(np.array(np.finfo(dtype).min, dtype))
        bias = m.sdpa_mask
        if bias is not None and self.view.value(bias).dtype == np.bool_:
            bias = b.op("Where", [bias, b.const(np.zeros((), dtype)), lowest])
        elif bias is not None and dtype_of(self.view, bias) != dtype:
            bias = b.op("Cast", [bias], {"to": ir.DataType.from_numpy(dtype)})
        if m.sdpa_causal:
            # the lowest number at every key after its query, 0 elsewhere
            later = b.op("Trilu", [b.op("Expand", [lowest, lengths]), b.const(np.array(1, np.int64))], {"upper": 1})
            bias = later if bias is None else b.op("Add", [bias, later])
        if bias is None:
            return None
        return b.op("Expand", [bias, b.op("Concat", [b.const([1, 1], np.int64), lengths], {"axis": 0})])

    def padding_and_causal_only(self) -> bool:
        """The scores hide the keys the padding mask marks padded, and (when causal) the later ones,
        nothing else: GroupQueryAttention's causal flag and the padding mask say it all."""
        mask = self.match.mask
        return (mask.key_padding_only or mask.causal_padding_only) and self.has_padding_mask()

    def padding_bias(self, b: OnnxBuilder, lengths: ir.Value) -> ir.Value:
        """[B, 1, S, T] from the padding mask: 0 at real keys, the dtype's lowest finite number at padded
        ones (`lengths`: [S, T]). Instead of the graph's own bias where it only hides the padding (and
        the causal triangle, which the op's causal flag hides): no dense mask built from the export's
        ops, and no row of -inf, so no NaN for the original's guard to catch: every real query sees
        itself, and padded queries' rows are never read (their outputs are not compared, and padded
        keys are hidden from every later query)."""
        dtype = dtype_of(self.view, self.match.q.value)
        lowest = b.const(np.array(np.finfo(dtype).min, dtype))
        hidden = b.op("Where", [self.real_keys(b), b.const(np.zeros((), dtype)), lowest])
        keys = b.op("Unsqueeze", [hidden, b.const([1, 2], np.int64)])  # [B, 1, 1, T]
        return b.op("Expand", [keys, b.op("Concat", [b.const([1, 1], np.int64), lengths], {"axis": 0})])

    def as_4d(self, b: OnnxBuilder, value: ir.Value, scores_rank: int) -> ir.Value:
        """A term added to [B*H, S, T] scores, laid out to add to [B, H, S, T]."""
        shape = self.view.value(value).shape
        if scores_rank == 4 or len(shape) < 3 or shape[0] == 1:
            return value  # broadcasts the same way against both layouts
        tail = b.op("Shape", [value], {"start": 1})
        return b.op("Reshape", [value, b.op("Concat", [b.const([-1, self.match.num_heads], np.int64), tail],
                                             {"axis": 0})])

    def guarded(self, b: OnnxBuilder, out: ir.Value, bias: ir.Value | None) -> ir.Value:
        """A row of -inf scores gives NaN; where the original guards it (SDPA), zeros."""
        if bias is None or not self.match.nan_guard:
            return out
        zero = b.const(np.zeros((), dtype_of(self.view, self.match.output)))
        return b.op("Where", [b.op("IsNaN", [out]), zero, out])

    # ---- shapes and helpers -----------------------------------------------------------------------

    def like_merged(self, b: OnnxBuilder, out: ir.Value) -> ir.Value:
        """A fused op's [B, S, H*Dv] output laid out as the merged output it replaces."""
        shape = _merged_shape(self.view, self.match)
        return out if shape is None else b.op("Reshape", [out, b.const(shape, np.int64)])

    def tokens_only(self) -> None:
        """The block-wise lowerings read q, k and v as [batch, seq, hidden] with every head."""
        m = self.match
        if any(x.layout not in (Layout.TOKENS, Layout.TOKENS_HEADS) or x.heads != m.num_heads for x in (m.q, m.k, m.v)):
            raise NoMatch("q, k and v are not [batch, seq, hidden] with every head (a cache, or grouped heads)")

    def qkv_tokens(self) -> tuple[ir.Value, ir.Value, ir.Value]:
        return self.match.q.value, self.match.k.value, self.match.v.value

    def geometry(self, b: OnnxBuilder) -> dict:
        m = self.match
        return dict(heads=m.num_heads, head_size=m.head_size, scale=m.scale, dtype=m.dtype,
                    key_real=self.real_keys(b) if m.mask.masks_padded_keys and self.has_padding_mask() else None)

    def has_padding_mask(self) -> bool:
        return self.graph.padding_mask() is not None

    def real_keys(self, b: OnnxBuilder) -> ir.Value:
        """bool [B, T]: the keys the padding mask marks real."""
        return b.op("Cast", [self.graph.padding_mask()], {"to": ir.DataType.BOOL})

    def error(self, b: OnnxBuilder, out: ir.Value, mode: str) -> dict:
        """The approximation's error against exact attention on the probe's runs."""
        errors, cosines = [], []
        for run in self.view.runs(self.match.output):
            (got,) = self.view.evaluate(b.nodes, [out], {}, run)
            expected, real = self.view.value(self.match.output, run), self.view.real(run)
            errors.append(tolerance.relative_error(expected, got, real))
            cosines.append(_mean_cosine(expected, got, real))
        return {"mode": mode, "max_rel_error": max(errors), "mean_cosine": float(np.mean(cosines))}


@dataclass
class _Inputs:
    """MultiHeadAttention's q, k, v (3-D, or k and v heads first), projection bias, and [S, T]."""

    q: ir.Value
    k: ir.Value
    v: ir.Value
    bias: ir.Value | None
    lengths: ir.Value  # int64 [2]: queries, keys


def _merged_shape(view, match: AttentionMatch) -> list[int] | None:
    """The Reshape target that lays [B, S, H*Dv] out as the merged output ([B, S, H, Dv], or [B*S, ...]
    ahead of a projection), None when it is [B, S, H*Dv] already."""
    shape = view.value(match.output).shape
    if match.flat_output:
        return [-1, *shape[1:]]
    return [0, 0, *shape[2:]] if len(shape) == 4 else None


def _tokens(b: OnnxBuilder, x: Heads, size: int) -> ir.Value:
    """[B, L, heads * size]: what the fused ops take as 3-D q, k and v. Heads-first x split from such a
    tensor (a rotary's output, viewed [B, L, H, D] and transposed) is read before its transpose: the
    tokens stay the leading dims all the way (padding-free keeps them packed)."""
    if x.layout is Layout.TOKENS:
        return x.value
    split = _transposed_from(x)
    if x.layout is Layout.TOKENS_HEADS or split is not None:
        return b.op("Reshape", [split or x.value, b.const([0, 0, x.heads * size], np.int64)])
    heads_first = _heads_first(b, x, size)
    return b.op("Reshape", [b.op("Transpose", [heads_first], {"perm": [0, 2, 1, 3]}),
                            b.const([0, 0, x.heads * size], np.int64)])


def _transposed_from(x: Heads) -> ir.Value | None:
    """The [B, L, H, D] tensor that heads-first x is the transpose of, or None."""
    node = x.value.producer()
    if x.layout is not Layout.HEADS_FIRST or node is None or node.op_type != "Transpose":
        return None
    return node.inputs[0] if list(attr(node, "perm", [])) == [0, 2, 1, 3] else None


def _heads_first(b: OnnxBuilder, x: Heads, size: int) -> ir.Value:
    """[B, heads, L, size]: MultiHeadAttention's 4-D key and value."""
    if x.layout is Layout.HEADS_FIRST:
        return x.value
    if x.layout is Layout.HEADS_FIRST_T:
        return b.op("Transpose", [x.value], {"perm": [0, 1, 3, 2]})
    if x.layout in (Layout.TOKENS, Layout.TOKENS_HEADS):
        split = b.op("Reshape", [x.value, b.const([0, 0, x.heads, size], np.int64)]) \
            if x.layout is Layout.TOKENS else x.value
        return b.op("Transpose", [split], {"perm": [0, 2, 1, 3]})
    # [B*H, a, b] -> [B, H, a, b]
    split = b.op("Reshape", [x.value, b.op("Concat", [b.const([-1, x.heads], np.int64),
                                                      b.op("Shape", [x.value], {"start": 1})], {"axis": 0})])
    return split if x.layout is Layout.FLAT_HEADS else b.op("Transpose", [split], {"perm": [0, 1, 3, 2]})


def _repeated(b: OnnxBuilder, heads_first: ir.Value, groups: int) -> ir.Value:
    """[B, H', L, D] with each head repeated `groups` times in a row: [B, H' * groups, L, D]."""
    if groups == 1:
        return heads_first
    grown = b.op("Unsqueeze", [heads_first, b.const([2], np.int64)])  # [B, H', 1, L, D]
    expanded = b.op("Expand", [grown, b.const([1, 1, groups, 1, 1], np.int64)])
    shape = b.op("Concat", [b.op("Shape", [heads_first], {"end": 1}), b.const([-1], np.int64),
                            b.op("Shape", [heads_first], {"start": 2})], {"axis": 0})
    return b.op("Reshape", [expanded, shape])


def _int32(b: OnnxBuilder, x: ir.Value) -> ir.Value:
    return b.op("Cast", [x], {"to": ir.DataType.INT32})


def _mean_cosine(expected: np.ndarray, got: np.ndarray, real) -> float:
    """The mean cosine of each token's output vectors, at real tokens."""
    tokens = real.size if real is not None and expected.size % real.size == 0 else expected.shape[0]
    a, c = expected.reshape(tokens, -1), got.reshape(tokens, -1)
    if real is not None and tokens == real.size:
        a, c = a[real.reshape(-1)], c[real.reshape(-1)]
    dot = (a * c).sum(-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(c, axis=-1)
    return float(np.mean(dot / np.maximum(norms, 1e-12)))


# ---- GroupQueryAttention's cache: the Shapes read off it ------------------------------------------------


def _shapes_without(concats: list[ir.Node], reads: list[ir.Value], view, b: OnnxBuilder
                    ) -> list[tuple[ir.Value, ir.Value]]:
    """Graphs read the total length off the cache (the Shape of the Concat, or of its head repeat)
    to build their masks, which the op now reads. Each such Shape, a direct reader of a Concat or one
    that the op's inputs `reads` depend on, is claimed to equal a shape computed from the Concat's
    inputs, dim by dim as every probe run shows it (a constant, or a dim of the Concat's output), so
    that the Concat can go and no cycle is made. NoMatch if a dim is neither."""
    claims = []
    for concat in concats:
        past, new = concat.inputs
        axis = b.const([attr(concat, "axis")], np.int64)
        shape = b.op("Shape", [past])
        length = b.op("Add", [b.op("Gather", [shape, axis]), b.op("Gather", [b.op("Shape", [new]), axis])])
        total = b.op("ScatterElements", [shape, axis, length])  # the Concat's output shape
        for reader in _shape_readers(concat, reads):
            dims = _dims_of(reader.outputs[0], concat.outputs[0], view)
            pieces = [b.const([dim], np.int64) if kind == "constant" else b.op("Gather", [total, b.const([dim], np.int64)])
                      for kind, dim in dims]
            claims.append((reader.outputs[0], pieces[0] if len(pieces) == 1 else b.op("Concat", pieces, {"axis": 0})))
    return claims


def _shape_readers(concat: ir.Node, reads: list[ir.Value]) -> list[ir.Node]:
    """The graph's Shape nodes that read the Concat's output, directly or through a value made from
    its data, and that are read directly or that `reads` depend on. (A value made from a claimed
    Shape's output reads the new shape, not the Concat.)"""
    direct = [use.node for use in concat.outputs[0].uses() if use.node.op_type == "Shape"]
    upstream, stack, seen = [], list(reads), set()
    while stack:
        node = stack.pop().producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Shape" and _made_from(node.inputs[0], concat):
            upstream.append(node)
            continue
        stack += [x for x in node.inputs if x is not None]
    readers = {id(node): node for node in direct + upstream if node.graph is not None}  # not another rewrite's
    return list(readers.values())


def _made_from(value: ir.Value, node: ir.Node) -> bool:
    """Whether `value` is computed from `node`'s outputs other than through their shapes."""
    stack, seen = [value], set()
    while stack:
        producer = stack.pop().producer()
        if producer is None or id(producer) in seen or producer.op_type == "Shape":
            continue
        if producer is node:
            return True
        seen.add(id(producer))
        stack += [x for x in producer.inputs if x is not None]
    return False


def _dims_of(shape: ir.Value, concat_output: ir.Value, view) -> list[tuple[str, int]]:
    """Each entry of `shape` as ("dim", the Concat output's axis it equals) or ("constant", its value),
    the same in every probe run: the same axis first, then a constant, then another axis."""
    runs = view.runs(shape)
    values = [np.asarray(view.value(shape, run)).reshape(-1) for run in runs]
    totals = [np.asarray(view.value(concat_output, run)).shape for run in runs]
    dims = []
    for i, entries in enumerate(zip(*values)):
        axes = [j for j in range(len(totals[0])) if all(total[j] == entry for total, entry in zip(totals, entries))]
        if i in axes:
            dims.append(("dim", i))
        elif len(set(entries)) == 1:
            dims.append(("constant", int(entries[0])))
        elif axes:
            dims.append(("dim", axes[0]))
        else:
            raise NoMatch(f"{shape.name!r} reads the cache's shape in a way not computed here")
    return dims
