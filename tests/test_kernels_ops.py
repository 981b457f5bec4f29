"""kernels/ops.py's CPU implementations checked against kernels/reference.py: packed attention on length buckets
(any mask, empty rows, causal, grouped-query heads, any grouping of the sequences) and padded attention."""
import pytest
import torch

from attnfuse.kernels import ops
from attnfuse.kernels import reference as ref

HEADS, HEAD_SIZE, SCALE = 4, 8, 0.3

MASKS = {
    "right padding": [[1] * 9 + [0] * 3, [1] * 2 + [0] * 10, [1] * 12, [1] * 7 + [0] * 5],
    "left padding": [[0] * 3 + [1] * 9, [0] * 10 + [1] * 2, [1] * 12, [0] * 5 + [1] * 7],
    "holes and an empty row": [[0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0], [0] * 12, [1] * 5 + [0] * 7, [1, 0] * 6],
    "all as long": [[1] * 12] * 4,
}


def packed_qkv(mask: torch.Tensor, kv_heads: int = HEADS, seed: int = 0):
    """q, k, v as the packed rows of `mask`'s real tokens ([1, tokens, heads * head_size]), and their indices."""
    generator = torch.Generator().manual_seed(seed)
    tokens = int(mask.sum())
    q = torch.randn(1, tokens, HEADS * HEAD_SIZE, generator=generator)
    k, v = (torch.randn(1, tokens, kv_heads * HEAD_SIZE, generator=generator) for _ in range(2))
    return q, k, v, ref.token_indices(mask)


def expected_packed(q, k, v, mask, causal: bool) -> torch.Tensor:
    """reference.varlen_attention on the same rows, k and v heads repeated to q's."""
    cu_seqlens, longest = ref.sequence_offsets(mask)
    heads = [x[0].unflatten(-1, (-1, HEAD_SIZE)) for x in (q, k, v)]
    heads[1:] = [ref.repeat_kv(x.transpose(0, 1)[None], HEADS)[0].transpose(0, 1) for x in heads[1:]]
    return ref.varlen_attention(*heads, cu_seqlens, longest, scale=SCALE, causal=causal).flatten(1)[None]


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [HEADS, 2])
def test_packed_attention_equals_the_reference(name, causal, kv_heads):
    mask = torch.tensor(MASKS[name], dtype=torch.bool)
    q, k, v, indices = packed_qkv(mask, kv_heads)
    out = ops.packed_attention_op(q, k, v, indices, mask, None, HEADS, SCALE, causal)
    torch.testing.assert_close(out, expected_packed(q, k, v, mask, causal), atol=1e-5, rtol=1e-5)


GROUPINGS = {
    "one call per sequence": lambda lengths: [[i] for i, n in enumerate(lengths) if n],
    "one call for all": lambda lengths: [[i for i, n in enumerate(lengths) if n]],
    "every pair": lambda lengths: [[i, j] for i, j in zip(*[iter(i for i, n in enumerate(lengths) if n)] * 2)],
    "no waste allowed": lambda lengths: ops.length_buckets(lengths, call_cost=0),
}


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_any_grouping_of_the_sequences_gives_the_same_attention(grouping):
    mask = torch.tensor(MASKS["right padding"], dtype=torch.bool)
    q, k, v, indices = packed_qkv(mask)
    out = ops._packed_attention(q, k, v, indices, mask, None, HEADS, SCALE, False, buckets=GROUPINGS[grouping])
    torch.testing.assert_close(out, expected_packed(q, k, v, mask, False), atol=1e-5, rtol=1e-5)


def test_packed_attention_with_a_bias_runs_on_the_padded_layout():
    mask = torch.tensor(MASKS["left padding"], dtype=torch.bool)
    q, k, v, indices = packed_qkv(mask)
    bias = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(1)).masked_fill(~mask[:, None, None, :], -1e9)
    out = ops.packed_attention_op(q, k, v, indices, mask, bias, HEADS, SCALE, False)
    padded = [ref.unpack(x[0], indices, 4, 12).unflatten(-1, (HEADS, HEAD_SIZE)).transpose(1, 2) for x in (q, k, v)]
    want = ref.attention(*padded, scale=SCALE, bias=bias).transpose(1, 2).flatten(2)
    torch.testing.assert_close(out[0], want.flatten(0, 1)[indices], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_padded_attention_equals_the_reference(causal):
    """SDPA's own causal mask where queries and keys are as many; ours, bottom-right aligned, with a cache."""
    generator = torch.Generator().manual_seed(2)
    for queries, keys in ((6, 6), (2, 6)):
        q = torch.randn(2, HEADS, queries, HEAD_SIZE, generator=generator)
        k, v = (torch.randn(2, 2, keys, HEAD_SIZE, generator=generator) for _ in range(2))
        out = ops.attention_op(q, k, v, None, None, HEADS, SCALE, causal)
        want = ref.attention(q, k, v, scale=SCALE, causal=causal).transpose(1, 2).flatten(2)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_buckets_cover_each_real_sequence_once_longest_first():
    lengths = [5, 0, 128, 120, 8, 64, 70, 9, 0, 127]
    buckets = ops.length_buckets(lengths)
    assert sorted(i for bucket in buckets for i in bucket) == [i for i, n in enumerate(lengths) if n]
    assert buckets[0][0] == 2 and all(lengths[b[0]] >= lengths[i] for b in buckets for i in b)
    for bucket in buckets:  # each bucket wastes no more query-key pairs on padding than a call costs
        assert sum(lengths[bucket[0]] ** 2 - lengths[i] ** 2 for i in bucket) <= ops.CALL_COST
    assert ops.length_buckets([0, 0]) == [] and ops.length_buckets([7, 7, 7], call_cost=0) == [[0, 1, 2]]
