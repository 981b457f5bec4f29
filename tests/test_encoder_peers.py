"""The encoder runtime peers (attnfuse/tools/encoder_peers.py) and the bench's bookkeeping of precisions: which
peer is the fastest f32 one and the fastest of any precision, the faster of a peer's settings, a peer that is
not installed. Runs without the peers; the end-to-end checks skip where a peer is missing. Never timings."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnfuse.tools import bench, bench_command, encoder_peers

needs = {runtime: pytest.mark.skipif(not encoder_peers.installed(runtime), reason=f"{runtime}: {bench.NOT_INSTALLED}")
         for runtime in encoder_peers.RUNTIMES}


def record(name, ms, precision="f32", correct=True, peer=True, setting=None):
    return dict(contender=name, peer=peer, correct=correct, median_ms=ms, precision=precision, setting=setting)


# ---- bookkeeping --------------------------------------------------------------------------------

def test_speedups_against_the_fastest_f32_peer_and_the_fastest_of_any_precision():
    records = [record(bench.TORCH, 100.0), record("f32 peer", 50.0), record("bf16 peer", 20.0, "bf16"),
               record("int8 but wrong", 5.0, "int8", correct=False), record("mine", 25.0, peer=False)]
    bench.add_speedups(records)
    mine = records[-1]
    assert (mine["fastest_peer"], mine["vs_fastest_peer"]) == ("f32 peer", 2.0)
    assert (mine["fastest_peer_any_precision"], mine["vs_fastest_peer_any_precision"]) == ("bf16 peer", 0.8)
    assert mine["vs_torch"] == 4.0


def test_without_a_correct_peer_of_a_kind_there_is_no_ratio():
    records = [record(bench.TORCH, 100.0, correct=False), record("mine", 25.0, peer=False)]
    bench.add_speedups(records)
    assert records[1]["fastest_peer"] is None and records[1]["vs_fastest_peer"] is None


def test_each_precision_is_checked_at_its_own_tolerance():
    checked = bench.Checked(seconds={}, errors={"f32": 1e-2, "bf16": 1e-2, "bf16 far": 0.2, "int8": 0.05}, failures={})
    verdicts = {name: bench.contender_record(bench.Contender(name, precision=name.split()[0]), checked, 1, ())["correct"]
                for name in checked.errors}
    assert verdicts == {"f32": False, "bf16": True, "bf16 far": False, "int8": True}


def test_the_faster_correct_setting_is_kept_with_every_settings_time():
    records = [record("OpenVINO f32", 30.0, setting="LATENCY"), record("OpenVINO f32", 20.0, setting="THROUGHPUT"),
               record("OpenVINO bf16", 5.0, "bf16", correct=False, setting="LATENCY"),
               record("OpenVINO bf16", 9.0, "bf16", setting="THROUGHPUT"), record("CTranslate2 f32", 25.0)]
    kept = bench.keep_faster_setting(records)
    assert [(r["contender"], r["setting"]) for r in kept] == [
        ("OpenVINO f32", "THROUGHPUT"), ("OpenVINO bf16", "THROUGHPUT"), ("CTranslate2 f32", None)]
    assert kept[0]["setting_ms"] == {"LATENCY": 30.0, "THROUGHPUT": 20.0}
    assert "setting_ms" not in kept[2]


def test_the_summary_holds_attnfuse_to_each_peer_at_a_cosine_no_worse():
    """attnfuse's fastest f32 form against the fastest f32 peer; its fastest form of any precision against the
    fastest peer of any precision, only where its embeddings are at least as close to torch's as that peer's."""
    def timed(name, ms, precision="f32", cosine=1.0, peer=True):
        return dict(record(name, ms, precision, peer=peer), model="m", workload="varlen", padding=0.4, min_cosine=cosine)

    records = [timed(bench.TORCH, 100.0), timed("OpenVINO f32", 50.0), timed("OpenVINO bf16", 20.0, "bf16", 0.9999),
               timed("mine f32", 40.0, peer=False), timed("mine bf16, closer", 16.0, "bf16", 0.99995, peer=False),
               timed("mine bf16, farther", 10.0, "bf16", 0.999, peer=False)]
    bench.add_speedups(records)
    [row] = [line.split("  ") for line in bench.summary_table(records).splitlines()[2:]]
    cells = [cell.strip() for cell in row if cell.strip()]
    assert cells[3:7] == ["OpenVINO f32", "mine f32", "40.0", "1.25x"]
    assert cells[7:13] == ["OpenVINO bf16", "0.99990", "mine bf16, closer", "16.0", "1.25x", "0.99995"]


def test_a_setting_makes_a_key_of_its_own():
    assert bench.Contender("OpenVINO f32", setting="LATENCY").key == "OpenVINO f32 (LATENCY)"
    assert bench.Contender("ORT").key == "ORT"


def test_a_missing_runtime_is_listed_and_skipped(monkeypatch):
    monkeypatch.setattr(encoder_peers, "installed", lambda runtime: False)
    contenders = encoder_peers.peer_contenders(list(encoder_peers.RUNTIMES), torch.nn.Identity(), lambda _: None, {}, 2)
    assert [(c.name, c.run, c.error, c.peer) for c in contenders] == [
        ("OpenVINO", None, bench.NOT_INSTALLED, True), ("CTranslate2", None, bench.NOT_INSTALLED, True)]
    checked = bench.Checked({}, {}, {})
    records = [dict(model="m", workload="w", padding=0.0, batch=1, width=1,
                    **bench.contender_record(c, checked, 1, ())) for c in contenders]
    assert all(r["median_ms"] is None and not r["correct"] and r["precision"] is None for r in records)
    assert bench.NOT_INSTALLED in bench.format_table(records) and "FAILED" not in bench.format_table(records)
    assert bench.markdown_cell(records[0]) == "not installed"


def test_a_peer_that_fails_to_build_is_a_result(monkeypatch):
    monkeypatch.setattr(encoder_peers, "installed", lambda runtime: True)
    monkeypatch.setattr(encoder_peers, "ctranslate2_contenders", lambda *_: 1 / 0)
    [contender] = encoder_peers.peer_contenders(["ctranslate2"], torch.nn.Identity(), lambda _: None, {}, 2)
    assert (contender.name, contender.run, contender.error) == ("CTranslate2", None, "ZeroDivisionError: division by zero")


@pytest.mark.parametrize("text, runtimes", [("all", list(encoder_peers.RUNTIMES)), ("none", []),
                                            ("ctranslate2", ["ctranslate2"]), (" openvino, openvino ", ["openvino"])])
def test_peer_lists(text, runtimes):
    assert bench_command.peer_list(text) == runtimes


@pytest.mark.parametrize("argv", [["--model", "minilm", "--peers", "onnxruntime"], ["--model", "minilm", "--peers", ","],
                                  ["--model", "llama", "--peers", "openvino"]])
def test_bad_peer_options_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_command.main(argv)
    assert exit_.value.code != 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("attnfuse bench: error:")


def test_columns_keep_every_rows_order():
    rows = [["torch", "ORT", "OpenVINO f32", "attnfuse"], ["torch", "ORT", "OpenVINO", "attnfuse"]]
    assert bench.column_order(rows) == ["torch", "ORT", "OpenVINO", "OpenVINO f32", "attnfuse"]  # attnfuse stays last


@pytest.mark.parametrize("left", [False, True])
def test_unpadded_rows_go_back_to_their_real_positions(left):
    lengths = np.array([3, 1, 2])
    positions = np.arange(4)[None, :]
    real = positions >= 4 - lengths[:, None] if left else positions < lengths[:, None]
    packed = np.zeros((3, 3, 2))
    for row, length in enumerate(lengths):
        packed[row, :length] = np.arange(1, length + 1)[:, None] * (row + 1)
    out = encoder_peers.at_real_positions(packed, real)
    assert out.shape == (3, 4, 2)
    assert (out[~real] == 0).all()
    for row, length in enumerate(lengths):
        assert out[row][real[row]][:, 0].tolist() == [(row + 1) * i for i in range(1, length + 1)]


# ---- a tiny BERT, built here -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert():
    """A 2-layer BERT with random weights, wrapped as the bench's torch contenders are."""
    from transformers import BertConfig, BertModel

    from attnfuse.models import wrappers

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, attn_implementation="sdpa")
    return wrappers.TextModelWithTokenTypes(BertModel(config, add_pooling_layer=False)).eval()


