"""The benchmark harness's pieces: FLOP count, length sampler, batches, and a quick run's checks. Never timings."""
from __future__ import annotations

import json

import numpy as np
import pytest

from attnfuse.tools import bench


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
    assert bench.main(["--model", "minilm", "--quick", "--json", str(out)]) == 0
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
