"""The fused ops as torch.library custom ops: what the fx passes put into a graph.

Each op has a CPU implementation in torch, a CUDA implementation on the Triton
kernels (`attnfuse.kernels.triton`, imported only when a CUDA tensor arrives), and a
fake implementation (shapes only) so that torch.export and torch.compile see
through it. Graphs call the plain functions at the bottom of this module, not the
ops: under `torch.onnx.export` those functions emit ONNX Runtime's com.microsoft
ops instead, so an optimized module exports with its fusions in place.

Layouts: q, k, v and outputs keep the heads merged, [..., heads * head_size], with
the tokens in the leading dims: [batch, seq, hidden] padded, or the packed rows of
padding-free execution ([1, tokens, hidden] or [tokens, hidden]). Attention also takes
q, k and v already split as [batch, heads, seq, head_size] (a KV cache is kept that
way), and k and v with fewer heads than q (grouped-query attention: the head counts
are read from the shapes, as SDPA's enable_gqa does).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from attnfuse.kernels import onnx_forms, reference


# ---------------------------------------------------------------------------
# Helpers shared by the implementations
# ---------------------------------------------------------------------------


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]; a rank-4 x is already [B, H, S, D]."""
    return x if x.dim() == 4 else x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def kv_heads(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> int:
    """How many heads k (and v) have: fewer than q's under grouped-query attention."""
    if k.dim() == 4:
        return k.shape[1]
    head_size = q.shape[-1] if q.dim() == 4 else q.shape[-1] // num_heads
    return k.shape[-1] // head_size


def _value_width(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> int:
    """The merged width of the output, num_heads * v's head size."""
    groups = kv_heads(q, k, num_heads)
    return num_heads * (v.shape[-1] if v.dim() == 4 else v.shape[-1] // groups)


def _output_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> tuple:
    """[B, S, num_heads * Dv] for merged or [B, H, S, D] queries; packed rows keep their leading dims."""
    lead = (q.shape[0], q.shape[2]) if q.dim() == 4 else tuple(q.shape[:-1])
    return (*lead, _value_width(q, k, v, num_heads))


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H*D]."""
    return x.transpose(1, 2).flatten(2)


def additive_mask(
    key_padding_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], causal: bool,
    queries: int, keys: int, dtype: torch.dtype, device: torch.device,
) -> Optional[torch.Tensor]:
    """One additive mask that broadcasts to [B, H, S, T]: 0 where a key is seen, the
    dtype's lowest value where it is hidden (never -inf: a row that sees nothing then
    averages its keys, as the models' own masks make it do, instead of giving NaN).
    `bias` is additive, or boolean (True where a key is seen) as SDPA's attn_mask."""
    hidden = None
    if key_padding_mask is not None:
        hidden = (key_padding_mask == 0)[:, None, None, :]
    if causal:  # bottom-right aligned: the queries are the last of the keys' positions
        upper = torch.ones(queries, keys, dtype=torch.bool, device=device).triu(1 + keys - queries)
        hidden = upper if hidden is None else hidden | upper
    lowest = torch.finfo(dtype).min
    mask = None
    if hidden is not None:
        mask = torch.zeros((), dtype=dtype, device=device).masked_fill(hidden, lowest)
    if bias is not None:
        bias = torch.zeros((), dtype=dtype, device=device).masked_fill(~bias, lowest) \
            if bias.dtype == torch.bool else bias.to(dtype)
        # Two lowest values add up to -inf; keep the sum finite.
        mask = bias if mask is None else (bias + mask).clamp_min(lowest)
    return mask


def _padded_attention(q, k, v, key_padding_mask, bias, num_heads: int, scale: float, causal: bool) -> torch.Tensor:
    groups = kv_heads(q, k, num_heads)
    q, k, v = split_heads(q, num_heads), split_heads(k, groups), split_heads(v, groups)
    # SDPA's own causal mask (top-left: ours when queries and keys are as many) lets it skip the hidden blocks.
    own_causal = causal and key_padding_mask is None and bias is None and q.shape[2] == k.shape[2]
    mask = None if own_causal else additive_mask(key_padding_mask, bias, causal, q.shape[2], k.shape[2], q.dtype, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=own_causal, scale=scale,
                                         enable_gqa=groups != num_heads)
    return merge_heads(out)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Packed tokens in any leading form ([1, T, X] or [T, X]) as [T, X]."""
    return x.reshape(-1, x.shape[-1])


def _unpack(rows: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return reference.unpack(rows, indices, mask.shape[0], mask.shape[1])


# ---------------------------------------------------------------------------
# attnfuse::attention: softmax attention on padded [B, S, hidden] tensors
# ---------------------------------------------------------------------------


@torch.library.custom_op("attnfuse::attention", mutates_args=())
def attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], num_heads: int, scale: float, causal: bool,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias, masked) v with heads merged; key_padding_mask [B, T] nonzero for a real key."""
    return _padded_attention(q, k, v, key_padding_mask, bias, num_heads, scale, causal).contiguous()


@attention_op.register_fake
def _(q, k, v, key_padding_mask, bias, num_heads, scale, causal):
    return q.new_empty(_output_shape(q, k, v, num_heads))


# ---------------------------------------------------------------------------
# attnfuse::packed_attention: attention on the packed real tokens
# ---------------------------------------------------------------------------


def _through_padding(attend, q, k, v, indices, mask, bias, num_heads: int, scale: float, causal: bool) -> torch.Tensor:
    """Packed attention as `attend` on the padded layout: restore q, k, v, attend, take the real rows back.
    Without `bias`, the mask hides the padded keys."""
    padded = [_unpack(_rows(x), indices, mask) for x in (q, k, v)]
    out = attend(*padded, None if bias is not None else mask, bias, num_heads, scale, causal)
    return out.flatten(0, 1).index_select(0, indices).reshape(_output_shape(q, k, v, num_heads))


# What one more SDPA call costs, in the attention work of query-key pairs (measured: benchmarks/packed_attention.py).
CALL_COST = 64 * 64


def length_buckets(lengths: list[int], call_cost: int = CALL_COST) -> list[list[int]]:
    """The sequences (indices into `lengths`; the empty ones left out) attended together, one SDPA call each:
    longest first, a bucket takes the next sequence until padding it to the bucket's longest would waste
    more query-key pairs, in all, than another call costs."""
    order = sorted((i for i, n in enumerate(lengths) if n), key=lengths.__getitem__, reverse=True)
    buckets, longest, waste = [], 0, 0
    for i in order:
        waste += longest ** 2 - lengths[i] ** 2
        if not buckets or waste > call_cost:
            buckets.append([])
            longest, waste = lengths[i], 0
        buckets[-1].append(i)
    return buckets


def _packed_attention(q, k, v, indices, mask, bias, num_heads: int, scale: float, causal: bool,
                      buckets=length_buckets) -> torch.Tensor:
    """Packed attention on the CPU: without `bias`, the sequences of similar length in one SDPA call each
    (`buckets` groups them): one call per sequence ran as many small parallel regions, and one call on the
    whole batch computes on its padding."""
    if bias is not None:
        return _through_padding(_padded_attention, q, k, v, indices, mask, bias, num_heads, scale, causal)
    rows = [_rows(x) for x in (q, k, v)]
    lengths = (mask != 0).sum(1)
    starts = lengths.cumsum(0) - lengths
    out = rows[2].new_empty(rows[0].shape[0], _value_width(q, k, v, num_heads))
    for bucket in buckets(lengths.tolist()):
        _attend_bucket(rows, starts[bucket], lengths[bucket], out, num_heads, scale, causal)
    return out.reshape(_output_shape(q, k, v, num_heads))


def _attend_bucket(rows, starts, lengths, out, num_heads: int, scale: float, causal: bool) -> None:
    """Attention over some packed sequences at once: each laid out from its start, padded to the longest
    (repeating its last token, hidden from every real query), the real rows written into `out`."""
    longest = int(lengths.max())
    offsets = torch.arange(longest, device=lengths.device)
    real = offsets < lengths[:, None]  # [n, longest]
    positions = starts[:, None] + torch.minimum(offsets, lengths[:, None] - 1)
    padded = [x[positions] for x in rows]
    # Causal queries never see a later key, so the real ones see no padding without a mask; nor do they
    # where every sequence of the bucket is as long as the longest.
    hide = None if causal or int(lengths.min()) == longest else real
    attended = _padded_attention(*padded, hide, None, num_heads, scale, causal)
    out[positions[real]] = attended[real]


@torch.library.custom_op("attnfuse::packed_attention", mutates_args=())
def packed_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor,
    bias: Optional[torch.Tensor], num_heads: int, scale: float, causal: bool,
) -> torch.Tensor:
    """Attention over the packed tokens of each sequence.

    q, k, v: packed rows; indices: their flat positions in the padded [B*S] layout
    (sorted, as `reference.pack` gives them); mask: the [B, S] padding mask. Without
    `bias`, each sequence attends to its own tokens (causal in packed order). With a
    [B|1, H|1, S, S] `bias` (the model's own, hiding every padded key), attention runs
    on the restored padded layout and the real rows are taken back.
    """
    return _packed_attention(q, k, v, indices, mask, bias, num_heads, scale, causal)


@packed_attention_op.register_kernel("cuda")
def _(q, k, v, indices, mask, bias, num_heads, scale, causal):
    if bias is not None:
        return _packed_attention(q, k, v, indices, mask, bias, num_heads, scale, causal)
    from attnfuse.kernels.triton import varlen_attention

    cu_seqlens, max_seqlen = reference.sequence_offsets(mask)
    groups = kv_heads(q, k, num_heads)
    rows = [_rows(x).unflatten(-1, (heads, -1)) for x, heads in ((q, num_heads), (k, groups), (v, groups))]
    # The kernel takes as many k/v heads as q heads.
    rows[1:] = [reference.repeat_kv(x, num_heads) for x in rows[1:]]
    out = varlen_attention(*rows, cu_seqlens, max_seqlen, scale=scale, causal=causal)
    return out.reshape(_output_shape(q, k, v, num_heads))


@packed_attention_op.register_fake
def _(q, k, v, indices, mask, bias, num_heads, scale, causal):
    return q.new_empty(_output_shape(q, k, v, num_heads))


# ---------------------------------------------------------------------------
# attnfuse::skip_layernorm and attnfuse::bias_gelu
# ---------------------------------------------------------------------------


def _residual_sum(x: torch.Tensor, skip: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x + skip if bias is None else x + skip + bias


@torch.library.custom_op("attnfuse::skip_layernorm", mutates_args=())
def skip_layernorm_op(
    x: torch.Tensor, skip: torch.Tensor, bias: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    beta: Optional[torch.Tensor], eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layernorm(x + skip + bias) over the last dim, x + skip + bias): the sum is an output too, as
    the next layer's residual reads it."""
    h = _residual_sum(x, skip, bias)
    return F.layer_norm(h, (h.shape[-1],), weight, beta, eps), h


@skip_layernorm_op.register_kernel("cuda")
def _(x, skip, bias, weight, beta, eps):
    from attnfuse.kernels.triton import skip_layernorm

    if weight is None:
        weight = x.new_ones(x.shape[-1])
    return skip_layernorm(x, skip, bias, weight, beta, eps), _residual_sum(x, skip, bias)


@skip_layernorm_op.register_fake
def _(x, skip, bias, weight, beta, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("attnfuse::bias_gelu", mutates_args=())
def bias_gelu_op(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    """gelu(x + bias) (gelu(x) without a bias), erf or tanh form."""
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


@bias_gelu_op.register_kernel("cuda")
def _(x, bias, approximate):
    from attnfuse.kernels.triton import bias_gelu

    return bias_gelu(x, bias, approximate)


@bias_gelu_op.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------
# attnfuse::rms_norm, attnfuse::skip_rms_norm and attnfuse::rotary (decoders)
# ---------------------------------------------------------------------------


@torch.library.custom_op("attnfuse::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim."""
    return reference.rms_norm(x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("attnfuse::skip_rms_norm", mutates_args=())
def skip_rms_norm_op(
    x: torch.Tensor, skip: torch.Tensor, weight: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + skip), x + skip)."""
    return reference.skip_rms_norm(x, skip, weight, eps)


@skip_rms_norm_op.register_fake
def _(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _rotate_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, interleaved: bool):
    """reference.rotary on merged heads: x [..., heads * D], cos and sin [..., rd / 2] per token."""
    heads = x.unflatten(-1, (num_heads, -1))
    return reference.rotary(heads, cos.unsqueeze(-2), sin.unsqueeze(-2), interleaved).flatten(-2)


@torch.library.custom_op("attnfuse::rotary", mutates_args=())
def rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of each head of x [..., num_heads * D] (reference.rotary); cos and sin
    [..., rd / 2] hold one row per token, broadcast over x's leading dims."""
    return _rotate_heads(x, cos, sin, num_heads, interleaved).contiguous()


@rotary_op.register_fake
def _(x, cos, sin, num_heads, interleaved):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------
# What graphs call: the ops, or their ONNX form under torch.onnx.export
# ---------------------------------------------------------------------------


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


def attention(q, k, v, key_padding_mask, bias, num_heads: int, scale: float, causal: bool):
    if _exporting():
        return _onnx_attention(q, k, v, key_padding_mask, bias, num_heads, scale, causal)
    return attention_op(q, k, v, key_padding_mask, bias, num_heads, scale, causal)


def packed_attention(q, k, v, indices, mask, bias, num_heads: int, scale: float, causal: bool):
    if _exporting():
        # ONNX Runtime's CPU provider has no packed attention: restore, attend, re-pack.
        return _through_padding(_onnx_attention, q, k, v, indices, mask, bias, num_heads, scale, causal)
    return packed_attention_op(q, k, v, indices, mask, bias, num_heads, scale, causal)


def skip_layernorm(x, skip, bias, weight, beta, eps: float):
    if _exporting():
        if weight is None:
            weight = x.new_ones(x.shape[-1])
        return _skip_norm(onnx_forms.SKIP_LAYER_NORMALIZATION, (x, skip, weight, beta, bias), eps)
    return skip_layernorm_op(x, skip, bias, weight, beta, eps)


def bias_gelu(x, bias, approximate: str):
    if _exporting():
        form = onnx_forms.gelu_form(approximate, bias is not None)
        return _symbolic(form, tuple(a for a in (x, bias) if a is not None), {}, x)
    return bias_gelu_op(x, bias, approximate)


def rms_norm(x, weight, eps: float):
    if _exporting():
        scale = weight if weight is not None else x.new_ones(x.shape[-1])
        attrs = {"axis": -1, "epsilon": float(eps), "stash_type": 1}
        return _symbolic(onnx_forms.SIMPLIFIED_LAYER_NORMALIZATION, (x, scale), attrs, x)
    return rms_norm_op(x, weight, eps)


def skip_rms_norm(x, skip, weight, eps: float):
    if _exporting():
        scale = weight if weight is not None else x.new_ones(x.shape[-1])
        return _skip_norm(onnx_forms.SKIP_SIMPLIFIED_LAYER_NORMALIZATION, (x, skip, scale), eps)
    return skip_rms_norm_op(x, skip, weight, eps)


def _skip_norm(form: onnx_forms.OnnxForm, inputs: tuple, eps: float):
    """A com.microsoft skip norm's outputs 0 and 3: the norm and the residual sum (its mean and
    inverse deviation, outputs 1 and 2, unused)."""
    x = inputs[0]
    statistics = (*x.shape[:-1], 1)
    out, _, _, total = torch.onnx.ops.symbolic_multi_out(
        f"{form.domain}::{form.op_type}", inputs, {"epsilon": float(eps)},
        dtypes=(x.dtype, torch.float32, torch.float32, x.dtype), shapes=(x.shape, statistics, statistics, x.shape),
        version=1,
    )
    return out, total


def rotary(x, cos, sin, num_heads: int, interleaved: bool):
    if _exporting():
        if x.dim() == 2:  # packed rows: RotaryEmbedding takes [batch, seq, hidden]
            return rotary(x[None], cos[None], sin[None], num_heads, interleaved)[0]
        # RotaryEmbedding reads cos and sin rows by position id: each token's own row is its position.
        tables = [t.reshape(-1, t.shape[-1]) for t in (cos, sin)]
        positions = torch.arange(tables[0].shape[0], device=x.device).reshape(cos.shape[:-1]).expand(x.shape[:-1])
        attrs = {"num_heads": num_heads, "rotary_embedding_dim": 2 * cos.shape[-1], "interleaved": int(interleaved)}
        return _symbolic(onnx_forms.ROTARY_EMBEDDING, (x, positions, *tables), attrs, x)
    return rotary_op(x, cos, sin, num_heads, interleaved)


def _onnx_attention(q, k, v, key_padding_mask, bias, num_heads, scale, causal):
    """The op the ONNX path writes for the same attention (onnx_forms.attention_form): GroupQueryAttention
    for k and v with fewer heads than q, or a decode step's cache; MultiHeadAttention otherwise."""
    groups = kv_heads(q, k, num_heads)
    shape = _output_shape(q, k, v, num_heads)
    if q.dim() == 4:  # the fused ops' query is [B, S, hidden]
        q = merge_heads(q)
    head_size = q.shape[-1] // num_heads
    # One query (a decode step, its shape fixed in the export) reads a cache: the keys before it.
    cached = isinstance(q.shape[1], int) and q.shape[1] == 1
    form = onnx_forms.attention_form(num_heads, groups, head_size, shape[-1] // num_heads, cache=cached,
                                     causal=causal or cached, softcap=False).form
    if form is onnx_forms.GROUP_QUERY_ATTENTION:
        return _onnx_grouped(q, k, v, key_padding_mask, bias, num_heads, groups, scale, causal, cached, shape)
    if groups != num_heads:  # MultiHeadAttention has as many k/v heads as q heads: repeat them
        k, v = (_repeat_heads(x, groups, num_heads) for x in (k, v))
    keys = k.shape[2 if k.dim() == 4 else 1]
    mask = _attention_bias(key_padding_mask, bias, causal, q, keys)
    form = onnx_forms.MULTI_HEAD_ATTENTION
    return _symbolic(form, form.arguments(query=q, key=k, value=v, attention_bias=mask),
                     {"num_heads": num_heads, "scale": float(scale)}, q, shape=shape)


def _attention_bias(key_padding_mask, bias, causal: bool, q: torch.Tensor, keys) -> Optional[torch.Tensor]:
    """The fused ops' attention_bias, [B or 1, H or 1, S, T]: no broadcast over S or T."""
    mask = additive_mask(key_padding_mask, bias, causal, q.shape[1], keys, q.dtype, q.device)
    return mask.expand(*mask.shape[:2], q.shape[1], keys) if mask is not None else None


def _onnx_grouped(q, k, v, key_padding_mask, bias, num_heads: int, groups: int, scale, causal: bool, cached: bool,
                  shape) -> torch.Tensor:
    """GroupQueryAttention on [B, S, hidden] q: k and v unrepeated; with a cache, the keys before this
    step's as its past (it appends the new ones and attends causally, bottom-right), its masks as the bias."""
    k, v = split_heads(k, groups), split_heads(v, groups)  # [B, G, T, D]
    queries, keys = q.shape[1], k.shape[2]
    batch = torch.ones(q.shape[0], dtype=torch.int32, device=q.device)
    inputs = {"query": q, "key": merge_heads(k), "value": merge_heads(v),
              "seqlens_k": batch * (keys - 1), "total_sequence_length": batch[0] * keys,
              "attention_bias": _attention_bias(key_padding_mask, bias, False, q, keys)}
    if cached:
        past = keys - queries
        inputs.update(key=merge_heads(k[:, :, past:]), value=merge_heads(v[:, :, past:]), past_key=k[:, :, :past],
                      past_value=v[:, :, :past], query_seqlens=batch * queries)
    attributes = {"num_heads": num_heads, "kv_num_heads": groups, "scale": float(scale),
                  "causal": int(causal or cached)}
    form = onnx_forms.GROUP_QUERY_ATTENTION
    present = (q.shape[0], groups, keys, k.shape[-1])
    output, _, _ = torch.onnx.ops.symbolic_multi_out(
        f"{form.domain}::{form.op_type}", form.arguments(**inputs), attributes,
        dtypes=(q.dtype,) * 3, shapes=(shape, present, present), version=1,
    )
    return output


def _repeat_heads(x: torch.Tensor, groups: int, num_heads: int) -> torch.Tensor:
    """k or v with its `groups` heads each repeated num_heads / groups times, as Expand + Reshape."""
    repeats = num_heads // groups
    if x.dim() == 4:  # [B, G, T, D] -> [B, H, T, D]
        return x[:, :, None].expand(-1, -1, repeats, -1, -1).flatten(1, 2)
    heads = x.unflatten(-1, (groups, -1))  # [B, T, G, D] -> [B, T, H * D]
    return heads[:, :, :, None].expand(-1, -1, -1, repeats, -1).flatten(2)


def _symbolic(form: onnx_forms.OnnxForm, inputs, attrs: dict, like: torch.Tensor, shape=None) -> torch.Tensor:
    return torch.onnx.ops.symbolic(
        f"{form.domain}::{form.op_type}", inputs, attrs, dtype=like.dtype, shape=like.shape if shape is None else shape,
        version=1,
    )
