"""The Triton kernels against reference.py, on tiny shapes.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), with 16-row blocks, so the sequences below cross block edges.
"""
import pytest
import torch

pytest.importorskip("triton")

from attnfuse.kernels import reference as ref  # noqa: E402
from attnfuse.kernels import triton as kernels  # noqa: E402
from attnfuse.kernels.triton import _common  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
# The interpreter stores bfloat16 as raw uint16 and its tl.dot multiplies the bit
# patterns (triton-lang/triton#11584, "not supported yet"); loads, casts and fp32
# arithmetic after a cast are fine, so only kernels that dot in bf16 are skipped.
BF16_DOT = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(_common.interpreted(), reason="Triton's interpreter has no bfloat16 tl.dot (triton#11584)"),
)

# One long sequence (several blocks, not a multiple of 16) among short ones, incl. length 1.
LENGTHS = [5, 70, 1, 17, 3]


def packed(lengths, heads=2, head_dim=16, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(int(cu[-1]), heads, head_dim, generator=generator).to(DEVICE, dtype) for _ in range(3))
    return q, k, v, cu


def assert_matches(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[got.dtype])


# ---------------------------------------------------------------- varlen attention

MASKS = {
    "dense": dict(),
    "causal": dict(causal=True),
    "window_smaller_than_block": dict(window=(3, 2)),
    "causal_alibi": dict(causal=True, alibi=True),
    "window_alibi_global": dict(window=(4, 4), global_tokens=2, alibi=True),
    "causal_left_window_global": dict(causal=True, window=(20, -1), global_tokens=18),
    "right_window_only": dict(window=(-1, 0)),
}


def run_varlen_both(q, k, v, cu, mask):
    kwargs = dict(mask)
    if kwargs.pop("alibi", False):
        kwargs["alibi_slopes"] = ref.alibi_slopes(q.shape[1]).to(DEVICE)
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    return kernels.varlen_attention(q, k, v, cu, max_seqlen, **kwargs), ref.varlen_attention(q, k, v, cu, max_seqlen, **kwargs)


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_varlen_attention_fp32(mask):
    got, expected = run_varlen_both(*packed(LENGTHS, heads=3), mask)
    assert_matches(got, expected)


@pytest.mark.parametrize("mask", [MASKS["causal_alibi"], MASKS["window_alibi_global"]], ids=["causal_alibi", "window_global"])
def test_varlen_attention_head_dim_80(mask):
    # 80 is padded to 128 inside the kernel with masked loads.
    got, expected = run_varlen_both(*packed([33, 1, 9], head_dim=80), mask)
    assert_matches(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, BF16_DOT])
@pytest.mark.parametrize("mask", [MASKS["dense"], MASKS["window_alibi_global"]], ids=["dense", "window_global"])
def test_varlen_attention_half(dtype, mask):
    got, expected = run_varlen_both(*packed(LENGTHS, head_dim=32, dtype=dtype), mask)
    assert_matches(got, expected)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "mask, poisoned_key, clean_rows",
    [
        # window (2, 2): query blocks from the third on never reach the first key block.
        (dict(window=(2, 2)), 0, lambda block: slice(2 * block, None)),
        # causal: only the last query block reaches the last key block.
        (dict(causal=True), -1, lambda block: slice(0, 5 * block)),
    ],
    ids=["window", "causal"],
)
def test_varlen_attention_skips_blocks_it_cannot_see(mask, poisoned_key, clean_rows):
    # A NaN value in a key block poisons every query block that reads it (0 * NaN is
    # NaN), so clean rows prove the kernel skipped that block rather than masked it.
    block = _common.sequence_block()
    q, k, v, cu = packed([6 * block - 3])
    poisoned_v = v.clone()
    poisoned_v[poisoned_key] = float("nan")
    got = kernels.varlen_attention(q, k, poisoned_v, cu, 6 * block, **mask)
    expected = ref.varlen_attention(q, k, v, cu, 6 * block, **mask)
    rows = clean_rows(block)
    assert_matches(got[rows], expected[rows])


def test_varlen_attention_scale_and_strided_inputs():
    q, k, v, cu = packed([20, 4], head_dim=16)
    qkv = torch.stack([q, k, v], dim=2)  # [T, H, 3, D]: q, k, v are strided views
    got = kernels.varlen_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], cu, 20, scale=0.7, causal=True)
    assert_matches(got, ref.varlen_attention(q, k, v, cu, 20, scale=0.7, causal=True))


