"""Decoders in ONNX files: every attention site of the decoder zoo is fused (GroupQueryAttention for
grouped heads, a KV cache or soft-capped scores; MultiHeadAttention otherwise), the optimized file
computes what the original computes (outputs and present k/v at real positions, on a left-padded
prompt and on decode steps over caches of several lengths), and generates the same tokens."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

import attnfuse
from attnfuse.models import decoders
from attnfuse.models.decoders import DECODES, PREFILL, cases, families, generate, wrappers

TOLERANCE = 1e-4
# Every family, both exporters; one attention implementation each (sdpa where it exists) keeps the time down.
CASES = [case for case in decoders.AVAILABLE
         if case.attention == ("eager" if case.family == "gemma2" else "sdpa")]
CACHED = [case for case in CASES if case.cache == wrappers.PAST_MODE]


def case_id(case) -> str:
    return case.id


@functools.lru_cache(maxsize=None)
def optimized(case_id_: str) -> attnfuse.OptimizeResult:
    return attnfuse.optimize_onnx(str(decoders.exported(decoders.find(case_id_))))


def fused_attention_ops(proto: onnx.ModelProto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        if node.domain == "com.microsoft" and node.op_type in ("GroupQueryAttention", "MultiHeadAttention"):
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def softmax_count(path) -> int:
    return sum(node.op_type == "Softmax" for node in onnx.load(path, load_external_data=False).graph.node)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_site_is_fused(case):
    result = optimized(case.id)
    report = result.report
    sites = softmax_count(decoders.exported(case))
    assert report.attention_total == report.attention_fused == sites, [s.reason for s in report.sites if not s.fused]
    assert report.verify.ok, report.verify.message
    config = cases.config(case)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "decoder_attention_heads", None) \
        or config.num_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    self_attention = [s for s in report.sites if s.cache != "cross"]
    assert {(s.num_heads, s.kv_heads) for s in self_attention} == {(heads, kv_heads)}
    grouped = kv_heads < heads or case.cache == wrappers.PAST_MODE or case.family == "gemma2"
    ops = fused_attention_ops(result.proto)
    if grouped:  # self-attention: GroupQueryAttention; cross-attention reads the encoder's k/v in MultiHeadAttention
        assert ops.get("GroupQueryAttention") == len(self_attention), ops
    if case.cache == wrappers.PAST_MODE and families.FAMILIES[case.family].kind == families.CAUSAL:
        assert {s.cache for s in report.sites} == {"past"}
    if case.family == "gemma2":
        assert {s.softcap for s in report.sites} == {config.attn_logit_softcapping}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_equal_to_the_original_on_a_prompt_and_decode_steps(case):
    original = generate.session(decoders.exported(case))
    fused = generate.session(optimized(case.id).proto)
    names = [o.name for o in original.get_outputs()]
    steps = (PREFILL, *DECODES) if case.cache == wrappers.PAST_MODE else (PREFILL,)
    for step in steps:
        feeds = {name: value.numpy() for name, value in decoders.example(case, step, seed=3).items()}
        for name, want, got in zip(names, original.run(None, feeds), fused.run(None, feeds)):
            real = np.broadcast_to(decoders.real_positions(name, feeds, want), want.shape)
            error = float(np.abs(want - got)[real].max() / np.abs(want[real]).max())
            assert error <= TOLERANCE, (name, step, error)


@pytest.mark.parametrize("case", [c for c in CACHED if families.FAMILIES[c.family].kind == families.CAUSAL], ids=case_id)
def test_greedy_generation_is_the_same(case):
    prompt = generate.causal_prompt((7, 3, 5), seed=2)
    expected = generate.greedy_causal(decoders.exported(case), prompt)
    assert expected.shape == (3, generate.NEW_TOKENS) and len(np.unique(expected)) > 3  # a real generation
    np.testing.assert_array_equal(generate.greedy_causal(optimized(case.id).proto, prompt), expected)


@pytest.mark.parametrize("family", ["t5", "whisper"])
def test_seq2seq_greedy_generation_is_the_same(family):
    first = decoders.find(f"{family}-dynamo-sdpa-first")
    past = decoders.find(f"{family}-dynamo-sdpa-past")
    config = cases.config(first)
    encoder = generate.encoder_output((6, 4), config.d_model, seed=2, masked=family == "t5")
    start = config.decoder_start_token_id
    expected = generate.greedy_seq2seq(decoders.exported(first), decoders.exported(past), encoder, start)
    got = generate.greedy_seq2seq(optimized(first.id).proto, optimized(past.id).proto, encoder, start)
    np.testing.assert_array_equal(got, expected)


def test_inspect_lists_heads_cache_window_and_softcap(capsys):
    from attnfuse.tools.cli import main

    assert main(["inspect", str(decoders.exported(decoders.find("mistral-dynamo-sdpa-past")))]) == 0
    table = capsys.readouterr().out
    assert "kv heads" in table and "cache" in table and "window" in table and "softcap" in table
    row = next(line for line in table.splitlines() if "yes" in line.split()[-1:] or line.rstrip().endswith("yes"))
    assert " past " in f" {row} "
    report = attnfuse.inspect_onnx(str(decoders.exported(decoders.find("gemma2-dynamo-eager-past"))))
    assert all(site.softcap > 0 and site.kv_heads < site.num_heads for site in report.sites)