def tiny_feeds(lengths=(5, 9, 2), seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(max(lengths))[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(5, 64, size=mask.shape) * mask, "attention_mask": mask,
            "token_type_ids": np.zeros_like(mask)}


def test_a_model_without_a_folder_is_saved_with_a_vocabulary(tiny_bert, tmp_path):
    folder = encoder_peers.transformers_folder(SimpleNamespace(), tiny_bert)(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["position_embedding_type"] == "absolute" and config["vocab_size"] == 64
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(folder).get_vocab()) == 64


def test_a_peer_runs_inside_sentence_transformers_encode(tiny_bert, tmp_path):
    """With torch itself as the runner, the peer's copy of a SentenceTransformer encodes as the original does,
    and the original keeps its own model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from attnfuse.models import wrappers

    folder = encoder_peers.transformers_folder(SimpleNamespace(), tiny_bert)(tmp_path)
    sentences = ["piece7 piece8", "piece9", "piece10 piece11 piece12 piece13", "piece14 piece15 piece16"]
    modules = [Transformer(str(folder), max_seq_length=16), Pooling(32, pooling_mode="mean"), Normalize()]
    model = SentenceTransformer(modules=modules, device="cpu").eval()
    want = model.encode(sentences, batch_size=3, show_progress_bar=False)
    calls = []

    def run(feeds):
        calls.append(feeds["attention_mask"].shape)
        return bench.torch_runner(wrappers.TextModelWithTokenTypes(model[0].auto_model).eval())(feeds)

    peer = encoder_peers.with_peer(model, run)
    np.testing.assert_allclose(peer.encode(sentences, batch_size=3, show_progress_bar=False), want, atol=1e-5)
    assert [shape[0] for shape in calls] == [3, 1]
    assert not isinstance(model[0].auto_model, encoder_peers.RunnerModel)


# ---- end to end, where a peer is installed -------------------------------------------------------

@pytest.mark.parametrize("runtime", [pytest.param(r, marks=needs[r]) for r in encoder_peers.RUNTIMES])
def test_peer_matches_torch_at_real_tokens(runtime, tiny_bert, tmp_path):
    feeds = tiny_feeds()
    contenders = encoder_peers.peer_contenders([runtime], tiny_bert, encoder_peers.transformers_folder(SimpleNamespace(), tiny_bert),
                                               tiny_feeds((3, 6), seed=1), threads=1)
    assert all(c.error is None for c in contenders), [c.error for c in contenders]
    assert {c.precision for c in contenders} >= {"f32"}
    expected = bench.torch_runner(tiny_bert)(feeds)
    real = [feeds["attention_mask"][:, :, None].astype(bool)]
    cosine = bench.sentence_cosine(feeds["attention_mask"])
    for c in contenders:
        outputs = c.run(feeds)
        assert bench.max_relative_error(outputs, expected, real) <= bench.TOLERANCES[c.precision], c.key
        assert cosine(outputs, expected) > 0.98, c.key
    if runtime == "openvino":
        assert {c.setting for c in contenders} == set(encoder_peers.OPENVINO_HINTS)
        assert len(contenders[0].run(tiny_feeds((1,)))[0]) == 1  # a batch of one row, fewer than the requests


@pytest.mark.skipif(not all(map(encoder_peers.installed, encoder_peers.RUNTIMES)), reason=bench.NOT_INSTALLED)
def test_quick_bench_with_the_peers_reports_their_precision(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_command.main(["--model", "minilm", "--quick", "--peers", "all", "--repeats", "1", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert set(saved["settings"]) >= {"openvino", "ctranslate2", "tolerances"}
    varlen = {r["contender"]: r for r in saved["results"] if r["workload"] == "varlen"}
    assert {"OpenVINO f32", "CTranslate2 f32", "CTranslate2 int8"} <= set(varlen)
    openvino_default = next(r for name, r in varlen.items() if name.startswith("OpenVINO default"))
    assert openvino_default["precision"] in ("f32", "bf16", "f16")
    assert set(openvino_default["setting_ms"]) == set(encoder_peers.OPENVINO_HINTS)
    for r in varlen.values():
        assert r["build_error"] is None and r["correct"], r
        assert r["min_cosine"] > 0.99 and r["precision"] in bench.TOLERANCES
    assert varlen["CTranslate2 int8"]["precision"] == "int8" and varlen["CTranslate2 int8"]["peer"]
    mine = varlen["attnfuse padding-free"]
    assert mine["fastest_peer"] and varlen[mine["fastest_peer"]]["precision"] == "f32"
    assert mine["fastest_peer_any_precision"] in varlen
    on_openvino = varlen[encoder_peers.attnfuse_on_openvino("f32")]  # attnfuse's file for OpenVINO, run there
    assert not on_openvino["peer"] and on_openvino["attention_fused"] == "6/6"
    assert set(on_openvino["setting_ms"]) == set(encoder_peers.OPENVINO_HINTS)


@needs["openvino"]
@pytest.mark.parametrize("per_precision", [False, True])
def test_an_openvino_contender_runs_the_model_built_for_its_precision(monkeypatch, per_precision):
    """One model built for the highest precision and run at each; or (per_precision: attnfuse's int8 file, whose
    weights take a form per precision) a model built for each precision, run at that one only. (Latency runners
    only: a throughput runner's request queue may not be freed by a test.)"""
    import onnx
    import openvino as ov

    from attnfuse.optimizer import openvino_run

    def latency_runners(model, threads, precisions):
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
        return [(p, p, "LATENCY", encoder_peers.openvino_latency_runner(compiled)) for p in precisions]
    monkeypatch.setattr(encoder_peers, "openvino_runners", latency_runners)

    def build(precision: str):
        built.append(precision)
        scale = {"f32": 2.0, "bf16": 3.0}[precision]  # what each model computes says which one ran
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Mul", ["x", "s"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["rows", 4])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["rows", 4])],
            [onnx.numpy_helper.from_array(np.full(4, scale, np.float32), "s")])
        return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), "1/1"

    built: list[str] = []
    precisions = ["f32", "bf16"] if openvino_run.has_bf16() else ["f32"]
    contenders = encoder_peers._on_openvino(lambda p: f"model ({p})", build, 2, "int8", per_precision=per_precision)
    assert built == (precisions if per_precision else precisions[-1:])
    assert sorted({c.name for c in contenders}) == sorted(f"model ({p})" for p in precisions)
    for contender in contenders:
        ran_for = contender.name[len("model ("):-1] if per_precision else precisions[-1]
        got = contender.run({"x": np.ones((2, 4), np.float32)})[0]
        np.testing.assert_allclose(got, {"f32": 2.0, "bf16": 3.0}[ran_for])
