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
CASES = decoders.TESTED  # every family and cache mode, both exporters, both attention implementations
CACHED = [case for case in CASES if case.cache == wrappers.PAST_MODE]


def case_id(case) -> str:
    return case.id


@functools.lru_cache(maxsize=None)
def optimized(case_id_: str) -> attnfuse.OptimizeResult:
    return attnfuse.optimize_onnx(str(decoders.exported(decoders.find(case_id_))))


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
    ops = report.fused_ops  # one path through the If of padding-free
    if grouped:  # self-attention: GroupQueryAttention; cross-attention reads the encoder's k/v in MultiHeadAttention
        assert ops.get("GroupQueryAttention") == len(self_attention), ops
    if case.cache == wrappers.PAST_MODE and families.FAMILIES[case.family].kind == families.CAUSAL:
        assert {s.cache for s in report.sites} == {"past"}
    if case.family == "gemma2":
        assert {s.softcap for s in report.sites} == {config.attn_logit_softcapping}


@pytest.mark.parametrize("case", [c for c in CACHED if families.FAMILIES[c.family].kind == families.CAUSAL][:4],
                         ids=case_id)
def test_a_file_with_a_cache_runs_padding_free_without_a_second_graph(case):
    """One graph: a second (unpadded) one would make ONNX Runtime pre-pack every weight twice."""
    fusions = {f.name: f for f in optimized(case.id).report.fusions}
    assert fusions["padding-free"].fused, fusions["padding-free"].reason
    assert not fusions["unpadded-branch"].fused and "KV cache" in fusions["unpadded-branch"].reason
    graph = optimized(case.id).proto.graph
    branches = [a.g for node in graph.node if node.op_type == "If" for a in node.attribute]  # attention's, if any
    assert not any(node.op_type == "MatMul" for branch in branches for node in branch.node)  # every weight once
    assert any(node.op_type == "NonZero" for node in graph.node)  # the real tokens are found: packed


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
    first = decoders.find(f"{family}-torchscript-eager-first")
    past = decoders.find(f"{family}-torchscript-eager-past")
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


@pytest.mark.parametrize("case", [c for c in CACHED if families.FAMILIES[c.family].kind == families.CAUSAL][:2],
                         ids=case_id)
def test_the_lm_head_takes_a_zero_row_only_where_a_new_token_is_padded(case):
    """The logits are made from the packed rows, and one zero row that padded positions read: a step whose new
    tokens are all real (a decode step) has none, and its LM head runs on the real tokens alone."""
    model = optimized(case.id).proto
    graph = model.graph
    made_by = {out: node for node in graph.node for out in node.output}
    heads = [node for node in graph.node if node.op_type == "MatMul" and node.name.startswith("padding-free/restore")
             and made_by.get(node.input[0]) is not None and made_by[node.input[0]].op_type == "Pad"]
    assert len(heads) == 1
    rows_in = heads[0].input[0]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(rows_in))
    session = generate.session(probe)
    for step in (PREFILL, *DECODES):
        feeds = {name: value.numpy() for name, value in decoders.example(case, step, seed=3).items()}
        new = feeds["attention_mask"][:, -step.new:]
        rows = session.run([rows_in], feeds)[0]
        assert rows.shape[-2] == int(new.sum()) + int(not new.all()), (step, rows.shape)
