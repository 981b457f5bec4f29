"""Plain-torch definitions of every fused op: the specification.

Each function here is written to be read, not to be fast: loops over sequences,
dense masks, fp32 arithmetic. Every other implementation (the Triton kernels, the
torch.library ops, the ONNX lowerings) is tested against these functions.

Conventions shared by all ops:
- Packed ("varlen") tensors follow FlashAttention: [total_tokens, heads, head_dim],
  with int32 `cu_seqlens` of length batch+1 giving where each sequence starts.
- Positions inside a packed sequence are counted from its first real token, so a
  sequence packed from a mask with holes has positions 0, 1, 2, ... over its real
  tokens (causal order, window and ALiBi distances use these positions).
- Statistics (softmax, layernorm) are computed in fp32; results come back in the
  input dtype.

No Triton import here: CPU users without Triton import this module.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Window = tuple[int, int]

# ---------------------------------------------------------------------------
# Argument checks, shared with the kernel wrappers
# ---------------------------------------------------------------------------


def default_scale(head_dim: int) -> float:
    """The usual softmax scale 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)


def normalize_window(window: Window | None) -> Window:
    """Check a (left, right) window; -1 on a side means unbounded."""
    if window is None:
        return (-1, -1)
    if len(window) != 2:
        raise ValueError(f"window must be (left, right), got {window!r}")
    left, right = (int(w) for w in window)
    if left < -1 or right < -1:
        raise ValueError(f"window sides must be >= 0, or -1 for unbounded; got {window!r}")
    return left, right


