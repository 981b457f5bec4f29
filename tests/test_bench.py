"""The benchmark harness's pieces: FLOP count, length sampler, batches, and a quick run's checks. Never timings."""
from __future__ import annotations

import json

import numpy as np
import pytest

from attnfuse.tools import bench, bench_command


def test_flops_by_hand():
    # h=2, i=4: projections and MLP 2*(4*4 + 2*2*4) = 64 per token, 3 tokens = 192;
    # attention 4*h*L per token: 4*2*1*1 + 4*2*2*2 = 40. Two layers: 2 * 232.
    geometry = bench.Geometry(layers=2, hidden=2, heads=1, intermediate=4)
    assert bench.real_token_flops(np.array([1, 2]), geometry) == 2 * 232


def test_flops_grow_quadratically_only_in_attention():
    geometry = bench.Geometry(layers=1, hidden=8, heads=2, intermediate=32)
    one_long = bench.real_token_flops(np.array([4]), geometry)
    two_short = bench.real_token_flops(np.array([2, 2]), geometry)
    assert one_long - two_short == 4 * 8 * (16 - 8)


@pytest.mark.parametrize("padding", [0.0, 0.2, 0.4, 0.6, 0.8])
@pytest.mark.parametrize("batch, max_length", [(32, 128), (16, 128), (5, 7)])
def test_lengths_hit_the_real_token_fraction(padding, batch, max_length):
    lengths = bench.lengths_for_padding(batch, max_length, padding, np.random.default_rng(3))
    assert lengths.min() >= 1 and lengths.max() <= max_length
    assert lengths.sum() == max(batch, round((1 - padding) * batch * max_length))
    if padding == 0.0:
        assert (lengths == max_length).all()
    elif max_length > 100:
        assert len(set(lengths.tolist())) > 1  # lengths vary, as real batches do


