"""Graphs from other producers (tests/foreign_graphs.py), fp16 conversions of the zoo, and
re-optimized files: every attention site fused, the output equal to the original on padded
batches made here (not by attnfuse), the right exit code, and a report on every exit code."""
from __future__ import annotations

import collections
import functools
import json
import re
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from foreign_graphs import (
    FOREIGN_GRAPHS,
    UNDEFINED_TENSOR,
    Batch,
    ForeignGraph,
    reads_undefined_tensor,
    real_part,
    real_tokens,
)
from spellings import TOLERANCE, to_float16
from test_cli import one_error_line
from test_io import toy_attention_model
from test_verify import _fake_passes

import attnfuse
from attnfuse.models import zoo
from attnfuse.models.decoders import cases as decoder_cases
from attnfuse.optimizer import api
from attnfuse.tools.cli import main

GRAPHS = list(FOREIGN_GRAPHS)


@functools.cache
def foreign(name: str) -> ForeignGraph:
    return FOREIGN_GRAPHS[name]()


@functools.cache
def optimized(name: str) -> attnfuse.OptimizeResult:
    return attnfuse.optimize_onnx(foreign(name).model)


def run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # float16 graphs warn of every constant ORT cannot fold
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def assert_same_outputs(expected: dict, got: dict, batch: Batch, tolerance: float, caches: dict | None = None):
    """Every output within `tolerance` of its largest magnitude, at the positions that count
    (`caches`: the axes of the cache outputs)."""
    assert set(got) == set(expected), f"{batch.case}: outputs {sorted(got)} instead of {sorted(expected)}"
    for name, reference in expected.items():
        assert np.shape(got[name]) == np.shape(reference), f"{batch.case}: {name} {np.shape(got[name])}"
        axes = (caches or {}).get(name)
        ref, out = real_part(reference, batch, axes), real_part(got[name], batch, axes)
        error = float(np.abs(ref - out).max()) / max(float(np.abs(ref).max()), 1e-30)
        assert error <= tolerance, f"{batch.case}: {name} off by {error:.3g} (relative), allowed {tolerance:g}"