def check_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D of length batch+1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total_tokens:
        raise ValueError(
            f"cu_seqlens must run from 0 to total_tokens={total_tokens}, "
            f"got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}"
        )
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def check_packed_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """q, k, v: [total_tokens, heads, head_dim], all alike; cu_seqlens matches them."""
    if q.dim() != 3:
        raise ValueError(f"q must be [total_tokens, heads, head_dim], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_cu_seqlens(cu_seqlens, q.shape[0])


def check_alibi_slopes(alibi_slopes: torch.Tensor | None, num_heads: int) -> None:
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (num_heads,):
        raise ValueError(f"alibi_slopes must have shape ({num_heads},), got {tuple(alibi_slopes.shape)}")


def sequence_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of each packed sequence."""
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


# ---------------------------------------------------------------------------
# Softmax attention
# ---------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """softmax(q @ k^T * scale + bias, masked) @ v on [B, H, S, D] tensors.

    k and v may have fewer heads than q (grouped-query attention, [B, G, T, D] with H a
    multiple of G): query head h reads key/value head h // (H / G).
    bias: additive, broadcastable to [B, H, S, T] (-inf entries hide a key).
    key_padding_mask: bool [B, T], True for a real key.
    causal: query i sees key j <= i + T - S (bottom-right aligned, as FlashAttention's:
    the queries are the last S of the T positions, as with a KV cache; with S == T this is
    SDPA's is_causal). A query row that sees no key outputs zeros.
    """
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask.bool()[:, None, None, :], -math.inf)
    if causal:
        s, t = scores.shape[-2:]
        hidden = torch.ones(s, t, dtype=torch.bool, device=q.device).triu(1 + t - s)
        scores = scores.masked_fill(hidden, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    # softmax of an all -inf row is NaN; such a row sees nothing and outputs zeros.
    sees_nothing = scores.amax(dim=-1, keepdim=True) == -math.inf
    probs = probs.masked_fill(sees_nothing, 0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, G, T, D] k or v heads repeated to [B, num_heads, T, D]: head h is x's head h // (num_heads / G)."""
    groups = x.shape[1]
    if num_heads % groups:
        raise ValueError(f"{num_heads} query heads cannot share {groups} key/value heads evenly")
    return x.repeat_interleave(num_heads // groups, dim=1)


def visible(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    *,
    causal: bool,
    window: Window,
    global_tokens: int,
) -> torch.Tensor:
    """Whether the query at query_pos sees the key at key_pos (broadcasting).

    The window (left, right) admits key j for query i when i-left <= j <= i+right
    (-1: unbounded side). The first `global_tokens` positions are global: a global
    query sees every key and every query sees a global key, whatever the window.
    Global tokens override the window but NOT causality: with causal=True no query
    ever sees a later key, global or not.
    """
    left, right = window
    i, j = query_pos, key_pos
    in_window = torch.ones_like(i >= j)
    if left >= 0:
        in_window = in_window & (j >= i - left)
    if right >= 0:
        in_window = in_window & (j <= i + right)
    is_global = (i < global_tokens) | (j < global_tokens)
    seen = in_window | is_global
    if causal:
        seen = seen & (j <= i)
    return seen


def alibi_bias(slopes: torch.Tensor, length: int) -> torch.Tensor:
    """[H, L, L] additive bias -slope[h] * |i - j|."""
    pos = torch.arange(length, device=slopes.device)
    distance = (pos[:, None] - pos[None, :]).abs().float()
    return -slopes.float()[:, None, None] * distance


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: Window = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    global_tokens: int = 0,
) -> torch.Tensor:
    """Attention over packed sequences, in FlashAttention's varlen convention.

    q, k, v: [total_tokens, heads, head_dim]; cu_seqlens: int32 [batch+1];
    max_seqlen: the longest sequence (unused here, kept for the kernel's signature).
    scale defaults to 1/sqrt(head_dim). Which keys a query sees is `visible(...)`:
    causal, window=(left, right) and `global_tokens` (global tokens override the
    window, not causality). ALiBi subtracts alibi_slopes[h] * |i - j| from the
    scaled score (under causal masking this equals BLOOM's slope * j bias, since
    softmax ignores a per-row constant). A query row that sees no key outputs zeros.
    """
    check_packed_qkv(q, k, v, cu_seqlens)
    check_alibi_slopes(alibi_slopes, q.shape[1])
    window = normalize_window(window)
    scale = default_scale(q.shape[-1]) if scale is None else scale

    out = torch.zeros_like(q)
    for start, end in sequence_bounds(cu_seqlens):
        length = end - start
        if not length:  # an empty row of the batch: nothing to attend
            continue
        pos = torch.arange(length, device=q.device)
        seen = visible(pos[:, None], pos[None, :], causal=causal, window=window, global_tokens=global_tokens)
        bias = torch.zeros(length, length, device=q.device).masked_fill(~seen, -math.inf)
        if alibi_slopes is not None:
            bias = bias + alibi_bias(alibi_slopes.to(q.device), length)
        as_bhsd = lambda x: x[start:end].transpose(0, 1)[None]  # noqa: E731
        o = attention(as_bhsd(q), as_bhsd(k), as_bhsd(v), scale=scale, bias=bias)
        out[start:end] = o[0].transpose(0, 1)
    return out


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi slopes of Press et al., as BLOOM computes them (float32 [num_heads]).

    For a power of two n the slopes are r, r^2, ..., r^n with r = 2^(-8/n). Other head
    counts take the slopes of the largest power of two below n, then the odd powers
    of the next power of two's ratio for the remaining heads.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * p / lower) for p in range(1, lower + 1)]
    remaining = num_heads - lower
    slopes += [2.0 ** (-8.0 * p / (2 * lower)) for p in range(1, 2 * remaining, 2)]
    return torch.tensor(slopes, dtype=torch.float32)


# ---------------------------------------------------------------------------
# Linear attention
# ---------------------------------------------------------------------------


def favor_features(num_features: int, head_dim: int, seed: int) -> torch.Tensor:
    """Seeded orthogonal random features [num_features, head_dim] for FAVOR+.

    Blocks of head_dim orthogonal rows (QR of a Gaussian matrix, signs fixed so the
    directions are uniform), rows rescaled to the norms of Gaussian vectors, as in
    Performer. The same seed gives the same
    matrix on every machine (CPU generator, float64, then float32).
    """
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        orthogonal, upper = torch.linalg.qr(gaussian)
        # Fix QR's sign choice so the directions are uniform (Haar); otherwise they
        # lean one way and the kernel estimate is biased.
        orthogonal = orthogonal * torch.sign(torch.diagonal(upper))
        blocks.append(orthogonal.T)
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (rows * norms[:, None]).float()


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def favor_feature_map(x: torch.Tensor, projection: torch.Tensor, *, per_row_max: bool) -> torch.Tensor:
    """Positive random features exp(x @ W^T - |x|^2/2 - max) / sqrt(F) of x [L, H, D].

    Subtracting a max keeps exp from overflowing. It cancels in the linear attention
    ratio when it is constant over what is summed: per row for queries, over the
    whole sequence (per head) for keys.
    """
    logits = x @ projection.T - 0.5 * (x * x).sum(-1, keepdim=True)
    if per_row_max:
        stabilizer = logits.amax(dim=-1, keepdim=True)
    else:
        stabilizer = logits.amax(dim=(0, 2), keepdim=True)
    return torch.exp(logits - stabilizer) / math.sqrt(projection.shape[0])


def check_linear_attention_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, feature_map: str, projection
) -> None:
    check_packed_qkv(q, k, v, cu_seqlens)
    if feature_map not in ("elu", "favor"):
        raise ValueError(f"feature_map must be 'elu' or 'favor', got {feature_map!r}")
    if feature_map == "favor":
        if projection is None or projection.dim() != 2 or projection.shape[1] != q.shape[-1]:
            shape = None if projection is None else tuple(projection.shape)
            raise ValueError(f"favor needs a projection [num_features, {q.shape[-1]}], got {shape}")
    elif projection is not None:
        raise ValueError("projection is only used with feature_map='favor'")


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
    """Linear attention over packed sequences [total_tokens, heads, head_dim].

    out_i = phi(q_i) . S / (phi(q_i) . z) with S = sum_j phi(k_j) v_j^T and
    z = sum_j phi(k_j), summed over the whole sequence or, with causal=True, over
    j <= i. phi is elu(x) + 1 ("elu") or FAVOR+ positive random features with the
    given projection [num_features, head_dim] ("favor", see `favor_features`). FAVOR+
    approximates exp(q . k): fold a softmax scale into q and k beforehand (each
    times scale ** 0.5). Computed in fp32, returned in q's dtype.
    """
    check_linear_attention_args(q, k, v, cu_seqlens, feature_map, projection)
    out = torch.zeros_like(q)
    for start, end in sequence_bounds(cu_seqlens):
        qs, ks, vs = (x[start:end].float() for x in (q, k, v))
        if feature_map == "elu":
            phi_q, phi_k = elu_feature_map(qs), elu_feature_map(ks)
        else:
            w = projection.float()
            phi_q = favor_feature_map(qs, w, per_row_max=True)
            phi_k = favor_feature_map(ks, w, per_row_max=False)
        # [L, H, F] x [L, H, D] -> per-position outer products [L, H, F, D]
        kv = phi_k[..., :, None] * vs[..., None, :]
        if causal:
            state, normalizer = kv.cumsum(0), phi_k.cumsum(0)
        else:
            state, normalizer = kv.sum(0, keepdim=True), phi_k.sum(0, keepdim=True)
        numerator = torch.einsum("lhf,lhfd->lhd", phi_q, state)
        denominator = (phi_q * normalizer).sum(-1, keepdim=True)
        out[start:end] = (numerator / denominator).to(q.dtype)
    return out


# ---------------------------------------------------------------------------
# Token-wise fusions
# ---------------------------------------------------------------------------


def skip_layernorm(
    x: torch.Tensor,
    skip: torch.Tensor,
    bias: torch.Tensor | None,
    weight: torch.Tensor,
    beta: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """layernorm(x + skip + bias) over the last dim, fp32 statistics, x's dtype out."""
    h = x.float() + skip.float()
    if bias is not None:
        h = h + bias.float()
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    y = (h - mean) * torch.rsqrt(var + eps) * weight.float()
    if beta is not None:
        y = y + beta.float()
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, fp32 statistics, x's dtype out."""
    h = x.float()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def skip_rms_norm(
    x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + skip), x + skip): the residual sum is an output too, as decoders read it again."""
    total = x + skip
    return rms_norm(total, weight, eps), total


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotary position embedding of x's last dim (FlashAttention's and ONNX Runtime's convention).

    The first rd = 2 * cos.shape[-1] dims turn in pairs; the rest pass unchanged (partial
    rotary, as Phi's). Pair i is (x[i], x[i + rd/2]) ("rotate-half", GPT-NeoX and Llama) or
    (x[2i], x[2i+1]) (interleaved, GPT-J), and turns by the angle whose cosine and sine are
    cos[..., i] and sin[..., i]; cos and sin broadcast against x[..., :rd/2].
    """
    half = cos.shape[-1]
    turned, rest = x[..., : 2 * half].float(), x[..., 2 * half :]
    if interleaved:
        a, b = turned[..., 0::2], turned[..., 1::2]
    else:
        a, b = turned[..., :half], turned[..., half:]
    c, s = cos.float(), sin.float()
    a, b = a * c - b * s, b * c + a * s
    turned = torch.stack((a, b), -1).flatten(-2) if interleaved else torch.cat((a, b), -1)
    return torch.cat((turned.to(x.dtype), rest), -1)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias), exact (erf) or with the tanh approximation; fp32 inside."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    h = x.float() if bias is None else x.float() + bias.float()
    if approximate == "none":
        y = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    else:
        y = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    return y.to(x.dtype)


