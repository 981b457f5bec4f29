"""Linear attention over packed sequences: elu+1 or FAVOR+ features.

One program scans one sequence of one head in chunks of BLOCK_T tokens, keeping
the running sums S = sum phi(k) v^T [features, head_dim] and z = sum phi(k) in fp32.
Non-causal: one pass builds S and z, a second reads them out. Causal (a chunked
prefix scan): each chunk reads the sums of the chunks before it, adds its own
lower-triangular part, then folds itself into the sums.

FAVOR+ key features are stabilised by a running max over the keys seen so far
(the sums are rescaled when it grows, as in online softmax); query features by
their own row max. Both constants cancel in phi(q).S / phi(q).z, so the result
equals the reference's, which uses the max over the whole sequence.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnfuse.kernels import reference
from attnfuse.kernels.triton import _common

MAX_HEAD_DIM = 128
# The fp32 state [features, head_dim] (padded) and the dot operands around it live in
# shared memory: compiled for sm_90, 128 x 128 needs ~210 KB with half inputs and
# twice that with fp32 inputs (full-precision dots), against H100's 227 KB.
MAX_STATE = {torch.float16: 128 * 128, torch.bfloat16: 128 * 128, torch.float32: 64 * 128}


@triton.jit
def _load_rows(X, base, rows, stride_t, length, head_dim, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < length) & (dims[None, :] < head_dim)
    return tl.load(X + base + rows[:, None] * stride_t + dims[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(X, base, rows, stride_t, length, head_dim, value, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < length) & (dims[None, :] < head_dim)
    tl.store(X + base + rows[:, None] * stride_t + dims[None, :], value.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _favor_logits(x, proj_t, features_valid, DOT_PRECISION: tl.constexpr):
    """x @ W^T - |x|^2 / 2, -inf on padded features."""
    logits = tl.dot(x, proj_t, input_precision=DOT_PRECISION) - 0.5 * tl.sum(x * x, 1)[:, None]
    return tl.where(features_valid[None, :], logits, float("-inf"))


@triton.jit
def _query_features(q, proj_t, features_valid, feature_scale, head_dim,
                    FAVOR: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if FAVOR:
        logits = _favor_logits(q, proj_t, features_valid, DOT_PRECISION)
        phi = tl.exp(logits - tl.max(logits, 1)[:, None]) * feature_scale
    else:
        dims = tl.arange(0, BLOCK_D)
        phi = tl.where(dims[None, :] < head_dim, tl.where(q > 0, q + 1.0, tl.exp(q)), 0.0)
    return phi


@triton.jit
def _key_features(k, rows_valid, key_max, proj_t, features_valid, feature_scale, head_dim,
                  FAVOR: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """phi(k) of one chunk (zero on padded rows), the new running max, and the factor
    by which the sums so far must be rescaled (1 for elu)."""
    if FAVOR:
        logits = _favor_logits(k, proj_t, features_valid, DOT_PRECISION)
        logits = tl.where(rows_valid[:, None], logits, float("-inf"))
        new_max = tl.maximum(key_max, tl.max(tl.max(logits, 1), 0))
        rescale = tl.exp(key_max - new_max)
        phi = tl.exp(logits - new_max) * feature_scale
    else:
        dims = tl.arange(0, BLOCK_D)
        valid = rows_valid[:, None] & (dims[None, :] < head_dim)
        phi = tl.where(valid, tl.where(k > 0, k + 1.0, tl.exp(k)), 0.0)
        new_max = key_max
        rescale = 1.0
    return phi, new_max, rescale


@triton.jit
def _linear_attention_kernel(
    Q, K, V, Out, CuSeqlens, Proj,
    stride_t, stride_h, head_dim, num_features, feature_scale,
    CAUSAL: tl.constexpr, FAVOR: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq, head = tl.program_id(0), tl.program_id(1)
    start = tl.load(CuSeqlens + seq)
    length = tl.load(CuSeqlens + seq + 1) - start
    base = start.to(tl.int64) * stride_t + head * stride_h
    dims = tl.arange(0, BLOCK_D)
    features = tl.arange(0, BLOCK_F)
    features_valid = features < num_features
    # W^T [BLOCK_D, BLOCK_F], zero outside [head_dim, num_features].
    proj_t = tl.zeros([BLOCK_D, BLOCK_F], dtype=tl.float32)
    if FAVOR:
        proj_t = tl.load(
            Proj + features[None, :] * head_dim + dims[:, None],
            mask=features_valid[None, :] & (dims[:, None] < head_dim), other=0.0,
        ).to(tl.float32)

    state = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    normalizer = tl.zeros([BLOCK_F], dtype=tl.float32)
    key_max = tl.max(tl.full([BLOCK_F], float("-inf"), tl.float32), 0)
    for chunk in range(0, length, BLOCK_T):
        rows = chunk + tl.arange(0, BLOCK_T)
        k = _load_rows(K, base, rows, stride_t, length, head_dim, BLOCK_D)
        v = _load_rows(V, base, rows, stride_t, length, head_dim, BLOCK_D)
        phi_k, key_max, rescale = _key_features(
            k, rows < length, key_max, proj_t, features_valid, feature_scale, head_dim,
            FAVOR, BLOCK_D, DOT_PRECISION,
        )
        state *= rescale
        normalizer *= rescale
        if CAUSAL:
            q = _load_rows(Q, base, rows, stride_t, length, head_dim, BLOCK_D)
            phi_q = _query_features(q, proj_t, features_valid, feature_scale, head_dim, FAVOR, BLOCK_D, DOT_PRECISION)
            # This chunk's own keys j <= i, then the sums of all earlier chunks.
            weights = tl.dot(phi_q, tl.trans(phi_k), input_precision=DOT_PRECISION)
            weights = tl.where(rows[:, None] >= rows[None, :], weights, 0.0)
            numerator = tl.dot(weights, v, input_precision=DOT_PRECISION)
            numerator += tl.dot(phi_q, state, input_precision=DOT_PRECISION)
            denominator = tl.sum(weights, 1) + tl.sum(phi_q * normalizer[None, :], 1)
            _store_rows(Out, base, rows, stride_t, length, head_dim, numerator / denominator[:, None], BLOCK_D)
        state += tl.dot(tl.trans(phi_k), v, input_precision=DOT_PRECISION)
        normalizer += tl.sum(phi_k, 0)

    if not CAUSAL:
        for chunk in range(0, length, BLOCK_T):
            rows = chunk + tl.arange(0, BLOCK_T)
            q = _load_rows(Q, base, rows, stride_t, length, head_dim, BLOCK_D)
            phi_q = _query_features(q, proj_t, features_valid, feature_scale, head_dim, FAVOR, BLOCK_D, DOT_PRECISION)
            numerator = tl.dot(phi_q, state, input_precision=DOT_PRECISION)
            denominator = tl.sum(phi_q * normalizer[None, :], 1)
            _store_rows(Out, base, rows, stride_t, length, head_dim, numerator / denominator[:, None], BLOCK_D)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    feature_map: str = "elu",
    causal: bool = False,
    projection: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton kernel for `reference.linear_attention` (same arguments, same result).

    q, k, v: [total_tokens, heads, head_dim] float16/bfloat16/float32 (head_dim up to
    128); cu_seqlens int32 [batch+1]; projection [num_features, head_dim] for
    feature_map="favor". Sums are kept in fp32; num_features x head_dim (padded) is
    bounded by MAX_STATE.
    """
    reference.check_linear_attention_args(q, k, v, cu_seqlens, feature_map, projection)
    _common.check_float("q", q)
    _common.check_launchable(q, k, v, cu_seqlens, projection)
    total, heads, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    favor = feature_map == "favor"
    num_features = projection.shape[0] if favor else head_dim
    block_d, block_f = _common.padded_dim(head_dim), _common.padded_dim(num_features)
    if block_d * block_f > MAX_STATE[q.dtype]:
        raise ValueError(
            f"features x head_dim, padded to powers of two, must be at most {MAX_STATE[q.dtype]} "
            f"for {q.dtype} (the running sums must fit in shared memory); got {block_f} x {block_d}"
        )

    q, k, v = (x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    batch = cu_seqlens.numel() - 1
    if total == 0 or batch == 0:
        return out
    proj = projection.float().contiguous() if favor else q  # q: unused placeholder
    _linear_attention_kernel[(batch, heads)](
        q, k, v, out, cu_seqlens, proj,
        q.stride(0), q.stride(1), head_dim, num_features, 1.0 / math.sqrt(num_features),
        CAUSAL=causal, FAVOR=favor,
        BLOCK_T=_common.sequence_block(), BLOCK_D=block_d, BLOCK_F=block_f, DOT_PRECISION=_common.dot_precision(q.dtype),
    )
    return out
