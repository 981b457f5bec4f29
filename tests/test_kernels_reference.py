"""reference.py checked against independent formulations (torch.nn.functional, loops)."""
import math

import pytest
import torch
import torch.nn.functional as F

from attnfuse.kernels import reference as ref


def packed(lengths, heads=2, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), heads, head_dim, generator=generator) for _ in range(3))
    return q, k, v, cu


def visible_by_loops(length, causal, window, global_tokens):
    """The visibility rule written out element by element."""
    left, right = window
    seen = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(length):
            in_window = (left < 0 or j >= i - left) and (right < 0 or j <= i + right)
            is_global = i < global_tokens or j < global_tokens
            seen[i, j] = (in_window or is_global) and (not causal or j <= i)
    return seen


MASKS = [
    dict(),
    dict(causal=True),
    dict(window=(2, 1)),
    dict(window=(0, 0)),
    dict(causal=True, window=(3, -1)),
    dict(window=(1, 1), global_tokens=2),
    dict(causal=True, window=(1, 0), global_tokens=2),
]


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("alibi", [False, True])
def test_varlen_attention_matches_sdpa_per_sequence(mask, alibi):
    lengths = [1, 6, 9]
    q, k, v, cu = packed(lengths, heads=4)
    slopes = ref.alibi_slopes(4) if alibi else None
    out = ref.varlen_attention(q, k, v, cu, max(lengths), scale=0.3, alibi_slopes=slopes, **mask)

    window = mask.get("window", (-1, -1))
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        length = end - start
        seen = visible_by_loops(length, mask.get("causal", False), window, mask.get("global_tokens", 0))
        bias = torch.zeros(4, length, length).masked_fill(~seen, -math.inf)
        if alibi:
            pos = torch.arange(length)
            bias = bias - slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()
        bhsd = lambda x: x[start:end].transpose(0, 1)[None]  # noqa: E731
        expected = F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), attn_mask=bias[None], scale=0.3)
        torch.testing.assert_close(out[start:end], expected[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_visible_matches_loops():
    pos = torch.arange(11)
    for mask in MASKS:
        causal, window, global_tokens = mask.get("causal", False), mask.get("window", (-1, -1)), mask.get("global_tokens", 0)
        got = ref.visible(pos[:, None], pos[None, :], causal=causal, window=window, global_tokens=global_tokens)
        assert torch.equal(got, visible_by_loops(11, causal, window, global_tokens)), mask


def test_attention_matches_sdpa_with_padding_and_causal():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=generator) for _ in range(3))
    key_padding = torch.tensor([[True] * 5, [True, True, True, False, False]])
    bias = torch.randn(1, 3, 5, 5, generator=generator)
    got = ref.attention(q, k, v, scale=0.5, bias=bias, key_padding_mask=key_padding, causal=True)
    allowed = key_padding[:, None, None, :] & torch.ones(5, 5, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~allowed, -math.inf), scale=0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_attention_row_that_sees_nothing_is_zero():
    q, k, v = (torch.randn(1, 1, 3, 4) for _ in range(3))
    out = ref.attention(q, k, v, scale=1.0, key_padding_mask=torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))