def all_nodes(graph: onnx.GraphProto):
    """Every node, those of If branches and Loop bodies included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from all_nodes(sub)


def ops(model: onnx.ModelProto) -> collections.Counter:
    """(domain, op type) of every node, subgraphs included."""
    return collections.Counter((node.domain or "", node.op_type) for node in all_nodes(model.graph))


def microsoft_ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter({op: n for (domain, op), n in ops(model).items() if domain == "com.microsoft"})


def verified_cases(report) -> list[str]:
    return [entry["case"] for entry in report.verify.to_dict()["inputs"]]


def unfused(report) -> list[str]:
    return [f"{site.name}: {site.reason}" for site in report.sites if not site.fused]


def optimize_command(tmp_path, model_file: str, *options: str) -> int:
    """`attnfuse optimize` on tmp_path/model_file, writing out.onnx and r.json there: its exit code."""
    output, report = str(tmp_path / "out.onnx"), str(tmp_path / "r.json")
    return main(["optimize", str(tmp_path / model_file), "-o", output, "--report", report, *options])


def written_report(tmp_path) -> dict:
    return json.loads((tmp_path / "r.json").read_text())


# ------------------------------------------------------------------ the builders


@pytest.mark.parametrize("name", GRAPHS)
def test_builder_runs_in_onnxruntime_and_matches_numpy(name):
    """Each graph is what it claims: valid (ONNX's checker, where ONNX defines its ops),
    run by ONNX Runtime, equal to the numpy maths on every batch the tests below use."""
    graph = foreign(name)
    if graph.onnx_valid:
        onnx.checker.check_model(graph.model, full_check=True)
    for batch in graph.batches:
        assert_same_outputs(graph.reference(batch.feeds), run(graph.model, batch.feeds), batch, 1e-5, graph.caches)
    # The batches really have padding wherever the graph takes a mask.
    masks = [i.name for i in graph.model.graph.input if "mask" in i.name]
    assert all(any((batch.feeds[m] == 0).any() for batch in graph.batches) for m in masks)


def test_opset16_layernorm_is_rejected_by_onnx_but_run_by_onnxruntime():
    """The class the issue names: LayerNormalization at opset 16 is not ONNX, yet ORT runs it."""
    graph = foreign("opset16_layernorm")
    assert not graph.onnx_valid
    with pytest.raises(onnx.checker.ValidationError, match="LayerNormalization"):
        onnx.checker.check_model(graph.model, full_check=True)


# ------------------------------------------------------------ fused and equal


@pytest.mark.parametrize("name", GRAPHS)
def test_every_attention_site_is_fused(name):
    report = optimized(name).report
    assert report.attention_total == foreign(name).sites, [s.summary() for s in report.sites]
    assert report.attention_fused == report.attention_total, unfused(report)
    assert report.to_dict()["status"] == "ok" and report.to_dict()["error"] is None


@pytest.mark.parametrize("name", GRAPHS)
def test_output_equals_the_original_on_padded_batches(name):
    graph, result = foreign(name), optimized(name)
    for batch in graph.batches:
        expected = run(graph.model, batch.feeds)
        assert_same_outputs(expected, run(result.proto, batch.feeds), batch, TOLERANCE["float32"], graph.caches)


def has_input(graph: ForeignGraph, word: str) -> bool:
    return any(word in i.name for i in graph.model.graph.input)


@pytest.mark.parametrize("name", GRAPHS)
def test_verification_covers_padding_caches_and_branches(name):
    """The report lists what was checked: padded rows wherever there is a mask (fixed shapes
    too), caches empty and not, both branches of an If."""
    graph, report = foreign(name), optimized(name).report
    cases = verified_cases(report)
    assert report.verify.ok and report.verify.tolerance == TOLERANCE["float32"]
    if has_input(graph, "mask"):
        assert any("right padding" in c for c in cases) and any("left padding" in c for c in cases), cases
    if has_input(graph, "past"):
        assert any("past 0" in c for c in cases), cases
        assert any(re.search(r"past [1-9]", c) for c in cases), cases
    if ops(graph.model)[("", "If")]:
        assert any("branch then" in c for c in cases) and any("branch else" in c for c in cases), cases


def test_a_first_token_reader_runs_padding_free_and_left_padding_takes_the_fused_graph():
    """The pooler reads position 0, padding under left padding: such a batch runs the fused graph
    (masks kept), a right-padded one the padding-free graph; both equal the original (above)."""
    fusions = {f.name: f for f in optimized("first_token_pooler").report.fusions}
    assert fusions["padding-free"].fused, fusions["padding-free"].reason
    assert fusions["unpadded-branch"].fused, fusions["unpadded-branch"].reason


@pytest.mark.parametrize("name", GRAPHS)
def test_command_line_exits_0_and_reports(name, tmp_path, capsys):
    graph = foreign(name)
    onnx.save(graph.model, tmp_path / "in.onnx")
    assert optimize_command(tmp_path, "in.onnx") == 0, capsys.readouterr().err
    report = written_report(tmp_path)
    assert report["attention"]["fused"] == report["attention"]["total"] == graph.sites
    batch = graph.batches[-1]
    written = run(str(tmp_path / "out.onnx"), batch.feeds)
    assert_same_outputs(run(graph.model, batch.feeds), written, batch, TOLERANCE["float32"], graph.caches)
    assert (report["status"], report["error"]) == ("ok", None)


# ---------------------------------------------------------------- image sizes


def test_input_shape_given_in_python():
    graph = foreign("vit_224")
    result = attnfuse.optimize_onnx(graph.model, input_shapes={"pixel_values": [1, 3, 224, 224]})
    assert result.report.attention_fused == result.report.attention_total == 1, unfused(result.report)
    batch = graph.batches[0]
    assert_same_outputs(run(graph.model, batch.feeds), run(result.proto, batch.feeds), batch, TOLERANCE["float32"])


def test_input_shape_given_on_the_command_line(tmp_path, capsys):
    onnx.save(foreign("vit_224").model, tmp_path / "vit.onnx")
    code = optimize_command(tmp_path, "vit.onnx", "--input-shape", "pixel_values=2,3,224,224")
    assert code == 0, capsys.readouterr().err
    assert "attention fused: 1/1" in capsys.readouterr().out


def test_an_input_shape_the_model_cannot_take_is_a_user_error(tmp_path, capsys):
    """32 x 32 images do not fit 197 position embeddings: exit 1, one line naming the input;
    the report says so too."""
    onnx.save(foreign("vit_224").model, tmp_path / "vit.onnx")
    assert optimize_command(tmp_path, "vit.onnx", "--input-shape", "pixel_values=1,3,32,32") == 1
    assert "pixel_values" in one_error_line(capsys.readouterr().err)
    report = written_report(tmp_path)
    assert report["status"] == "user_error" and "pixel_values" in report["error"]
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("spec", ["pixel_values", "pixel_values=1,x,224,224", "no_such_input=1,3,224,224"])
def test_a_malformed_input_shape_is_a_user_error(tmp_path, capsys, spec):
    onnx.save(foreign("vit_224").model, tmp_path / "vit.onnx")
    assert optimize_command(tmp_path, "vit.onnx", "--input-shape", spec) == 1
    line = one_error_line(capsys.readouterr().err)
    # the option exists (argparse does not refuse it) and the error names what is wrong
    assert spec.split("=")[0] in line and "unrecognized arguments" not in line


# -------------------------------------------------------------- errors, reports


def test_a_graph_reading_an_undefined_tensor_exits_1_naming_it(tmp_path, capsys):
    onnx.save(reads_undefined_tensor(), tmp_path / "broken.onnx")
    assert optimize_command(tmp_path, "broken.onnx") == 1
    assert UNDEFINED_TENSOR in one_error_line(capsys.readouterr().err)
    report = written_report(tmp_path)
    assert report["status"] == "user_error" and UNDEFINED_TENSOR in report["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx", "r.json"]


def _not_a_model(tmp_path, monkeypatch):
    (tmp_path / "in.onnx").write_text("not a model at all\n")
    return 1, "user_error", "not an ONNX model"


def _wrong_rewrite(tmp_path, monkeypatch):
    onnx.save(toy_attention_model(), tmp_path / "in.onnx")
    monkeypatch.setattr(api, "run_passes", _fake_passes("bad", wrong_when_excluded=True))
    return 2, "verification_failed", "verification failed"


def _internal_error(tmp_path, monkeypatch):
    onnx.save(toy_attention_model(), tmp_path / "in.onnx")

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(api, "run_passes", broken)
    monkeypatch.delenv("ATTNFUSE_DEBUG", raising=False)
    return 3, "internal_error", "KeyError"


FAILURES = [_not_a_model, _wrong_rewrite, _internal_error]


@pytest.mark.parametrize("failure", FAILURES, ids=lambda f: f.__name__.strip("_"))
def test_the_report_is_written_on_every_exit_code(tmp_path, monkeypatch, capsys, failure):
    code, status, message = failure(tmp_path, monkeypatch)
    assert optimize_command(tmp_path, "in.onnx") == code
    line = one_error_line(capsys.readouterr().err)
    report = written_report(tmp_path)
    assert report["model"] == str(tmp_path / "in.onnx")
    assert report["status"] == status and message in report["error"] and message in line
    if code == 2:
        assert report["verify"]["ok"] is False
    assert not (tmp_path / "out.onnx").exists()


# ------------------------------------------------------------------ re-optimizing


def zoo_batch(case: zoo.ZooCase, side: str = "right", dtype=np.float32) -> Batch:
    """4 rows of 11, 6, 1 and 9 tokens, right or left padded (padded positions hold the pad
    id), or 4 images; float inputs in `dtype`."""
    inputs = zoo.example_inputs(case.family, batch=4, seqlen=11, seed=7, lengths=[11, 6, 1, 9])
    feeds = {name: t.numpy().astype(dtype) if t.is_floating_point() else t.numpy() for name, t in inputs.items()}
    if case.kind == "vision":
        return Batch("no padding", feeds, None)
    if side == "left":
        feeds = {name: value[:, ::-1].copy() for name, value in feeds.items()}
    return Batch(f"{side} padding", feeds, real_tokens([11, 6, 1, 9], 11, side))


def zoo_source(case: zoo.ZooCase) -> tuple[onnx.ModelProto, list[Batch], dict]:
    """The model, batches to compare on, and its caches' axes (none)."""
    return onnx.load(zoo.exported(case)), [zoo_batch(case, side) for side in ("right", "left")], {}


def foreign_source(name: str) -> tuple[onnx.ModelProto, list[Batch], dict]:
    graph = foreign(name)
    return graph.model, graph.batches, graph.caches


REOPTIMIZED = {
    "zoo bert-dynamo-sdpa": functools.partial(zoo_source, zoo.ZooCase("bert", "dynamo", "sdpa")),
    "optimum_merged_decoder": functools.partial(foreign_source, "optimum_merged_decoder"),
    "bert_attention": functools.partial(foreign_source, "bert_attention"),
}


@pytest.mark.parametrize("source", list(REOPTIMIZED))
def test_optimizing_attnfuse_output_changes_nothing(source, tmp_path, capsys):
    original, batches, caches = REOPTIMIZED[source]()
    first = attnfuse.optimize_onnx(original)
    second = attnfuse.optimize_onnx(first.proto)
    assert ops(second.proto) == ops(first.proto)
    assert second.report.fused_ops == first.report.fused_ops
    for batch in batches:
        expected = run(original, batch.feeds)
        assert_same_outputs(expected, run(second.proto, batch.feeds), batch, TOLERANCE["float32"], caches)
    assert second.report.to_dict()["status"] == "ok"
    # and through the command line, which had failed to load attnfuse's own output
    first.save(tmp_path / "once.onnx")
    assert optimize_command(tmp_path, "once.onnx") == 0, capsys.readouterr().err
    assert ops(onnx.load(tmp_path / "out.onnx")) == ops(first.proto)


def ort_optimized(model: onnx.ModelProto, tmp_path, num_heads: int, hidden_size: int) -> onnx.ModelProto:
    """ONNX Runtime's transformers optimizer run on `model`, as its users run it."""
    from onnxruntime.transformers.optimizer import optimize_model

    onnx.save(model, tmp_path / "for_ort.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optimize_model(str(tmp_path / "for_ort.onnx"), model_type="bert", num_heads=num_heads,
                              hidden_size=hidden_size).model


# source: (model and batches, num_heads, hidden_size, attention sites ORT leaves unfused).
# ORT fuses the BERT layer's attention; it leaves the SDPA export's and the Einsum graph's,
# fusing only their layernorms and gelus.
ORT_OUTPUTS = {
    "bert_attention": (functools.partial(foreign_source, "bert_attention"), 4, 16, 0),
    "tf2onnx_einsum": (functools.partial(foreign_source, "tf2onnx_einsum"), 4, 16, 1),
    "zoo bert-torchscript-sdpa": (functools.partial(zoo_source, zoo.ZooCase("bert", "torchscript", "sdpa")), 4, 64, 2),
}


@pytest.mark.parametrize("source", list(ORT_OUTPUTS))
def test_optimizing_onnxruntime_optimizer_output_keeps_its_ops_and_fuses_the_rest(source, tmp_path):
    make, heads, hidden, left = ORT_OUTPUTS[source]
    model, batches, caches = make()
    by_ort = ort_optimized(model, tmp_path, heads, hidden)
    kept = microsoft_ops(by_ort)
    assert kept  # ORT fused something, or this test proves nothing

    result = attnfuse.optimize_onnx(by_ort)
    report = result.report
    assert report.attention_total == report.attention_fused, unfused(report)
    kept_attention = [site for site in report.sites if site.already_fused]
    assert len(kept_attention) == report.attention_total - left  # ORT's fused attention, counted, not redone
    fused = microsoft_ops(result.proto)
    assert all(fused[op] >= n for op, n in kept.items()), (kept, fused)
    assert all(report.fused_ops.get(op, 0) >= n for op, n in kept.items()), (kept, report.fused_ops)
    assert not ops(result.proto)[("", "Softmax")]
    for batch in batches:
        expected = run(by_ort, batch.feeds)
        assert_same_outputs(expected, run(result.proto, batch.feeds), batch, TOLERANCE["float32"], caches)
    assert report.to_dict()["status"] == "ok"


# ------------------------------------------------------------------------ float16


def test_the_default_tolerance_follows_the_dtype():
    assert attnfuse.OptimizeConfig().tolerance is None
    assert optimized("bert_attention").report.verify.tolerance == TOLERANCE["float32"]


FLOAT16_CASES = [zoo.ZooCase(family, exporter, "eager") for family in zoo.FAMILIES for exporter in zoo.EXPORTERS]


def casts_to_float32(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "Cast" and onnx.helper.get_node_attr_value(node, "to") == onnx.TensorProto.FLOAT
               for node in all_nodes(model.graph))


@pytest.mark.parametrize("case", FLOAT16_CASES, ids=lambda case: case.id)
def test_float16_conversions_of_the_zoo_are_fused_and_equal(case):
    """Each family converted by ONNX Runtime's convert_float_to_float16, as users convert:
    verified against a float16 tolerance, fused ops in float16, equal within that tolerance."""
    model = to_float16(onnx.load(zoo.exported(case)))
    sites = ops(model)[("", "Softmax")]
    result = attnfuse.optimize_onnx(model)
    report = result.report
    assert report.attention_total == report.attention_fused == sites, unfused(report)
    # Fused ops keep the model's dtype: nothing new is cast up to float32 around them.
    assert casts_to_float32(result.proto) <= casts_to_float32(model)
    for side in ("right", "left") if case.kind != "vision" else ("right",):
        batch = zoo_batch(case, side, np.float16)
        got = run(result.proto, batch.feeds)
        assert got["last_hidden_state"].dtype == np.float16
        assert_same_outputs(run(model, batch.feeds), got, batch, TOLERANCE["float16"])
    assert TOLERANCE["float32"] < report.verify.tolerance <= TOLERANCE["float16"]
    assert report.to_dict()["status"] == "ok"


@pytest.mark.parametrize("exported", [lambda: zoo.exported(zoo.ZooCase("bert", "dynamo", "eager")),
                                      lambda: decoder_cases.exported(decoder_cases.find("llama-dynamo-sdpa-past"))],
                         ids=["bert", "llama-with-cache"])
def test_a_float16_model_with_float32_inputs_and_outputs_is_verified_at_float16s_tolerance(exported):
    """keep_io_types: float32 in and out, float16 inside: the model computes in float16, and is judged so. The
    converter appends its casts of the inputs after the nodes that read them: attnfuse reads the graph in order."""
    model = to_float16(onnx.load(exported()), keep_io_types=True)
    report = attnfuse.optimize_onnx(model).report
    assert report.attention_fused == report.attention_total == 2
    assert report.verify.ok and TOLERANCE["float32"] < report.verify.tolerance <= TOLERANCE["float16"]


def test_onnx_attention_of_opset_23_runs_as_onnx_runtimes_attention(tmp_path):
    """torch.onnx at opset 23 writes scaled_dot_product_attention as ONNX's own Attention: matched like any
    attention and written as MultiHeadAttention (ONNX Runtime's is faster), run padding-free, verified."""
    from attnfuse.models._export import export_onnx

    path = export_onnx(zoo.build_torch("bert", "sdpa"), zoo.example_inputs("bert"), tmp_path / "bert23.onnx",
                       dynamo=True, dynamic_dims=zoo.dynamic_dims("bert"), opset=23)
    assert ops(onnx.load(path))[("", "Attention")] == 2
    result = attnfuse.optimize_onnx(str(path))
    report = result.report
    assert report.attention_fused == report.attention_total == 2 and not any(s.already_fused for s in report.sites)
    assert report.fused_ops["MultiHeadAttention"] == 2 and ops(result.proto)[("", "Attention")] == 0
    assert report.verify.ok and report.verify.max_rel_error <= 1e-4


class CausalSelfAttention(torch.nn.Module):
    """q, k, v projections and scaled_dot_product_attention(is_causal=True), as a hand-written decoder block has it."""

    def __init__(self, hidden: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(3))
        self.out = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        batch, seq, hidden = x.shape
        q, k, v = (p(x).view(batch, seq, self.heads, -1).transpose(1, 2) for p in self.qkv)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(batch, seq, hidden))