def silu(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """x * sigmoid(alpha * x): SiLU (swish) with alpha 1, quick gelu with 1.702; fp32 inside."""
    h = x.float()
    return (h * torch.sigmoid(alpha * h)).to(x.dtype)


# ---------------------------------------------------------------------------
# Padding removal and restoration
# ---------------------------------------------------------------------------


def pack(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Keep the real tokens of a padded batch.

    x: [B, S, ...]; mask: [B, S], nonzero/True for a real token (any pattern: right or
    left padding, holes, rows with no real token). Returns tokens [total, ...] in
    row-major order, their flat indices int64 [total] into B*S, int32 cu_seqlens
    [B+1] and max_seqlen (a Python int).

    This is torch's gather (nonzero + cumsum + index_select), used everywhere,
    GPU included: a Triton kernel would not beat it for a pure copy.
    """
    if mask.dim() != 2 or tuple(x.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"mask must be [B, S] matching x's first two dims, got {tuple(mask.shape)} for x {tuple(x.shape)}")
    real = mask.bool()
    indices = token_indices(real)
    tokens = x.flatten(0, 1).index_select(0, indices)
    return tokens, indices, *sequence_offsets(real)


def sequence_offsets(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """int32 cu_seqlens [B+1] of the tokens `pack` keeps from a [B, S] mask, and max_seqlen."""
    seqlens = (mask != 0).sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu_seqlens[1:] = seqlens.cumsum(0)
    return cu_seqlens, int(seqlens.max()) if seqlens.numel() else 0


def token_indices(mask: torch.Tensor) -> torch.Tensor:
    """int64 flat positions, into B*S, of the real tokens of a [B, S] mask, in row-major order."""
    return (mask != 0).flatten().nonzero().flatten()


def unpack(tokens: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Scatter packed tokens back to [batch, seqlen, ...]; padded positions are zero.

    The inverse of `pack` (torch's index_put; see `pack` for why not Triton).
    """
    if tokens.shape[0] != indices.shape[0]:
        raise ValueError(f"{tokens.shape[0]} tokens but {indices.shape[0]} indices")
    out = tokens.new_zeros(batch * seqlen, *tokens.shape[1:])
    out.index_put_((indices,), tokens)
    return out.view(batch, seqlen, *tokens.shape[1:])