def test_alibi_slopes_like_bloom():
    torch.testing.assert_close(ref.alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    # 12 heads: the 8 slopes of 8 heads, then the odd powers of 16 heads' ratio 2^-0.5.
    expected_12 = [2.0 ** -i for i in range(1, 9)] + [2.0 ** (-0.5 * i) for i in (1, 3, 5, 7)]
    torch.testing.assert_close(ref.alibi_slopes(12), torch.tensor(expected_12))
    assert ref.alibi_slopes(1).tolist() == [2.0**-8]


def test_varlen_attention_rejects_bad_arguments():
    q, k, v, cu = packed([3, 4])
    with pytest.raises(ValueError, match="int32"):
        ref.varlen_attention(q, k, v, cu.long(), 4)
    with pytest.raises(ValueError, match="total_tokens"):
        ref.varlen_attention(q, k, v, cu[:-1], 4)
    with pytest.raises(ValueError, match="window"):
        ref.varlen_attention(q, k, v, cu, 4, window=(-2, 3))
    with pytest.raises(ValueError, match="alibi_slopes"):
        ref.varlen_attention(q, k, v, cu, 4, alibi_slopes=torch.ones(3))


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_linear_attention_causal_last_row_is_non_causal(feature_map):
    lengths = [1, 5, 12]
    q, k, v, cu = packed(lengths, head_dim=8)
    projection = ref.favor_features(16, 8, seed=3) if feature_map == "favor" else None
    kwargs = dict(feature_map=feature_map, projection=projection)
    full = ref.linear_attention(q, k, v, cu, **kwargs)
    causal = ref.linear_attention(q, k, v, cu, causal=True, **kwargs)
    last_rows = (cu[1:] - 1).long()
    torch.testing.assert_close(causal[last_rows], full[last_rows], atol=1e-5, rtol=1e-5)
    # The first row of each sequence sees only itself: its output is its own value.
    torch.testing.assert_close(causal[cu[:-1].long()], v[cu[:-1].long()], atol=1e-5, rtol=1e-5)


def test_linear_attention_elu_matches_quadratic_form():
    q, k, v, cu = packed([7], head_dim=4)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    weights = torch.einsum("ihf,jhf->hij", phi_q, phi_k).tril()
    expected = torch.einsum("hij,jhd->ihd", weights / weights.sum(-1, keepdim=True), v)
    torch.testing.assert_close(ref.linear_attention(q, k, v, cu, causal=True), expected, atol=1e-5, rtol=1e-5)


def test_favor_approximates_softmax_attention():
    q, k, v, cu = packed([64], heads=1, head_dim=8)
    # FAVOR+ is unbiased; its variance grows with |q + k|, so keep the logits small.
    q, k = q * 0.3, k * 0.3
    approx = ref.linear_attention(q, k, v, cu, feature_map="favor", projection=ref.favor_features(4096, 8, seed=0))
    exact = ref.varlen_attention(q, k, v, cu, 64, scale=1.0)
    assert (approx - exact).abs().mean() < 0.1 * exact.abs().mean()


def test_favor_features_are_seeded_and_orthogonal_in_blocks():
    w = ref.favor_features(12, 8, seed=7)
    assert w.shape == (12, 8) and torch.equal(w, ref.favor_features(12, 8, seed=7))
    assert not torch.equal(w, ref.favor_features(12, 8, seed=8))
    first_block = w[:8] / w[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(first_block @ first_block.T, torch.eye(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_bias", [True, False])
def test_skip_layernorm_matches_layer_norm(with_bias):
    x, skip = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    bias = torch.randn(16) if with_bias else None
    weight, beta = torch.randn(16), torch.randn(16)
    expected = F.layer_norm(x + skip + (bias if with_bias else 0), (16,), weight, beta, eps=1e-6)
    torch.testing.assert_close(ref.skip_layernorm(x, skip, bias, weight, beta, 1e-6), expected)
    no_beta = F.layer_norm(x + skip + (bias if with_bias else 0), (16,), weight, None, eps=1e-6)
    torch.testing.assert_close(ref.skip_layernorm(x, skip, bias, weight, None, 1e-6), no_beta)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_matches_gelu(approximate):
    x, bias = torch.randn(4, 32) * 3, torch.randn(32)
    torch.testing.assert_close(ref.bias_gelu(x, bias, approximate), F.gelu(x + bias, approximate=approximate))
    torch.testing.assert_close(ref.bias_gelu(x, None, approximate), F.gelu(x, approximate=approximate))
    half = ref.bias_gelu(x.half(), bias.half(), approximate)
    assert half.dtype == torch.float16


PACK_MASKS = {
    "right": [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]],
    "left": [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]],
    "holes": [[1, 0, 1, 0, 1], [0, 1, 1, 0, 0]],
    "empty_row": [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]],
}


@pytest.mark.parametrize("name", PACK_MASKS)
def test_pack_unpack_round_trip(name):
    mask = torch.tensor(PACK_MASKS[name], dtype=torch.bool)
    x = torch.randn(2, 5, 3)
    tokens, indices, cu, max_seqlen = ref.pack(x, mask)

    lengths = mask.sum(1)
    assert indices.dtype == torch.int64 and cu.dtype == torch.int32
    assert cu.tolist() == [0, *lengths.cumsum(0).tolist()] and max_seqlen == int(lengths.max())
    expected_tokens = torch.cat([x[b][mask[b]] for b in range(2)])
    assert torch.equal(tokens, expected_tokens)

    restored = ref.unpack(tokens, indices, 2, 5)
    assert torch.equal(restored, x * mask[..., None])


def test_pack_accepts_integer_masks_and_unpack_checks_lengths():
    mask = torch.tensor([[1, 0, 1]])
    tokens, indices, cu, _ = ref.pack(torch.arange(3.0)[None, :, None], mask)
    assert tokens.flatten().tolist() == [0.0, 2.0] and cu.tolist() == [0, 2]
    with pytest.raises(ValueError):
        ref.unpack(tokens, indices[:1], 1, 3)
    with pytest.raises(ValueError):
        ref.pack(torch.zeros(1, 4, 2), mask)