def test_a_causal_onnx_attention_keeps_its_triangle(tmp_path):
    from attnfuse.models._export import export_onnx

    torch.manual_seed(0)
    path = export_onnx(CausalSelfAttention().eval(), {"x": torch.randn(2, 5, 16)}, tmp_path / "causal.onnx",
                       dynamo=True, dynamic_dims={"x": {0: "batch", 1: "sequence"}}, output_names=("y",), opset=23)
    (attention,) = [node for node in onnx.load(path).graph.node if node.op_type == "Attention"]
    assert onnx.helper.get_node_attr_value(attention, "is_causal") == 1
    result = attnfuse.optimize_onnx(str(path))
    assert result.report.attention_fused == 1 and result.report.verify.ok
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 7, 16)).astype(np.float32)}
    expected, got = run(str(path), feeds)["y"], run(result.proto, feeds)["y"]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_decoder_of_opset_23_fuses_its_norms_and_rotaries_as_at_opset_18(tmp_path):
    """torch.onnx at opset 23 writes RMSNormalization and RotaryEmbedding: written out as ONNX defines them
    (passes/onnx/functions.py), the norms fuse with the residual sums before them and the rotaries into ONNX
    Runtime's RotaryEmbedding, as any export's do."""
    from attnfuse.models.decoders import cases

    case = cases.find("llama-dynamo-sdpa-past")
    path = cases.export(case, tmp_path / "llama23.onnx", opset=23)
    came_with = ops(onnx.load(path))
    assert came_with[("", "RMSNormalization")] == 5 and came_with[("", "RotaryEmbedding")] == 4
    report = attnfuse.optimize_onnx(str(path)).report
    assert report.attention_fused == report.attention_total == 2
    assert report.fused_ops == attnfuse.optimize_onnx(str(cases.exported(case))).report.fused_ops
    assert report.fused_ops["SkipSimplifiedLayerNormalization"] == 4 and report.fused_ops["RotaryEmbedding"] == 4
    assert report.verify.ok and report.verify.max_rel_error <= 1e-4


def test_an_onnx_attention_on_three_dimensional_q_k_v_is_fused_like_the_four_dimensional_one():
    """Attention-23 with q_num_heads and kv_num_heads on [B, S, heads * size] q, k and v (grouped: 4 query heads,
    2 kv heads): split into heads first (passes/onnx/functions.py), matched as SDPA, written as ONNX Runtime's op."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
               for name, shape in (("wq", (16, 16)), ("wk", (16, 8)), ("wv", (16, 8)), ("wo", (16, 16)))]
    nodes = [helper.make_node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"]
    nodes += [helper.make_node("Attention", ["q", "k", "v"], ["attended"], q_num_heads=4, kv_num_heads=2),
              helper.make_node("MatMul", ["attended", "wo"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    result = attnfuse.optimize_onnx(model)
    assert result.report.attention_fused == result.report.attention_total == 1
    assert not any(site.already_fused for site in result.report.sites) and ops(result.proto)[("", "Attention")] == 0
    feeds = {"x": rng.standard_normal((3, 7, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(result.proto, feeds)["y"], run(model, feeds)["y"], atol=1e-5)
