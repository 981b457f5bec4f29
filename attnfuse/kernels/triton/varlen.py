"""Flash attention over packed variable-length sequences, with window, ALiBi and
global tokens.

One program computes one block of queries of one sequence and one head. It walks
only the key blocks its queries can see: the global key blocks, then the blocks
between the window's (or the causal triangle's) bounds. A sliding window thus costs
O(length * window), not O(length^2). Softmax is computed online in fp32.

Which keys a query sees is defined by `reference.visible`; `_visible` below is the
same rule for tiles (the tests check one against the other).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnfuse.kernels import reference
from attnfuse.kernels.triton import _common

# Softmax runs on exp2; scores are converted with log2(e).
LOG2E = tl.constexpr(1.4426950408889634)
MAX_HEAD_DIM = 128


@triton.jit
def _visible(i, j, left, right, global_tokens, CAUSAL: tl.constexpr):
    """reference.visible for a tile: i query positions [M, 1], j key positions [1, N]."""
    in_window = ((left < 0) | (j >= i - left)) & ((right < 0) | (j <= i + right))
    seen = in_window | (i < global_tokens) | (j < global_tokens)
    if CAUSAL:
        seen = seen & (j <= i)
    return seen


@triton.jit
def _attend_key_blocks(
    acc, row_max, row_sum, q, rows, K, V, base, stride_t, length, head_dim,
    key_lo, key_hi, scale, slope, left, right, global_tokens,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys [key_lo, key_hi) into the online softmax state (acc, row_max, row_sum)."""
    dims = tl.arange(0, BLOCK_D)
    for key_start in range(key_lo, key_hi, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_valid = keys < length
        # K is read transposed, [BLOCK_D, BLOCK_N], ready for q @ k^T.
        k_t = tl.load(
            K + base + keys[None, :] * stride_t + dims[:, None],
            mask=key_valid[None, :] & (dims[:, None] < head_dim), other=0.0,
        )
        v = tl.load(
            V + base + keys[:, None] * stride_t + dims[None, :],
            mask=key_valid[:, None] & (dims[None, :] < head_dim), other=0.0,
        )
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale
        if HAS_ALIBI:
            distance = tl.abs(rows[:, None] - keys[None, :]).to(tl.float32)
            scores -= slope * distance
        seen = _visible(rows[:, None], keys[None, :], left, right, global_tokens, CAUSAL) & key_valid[None, :]
        scores = tl.where(seen, scores, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # A row that has seen no key yet keeps max -inf; shift it by 0 so exp gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2((scores - shift[:, None]) * LOG2E)
        correction = tl.exp2((row_max - shift) * LOG2E)
        row_sum = row_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def _varlen_attention_kernel(
    Q, K, V, Out, CuSeqlens, Slopes,
    stride_t, stride_h, head_dim, scale, left, right, global_tokens,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    query_block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(CuSeqlens + seq)
    length = tl.load(CuSeqlens + seq + 1) - start
    first_query = query_block * BLOCK_M
    if first_query >= length:
        return
    last_query = tl.minimum(first_query + BLOCK_M, length) - 1

    base = start.to(tl.int64) * stride_t + head * stride_h
    rows = first_query + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    tile = rows[:, None] * stride_t + dims[None, :]
    tile_valid = (rows[:, None] < length) & (dims[None, :] < head_dim)
    q = tl.load(Q + base + tile, mask=tile_valid, other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + head).to(tl.float32)

    # Keys this block can see: [key_lo, key_hi), plus the global keys. A block holding
    # a global query sees every key (causality permitting).
    no_global_query = first_query >= global_tokens
    window_lo = tl.maximum(first_query - left, 0) // BLOCK_N * BLOCK_N
    key_lo = tl.where((left >= 0) & no_global_query, window_lo, 0)
    key_hi = tl.where((right >= 0) & no_global_query, tl.minimum(length, last_query + right + 1), length)
    if CAUSAL:
        key_hi = tl.minimum(key_hi, last_query + 1)
    global_end = tl.minimum(tl.cdiv(global_tokens, BLOCK_N) * BLOCK_N, key_hi)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    # The global key blocks [0, global_end), then the window from where they end: both
    # ranges start on a block boundary, so no key block is visited twice.
    acc, row_max, row_sum = _attend_key_blocks(
        acc, row_max, row_sum, q, rows, K, V, base, stride_t, length, head_dim,
        0, global_end, scale, slope, left, right, global_tokens,
        CAUSAL, HAS_ALIBI, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )
    acc, row_max, row_sum = _attend_key_blocks(
        acc, row_max, row_sum, q, rows, K, V, base, stride_t, length, head_dim,
        tl.maximum(key_lo, global_end), key_hi, scale, slope, left, right, global_tokens,
        CAUSAL, HAS_ALIBI, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )
    # A row that saw no key outputs zeros (acc is zero there).
    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    tl.store(Out + base + tile, out.to(Out.dtype.element_ty), mask=tile_valid)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    global_tokens: int = 0,
) -> torch.Tensor:
    """Triton kernel for `reference.varlen_attention` (same arguments, same result).

    q, k, v: [total_tokens, heads, head_dim] float16/bfloat16/float32, head_dim up to
    128 (padded to a power of two inside the kernel); cu_seqlens: int32 [batch+1];
    max_seqlen must be at least the longest sequence (it sizes the launch grid and is
    trusted, as in FlashAttention, to avoid a device sync). Global tokens override the
    window but not causality. A query row that sees no key outputs zeros.
    """
    reference.check_packed_qkv(q, k, v, cu_seqlens)
    reference.check_alibi_slopes(alibi_slopes, q.shape[1])
    _common.check_float("q", q)
    _common.check_launchable(q, k, v, cu_seqlens, alibi_slopes)
    left, right = reference.normalize_window(window)
    total, heads, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if global_tokens < 0:
        raise ValueError(f"global_tokens must be >= 0, got {global_tokens}")
    scale = reference.default_scale(head_dim) if scale is None else float(scale)

    q, k, v = (x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    batch = cu_seqlens.numel() - 1
    if total == 0 or batch == 0 or max_seqlen <= 0:
        return out
    block = _common.sequence_block()
    slopes = alibi_slopes.float().contiguous() if alibi_slopes is not None else q  # q: unused placeholder
    grid = (triton.cdiv(max_seqlen, block), batch, heads)
    _varlen_attention_kernel[grid](
        q, k, v, out, cu_seqlens, slopes,
        q.stride(0), q.stride(1), head_dim, scale, left, right, global_tokens,
        CAUSAL=causal, HAS_ALIBI=alibi_slopes is not None,
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=_common.padded_dim(head_dim),
        DOT_PRECISION=_common.dot_precision(q.dtype),
    )
    return out