def test_varlen_attention_rejects_bad_inputs(monkeypatch):
    q, k, v, cu = packed([4, 3])
    with pytest.raises(ValueError, match="same shape"):
        kernels.varlen_attention(q, k[:, :1], v, cu, 4)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        kernels.varlen_attention(q.long(), k.long(), v.long(), cu, 4)
    with pytest.raises(ValueError, match="int32"):
        kernels.varlen_attention(q, k, v, cu.long(), 4)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.varlen_attention(*(torch.zeros(7, 1, 300, device=DEVICE) for _ in range(3)), cu, 4)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            kernels.varlen_attention(q, k, v, cu, 4)


# ---------------------------------------------------------------- linear attention


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_linear_attention_fp32(feature_map, causal):
    q, k, v, cu = packed(LENGTHS, head_dim=16)
    projection = ref.favor_features(24, 16, seed=1).to(DEVICE) if feature_map == "favor" else None
    kwargs = dict(feature_map=feature_map, causal=causal, projection=projection)
    assert_matches(kernels.linear_attention(q, k, v, cu, **kwargs), ref.linear_attention(q, k, v, cu, **kwargs))


def test_linear_attention_favor_large_logits_stay_finite():
    # A long projection gives feature logits near 50: phi(q) . phi(k) would reach e^100,
    # past fp32's range, without the max subtracted from each side.
    q, k, v, cu = packed([40, 6], head_dim=16)
    projection = 4 * ref.favor_features(32, 16, seed=2).to(DEVICE)
    got = kernels.linear_attention(q, k, v, cu, feature_map="favor", causal=True, projection=projection)
    expected = ref.linear_attention(q, k, v, cu, feature_map="favor", causal=True, projection=projection)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_attention_half_head_dim_80(dtype):
    # Half inputs are read into fp32 before any dot, so bf16 runs in the interpreter too.
    q, k, v, cu = packed([19, 1, 4], head_dim=80, dtype=dtype)
    got = kernels.linear_attention(q, k, v, cu, causal=True)
    assert_matches(got, ref.linear_attention(q, k, v, cu, causal=True))


def test_linear_attention_rejects_bad_arguments():
    q, k, v, cu = packed([4])
    with pytest.raises(ValueError, match="feature_map"):
        kernels.linear_attention(q, k, v, cu, feature_map="relu")
    with pytest.raises(ValueError, match="projection"):
        kernels.linear_attention(q, k, v, cu, feature_map="favor")
    with pytest.raises(ValueError, match="shared memory"):
        kernels.linear_attention(q, k, v, cu, feature_map="favor", projection=torch.ones(1024, 16, device=DEVICE))


# ---------------------------------------------------------------- token-wise ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_skip_layernorm(dtype, with_bias):
    generator = torch.Generator().manual_seed(0)
    x, skip = (torch.randn(3, 5, 48, generator=generator).to(DEVICE, dtype) for _ in range(2))
    bias, weight, beta = (torch.randn(48, generator=generator).to(DEVICE, dtype) for _ in range(3))
    bias, beta = (bias, beta) if with_bias else (None, None)
    got = kernels.skip_layernorm(x, skip, bias, weight, beta, 1e-5)
    assert_matches(got, ref.skip_layernorm(x, skip, bias, weight, beta, 1e-5))


def test_skip_layernorm_rejects_mismatched_params():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        kernels.skip_layernorm(x, x, None, torch.ones(7, device=DEVICE), None, 1e-5)
    with pytest.raises(ValueError, match="skip"):
        kernels.skip_layernorm(x, x[:1], None, torch.ones(8, device=DEVICE), None, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu(dtype, approximate):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 300, generator=generator) * 4).to(DEVICE, dtype)  # 2100 elements: a partial last block
    bias = torch.randn(300, generator=generator).to(DEVICE, dtype)
    assert_matches(kernels.bias_gelu(x, bias, approximate), ref.bias_gelu(x, bias, approximate))
    assert_matches(kernels.bias_gelu(x, None, approximate), ref.bias_gelu(x, None, approximate))


def test_pack_unpack_are_the_reference_gather():
    # One implementation everywhere: see reference.pack for why it is not a Triton kernel.
    assert kernels.pack is ref.pack and kernels.unpack is ref.unpack


def test_packed_attention_equals_padded_attention():
    # The padding-free path end to end: pack, varlen kernel, unpack == masked dense attention.
    generator = torch.Generator().manual_seed(3)
    mask = torch.tensor([[0, 1, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool, device=DEVICE)
    x = torch.randn(3, 6, 2, 16, generator=generator).to(DEVICE)
    tokens, indices, cu, max_seqlen = kernels.pack(x, mask)
    out = kernels.unpack(kernels.varlen_attention(tokens, tokens, tokens, cu, max_seqlen), indices, 3, 6)

    bhsd = x.transpose(1, 2)
    dense = ref.attention(bhsd, bhsd, bhsd, scale=16**-0.5, key_padding_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, dense * mask[..., None, None], atol=1e-5, rtol=1e-5)