def test_with_lengths_cuts_real_tokens_only():
    base = {"input_ids": np.array([[5, 6, 7, 0], [8, 9, 0, 0]]), "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]])}
    feeds = bench.with_lengths(base, np.array([6, 1]), width=6)
    assert feeds["attention_mask"].sum(1).tolist() == [6, 1]
    assert feeds["input_ids"].tolist() == [[5, 6, 7, 8, 9, 5], [6, 0, 0, 0, 0, 0]]
    assert not feeds["token_type_ids"].any()


def test_quick_run_checks_every_contender_against_torch(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_command.main(["--model", "minilm", "--quick", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {r["workload"] for r in results} == {"varlen", "full"}
    assert {r["contender"] for r in results} == set(bench.CONTENDERS)
    for r in results:
        assert r["build_error"] is None, r
        assert r["correct"] and r["max_rel_error"] <= bench.TOLERANCE, r
    # every fused contender fused all of MiniLM's 6 attention sites; the plain export fused none
    fused = {r["contender"]: r["attention_fused"] for r in results}
    assert fused["ORT"] == "0/6" and all(fused[name] == "6/6" for name in bench.ONNX_CONTENDERS[1:])
    bench.plot(results, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_each_round_starts_one_contender_later():
    """Every contender runs at every place of a round: what ran before it moves its time."""
    from attnfuse.tools.timing import interleaved_medians

    order: list[str] = []
    runners = {name: (lambda name=name: order.append(name)) for name in "abc"}
    interleaved_medians(runners, repeats=3, warmup=0)
    assert order == list("abc" "bca" "cab")


# ---- the decoder benchmark (--model llama) -------------------------------------------------------

def test_decoder_flops_by_hand():
    # hidden 4, 2 q heads and 1 kv head of size 2, MLP 3, vocab 5, 1 layer. Per token:
    # 2*(2*4*4 [q, o] + 2*4*2 [k, v] + 3*4*3 [gate, up, down]) = 2*(32 + 16 + 36) = 168.
    # Row of 3 real tokens in a prefill of 4: its tokens see 1, 2, 3 keys; the padded row position is free.
    # Decode of 1 token over a past, row of 5 real: 1 token seeing 5 keys.
    from types import SimpleNamespace

    from attnfuse.models.decoders import Step
    from attnfuse.tools.bench_decoder import decoder_flops

    config = SimpleNamespace(hidden_size=4, num_attention_heads=2, num_key_value_heads=1, head_dim=2,
                             intermediate_size=3, vocab_size=5, num_hidden_layers=1)
    head = 2 * 4 * 5  # LM head per token
    assert decoder_flops(config, Step(new=4, lengths=(3,))) == 3 * 168 + 4 * 4 * (1 + 2 + 3) + 3 * head
    assert decoder_flops(config, Step(new=1, past=7, lengths=(5,))) == 168 + 4 * 4 * 5 + head
    two_layers = SimpleNamespace(**{**vars(config), "num_hidden_layers": 2})
    assert decoder_flops(two_layers, Step(new=1, past=7, lengths=(5,))) == 2 * (168 + 4 * 4 * 5) + head


def fake_contender(name, outputs):
    return bench.Contender(name, run=lambda feeds: outputs() if callable(outputs) else outputs)


def test_check_compares_every_output_at_real_positions_only():
    """A present k/v that differs at a padded position is right; one that differs at a real one is wrong,
    and a contender whose run fails is marked and not timed."""
    from attnfuse.models.decoders import real_positions

    feeds = {"attention_mask": np.array([[0, 1, 1], [1, 1, 1]])}
    names = ["logits", "present.0.key"]
    logits, key = np.ones((2, 1, 4), np.float32), np.ones((2, 2, 3, 5), np.float32)
    padded, real = key.copy(), key.copy()
    padded[0, :, 0] = 9.0  # row 0's first position is padding
    real[0, :, 1] = 9.0

    def broken():
        raise RuntimeError("bad shape")

    contenders = [fake_contender(bench.TORCH, [logits, key]), fake_contender("padded differs", [logits, padded]),
                  fake_contender("real differs", [logits, real]), fake_contender("fewer outputs", [logits]),
                  fake_contender("fails", broken)]
    checked = bench.check_and_time(contenders, feeds, lambda outs: [real_positions(n, feeds, o) for n, o in zip(names, outs)],
                                   repeats=1, desc="test")
    assert checked.errors["padded differs"] == 0.0
    assert checked.errors["real differs"] == pytest.approx(8.0 / 1.0)
    assert checked.errors["fewer outputs"] == np.inf
    assert checked.failures == {"fails": "run failed: RuntimeError: bad shape"}
    assert set(checked.seconds) == {bench.TORCH, "padded differs", "real differs", "fewer outputs"}
    records = [bench.contender_record(c, checked, flops=1, peers=(bench.TORCH, "real differs", "fails"))
               for c in contenders]
    assert [r["correct"] for r in records] == [True, True, False, False, False]
    assert records[-1]["median_ms"] is None and records[-1]["build_error"].startswith("run failed")


def test_a_wrong_peer_is_never_the_fastest():
    records = [dict(contender=name, peer=peer, correct=correct, median_ms=ms)
               for name, peer, correct, ms in ((bench.TORCH, True, True, 100.0), ("fast but wrong", True, False, 10.0),
                                               ("slow peer", True, True, 50.0), ("mine", False, True, 25.0),
                                               ("failed", True, False, None))]
    bench.add_speedups(records)
    assert {r["fastest_peer"] for r in records} == {"slow peer"}
    assert [r["vs_fastest_peer"] for r in records] == [0.5, 5.0, 1.0, 2.0, None]


def test_quick_llama_run_checks_prefill_decode_and_generation(tmp_path, capsys):
    from attnfuse.tools import bench_decoder

    out = tmp_path / "llama.json"
    # Peak memory (a fresh process per contender) has its own test below.
    assert bench_command.main(["--model", "llama", "--quick", "--no-memory", "--json", str(out),
                       "--plot", str(tmp_path / "llama.png")]) == 0
    saved = json.loads(out.read_text())
    results = saved["results"]
    assert saved["settings"]["warmups"] == 4
    loads = ("prefill", "decode", f"generate {bench_decoder.NEW_TOKENS[True]}")
    assert [(r["workload"], r["contender"]) for r in results] == [(w, c) for w in loads for c in bench_decoder.CONTENDERS]
    for r in results:
        assert r["peer"] == (r["contender"] != "attnfuse")
        assert r["target"] == bench_decoder.TARGETS.get(r["workload"])
        if r["contender"] in bench_decoder.RUNTIME_PEERS:
            continue  # installed here or not: their bookkeeping is tests/test_decoder_peers.py's
        if (r["build_error"] or "").startswith("SameGraph: the graph of ORT optimizer"):
            continue  # ORT's optimizer wrote one graph for two model types: run once
        assert r["build_error"] is None, r
        assert r["correct"] and r["max_rel_error"] <= bench.TOLERANCE, r
        assert r["peak_mb"] is None
        assert not r["workload"].startswith("generate") or r["token_mismatch"] is None
    decode = next(r for r in results if r["workload"] == "decode")
    assert (decode["batch"], decode["width"], decode["past"], decode["real_tokens"]) == (2, 1, 16, 2)
    prefill = next(r for r in results if r["workload"] == "prefill")
    assert prefill["padding"] > 0 and prefill["real_tokens"] < prefill["batch"] * prefill["width"]
    fused = {r["contender"]: r["attention_fused"] for r in results}
    assert fused["ORT"] == "0/2" and fused["attnfuse"] == "2/2"  # the tiny Llama has 2 layers
    markdown = capsys.readouterr().out.split("| model | workload |", 1)[1].splitlines()
    assert len(markdown) == 1 + 1 + 3  # the rest of the header, the rule, a row per workload
    assert "(target 1.5x)" in markdown[2] and "(target 1.1x)" in markdown[3]
    assert (tmp_path / "llama.png").stat().st_size > 1000


@pytest.mark.parametrize("argv", [["--model", "minilm", "--vocab", "1000"], ["--model", "llama", "--sweep"],
                                  ["--model", "llama", "--quick", "--vocab", "1000"], ["--model", "llama", "--vocab", "2"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_command.main(argv)
    assert exit_.value.code != 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("attnfuse bench: error:")


def test_peak_memory_counts_what_the_child_allocates():
    from attnfuse.tools.memory import peak_memory_mb

    small = peak_memory_mb("")
    assert peak_memory_mb("block = bytearray(200 * 2**20); block[::4096] = b'x' * len(block[::4096])") > small + 150
    with pytest.raises(RuntimeError, match="ValueError: no model"):
        peak_memory_mb("raise ValueError('no model')")


# --- int8 and int4 rows ------------------------------------------------------------------------------

def test_int8_contenders_are_built_as_their_users_build_them_and_checked_by_cosine():
    """The int8 rows of `attnfuse bench` (quick MiniLM, the varlen workload): every contender built, checked
    against torch's fp32 at the int8 tolerance, and its sentence cosine measured."""
    from attnfuse.tools import bench_int8

    spec = bench.model_specs("minilm", quick=True)[0]
    module = spec.torch_model()
    geometry = bench.Geometry.of(module)
    builders = bench_int8.cached(bench.onnx_builders(spec, geometry))
    export = lambda: str(spec.exported(dynamo=True, attention="sdpa"))  # noqa: E731
    contenders = [bench.Contender(bench.TORCH, bench.torch_runner(module)),
                  *bench_int8.int8_contenders(builders, export, 2, lambda _: None, spec.name)]
    records = bench.measure(spec, geometry, bench.workloads(spec, sweep=False)[0], contenders, repeats=1)
    int8 = [r for r in records if bench_int8.is_int8_row(r)]
    assert {r["contender"] for r in int8} == set(bench_int8.ORT_NAMES)
    for r in int8:
        assert r["build_error"] is None and r["precision"] == "int8" and 0.9 < r["min_cosine"] <= 1.0, r
        assert r["peer"] == (r["contender"] in bench_int8.PEER_BASES)
        assert set(r.get("setting_ms") or {}) == (set(bench_int8.SETTINGS) if r["peer"] else set())
    (mine,) = [r for r in int8 if r["contender"] == bench_int8.ATTNFUSE]
    assert mine["attention_fused"] == "6/6" and mine["correct"]
    (row,) = bench_int8.summary_rows(records)
    assert row["fastest"] is not None and row["cosine"] == mine["min_cosine"]


def test_the_int8_summary_counts_a_peer_with_a_better_cosine_apart():
    from attnfuse.tools import bench_int8

    def record(name, ms, cosine, peer=True, correct=True):
        return dict(model="m", workload="varlen", padding=0.4, contender=name, median_ms=ms, min_cosine=cosine,
                    peer=peer, correct=correct, precision="int8")

    records = [record("precise peer", 100.0, 0.995), record("rough peer", 150.0, 0.98), record("wrong", 10.0, 0.5,
               correct=False), record(bench_int8.ATTNFUSE, 50.0, 0.99, peer=False)]
    (row,) = bench_int8.summary_rows(records)
    assert row["fastest"]["contender"] == "precise peer" and row["fastest"]["speedup"] == 2.0
    assert not row["fastest"]["cosine_no_worse"]
    assert row["fastest_matched"]["contender"] == "rough peer" and row["fastest_matched"]["speedup"] == 3.0
    assert "(its cosine is better); 3.00x vs rough peer" in bench_int8.markdown_table(records)


def test_quick_int4_decode_row_checks_attnfuse_against_the_int4_export():
    from attnfuse.tools import bench_decoder, bench_int4

    model = bench_decoder.decoder_bench(quick=True)
    loads = bench_decoder.decoder_workloads(model)
    module = model.torch_model()
    torch_contender = bench.Contender(bench.TORCH, bench.torch_runner(module, positional=True))
    built = bench_decoder.BuiltContenders([torch_contender], [], {}, module)
    records = bench_decoder.int4_row(model, built, loads, threads=2, repeats=2, step=lambda _: None)
    by = {r["contender"]: r for r in records}
    assert list(by) == list(bench_int4.CONTENDERS) and {r["workload"] for r in records} == {bench_int4.WORKLOAD}
    mine, export = by[bench_int4.ATTNFUSE], by[bench_int4.ORT]
    assert mine["vs_int4_export"] <= bench.TOLERANCE and mine["correct"] and mine["attention_fused"] == "2/2"
    assert export["peer"] and export["precision"] == "int4" and export["max_rel_error"] <= bench.INT4_TOLERANCE
    assert bench_int4.WORKLOAD in bench_int4.markdown_table(records)
