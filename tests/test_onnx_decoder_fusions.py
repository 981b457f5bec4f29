"""RMSNorm and rotary embeddings are recognised by what they compute and fused:
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization with the norm's own epsilon,
RotaryEmbedding in every form (rotate-half or interleaved, full or partial, any head layout,
cos and sin from position ids or from a table). Every norm and rotary of the decoder zoo is
fused and the optimized files compute what the originals compute on padded batches; spellings
that are not an RMSNorm or a rotary are left alone."""
from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import attnfuse
from attnfuse.models import decoders
from attnfuse.models import decoder_spellings as spellings
from attnfuse.models.decoders import DECODES, PREFILL, wrappers
from attnfuse.models.decoders.families import LAYERS

TOLERANCE = 1e-4  # relative to the largest magnitude of each output, on real positions
NORM_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(expected - got).max() / np.abs(expected).max())


def fused_nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == op_type]


def attribute(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


# --------------------------------------------------------------------------- RMSNorm spellings

NORMS = {
    "dynamo": spellings.NormSpelling(),
    "x*x, divided": spellings.NormSpelling(square="mul", inverse="div"),
    "1/sqrt, Gemma's 1+w": spellings.NormSpelling(inverse="one_over", weight="one_plus_w"),
    "no weight": spellings.NormSpelling(weight="none"),
    "residual": spellings.NormSpelling(residual=True),
    "residual, casts, eps 1e-5": spellings.NormSpelling(residual=True, cast=True, eps=1e-5),
    "eps 1e-12": spellings.NormSpelling(eps=1e-12),
}


def norm_feeds(spec: spellings.NormSpelling) -> dict[str, np.ndarray]:
    """Rows of ordinary scale, and rows so small that eps weighs more than mean(x^2)."""
    rng = np.random.default_rng(3)
    feeds = {name: rng.standard_normal((2, 5, spec.hidden)).astype(np.float32) for name in ("h", "r")}
    for value in feeds.values():
        value[0, :2] *= 1e-4
    return feeds if spec.residual else {"h": feeds["h"]}


@pytest.mark.parametrize("name", NORMS)
def test_norm_spelling_fused_with_its_own_eps(name):
    spec = NORMS[name]
    model = spellings.norm_model(spec)
    result = attnfuse.optimize_onnx(model, padding_free=False)
    op = NORM_OPS[spec.residual]
    (node,) = fused_nodes(result.proto, op)
    assert attribute(node, "epsilon") == np.float32(spec.eps)
    assert result.report.fused_ops == {op: 1}
    assert not any(n.op_type in ("ReduceMean", "Sqrt") for n in result.proto.graph.node)

    feeds = norm_feeds(spec)
    got = run(result.proto, feeds)
    expected = spellings.norm_reference(spec, feeds["h"], feeds.get("r"))
    assert relative_error(expected, got[0]) <= TOLERANCE
    # eps decides the tiny rows: the fused op must have the norm's own
    assert np.abs(expected - got[0])[0, :2].max() <= TOLERANCE * np.abs(expected[0, :2]).max()
    if spec.residual:  # the sum, read by the next residual, is the fused op's output 3
        assert relative_error(feeds["h"] + feeds["r"], got[1]) <= TOLERANCE


@pytest.mark.parametrize("defect", [d for d in spellings.NORM_DEFECTS if d != "none"])
def test_not_an_rmsnorm_is_not_fused(defect):
    spec = spellings.NormSpelling(defect=defect)
    model = spellings.norm_model(spec)
    result = attnfuse.optimize_onnx(model, padding_free=False)
    assert not any(op in result.report.fused_ops for op in NORM_OPS), defect
    feeds = norm_feeds(spec)
    assert relative_error(run(model, feeds)[0], run(result.proto, feeds)[0]) <= TOLERANCE
    if defect == "no_eps":
        (fusion,) = result.report.fusions
        assert not fusion.fused and "no epsilon" in fusion.reason


def test_a_norm_without_eps_after_a_residual_is_not_fused():
    model = spellings.norm_model(spellings.NormSpelling(residual=True, defect="no_eps"))
    result = attnfuse.optimize_onnx(model, padding_free=False)
    assert not any(op in result.report.fused_ops for op in NORM_OPS)


# LayerNorm written out (exports before opset 17, tf2onnx): one LayerNormalization node, which the
# layernorm fusion makes SkipLayerNormalization after a residual sum.
LAYER_NORMS = {
    "centred, opset < 17 export": spellings.NormSpelling(layer="centred", eps=1e-5),
    "centred, x*x, divided, eps 1e-12": spellings.NormSpelling(layer="centred", square="mul", inverse="div", eps=1e-12),
    "tf2onnx": spellings.NormSpelling(layer="tf", eps=1e-3),
    "residual": spellings.NormSpelling(layer="centred", residual=True),
}


@pytest.mark.parametrize("name", LAYER_NORMS)
def test_layernorm_written_out_becomes_one_node(name):
    spec = LAYER_NORMS[name]
    result = attnfuse.optimize_onnx(spellings.norm_model(spec), padding_free=False)
    (node,) = fused_nodes(result.proto, "SkipLayerNormalization" if spec.residual else "LayerNormalization")
    assert attribute(node, "epsilon") == np.float32(spec.eps)
    assert not any(n.op_type in ("ReduceMean", "Sqrt", *NORM_OPS) for n in result.proto.graph.node)
    feeds = norm_feeds(spec)
    got = run(result.proto, feeds)
    expected = spellings.norm_reference(spec, feeds["h"], feeds.get("r"))
    assert relative_error(expected, got[0]) <= TOLERANCE


@pytest.mark.parametrize("defect", ["no_eps", "mean_over_tokens", "scaled_mean"])
def test_not_a_layernorm_is_not_made_one(defect):
    spec = spellings.NormSpelling(layer="centred", defect=defect)
    model = spellings.norm_model(spec)
    result = attnfuse.optimize_onnx(model, padding_free=False)
    assert not any(n.op_type.endswith("LayerNormalization") for n in result.proto.graph.node), defect
    feeds = norm_feeds(spec)
    assert relative_error(run(model, feeds)[0], run(result.proto, feeds)[0]) <= TOLERANCE


@pytest.mark.parametrize("residual", [False, True])
def test_norms_run_on_the_packed_tokens(residual):
    """Padding-free reads the fused norms as token-wise: with a padding mask, they run on the real
    tokens only, and the padded positions of the output are zeros."""
    model = spellings.norm_model(spellings.NormSpelling(residual=residual))
    model.graph.input.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]))
    result = attnfuse.optimize_onnx(model)
    fusions = {f.op: f for f in result.report.fusions}
    assert fusions["PaddingFree"].fused, fusions["PaddingFree"].reason
    assert result.report.fused_ops == {NORM_OPS[residual]: 1}

    feeds = norm_feeds(spellings.NormSpelling(residual=residual))
    feeds["attention_mask"] = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.int64)
    real = feeds["attention_mask"].astype(bool)
    expected, got = run(model, feeds)[0], run(result.proto, feeds)[0]
    assert relative_error(expected[real], got[real]) <= TOLERANCE
    assert not got[~real].any()


# --------------------------------------------------------------------------- rotary spellings

ROTARIES = spellings.ROTARY_SPELLINGS


def rotary_feeds(spec: spellings.RotarySpelling, first: int = 0) -> dict[str, np.ndarray]:
    """Rows at different positions (none the probe used), as left padding and caches give them."""
    rng = np.random.default_rng(5)
    batch, length = 3, 6
    feeds = {"q": rng.standard_normal((batch, length, spec.heads * spec.head_size)).astype(np.float32),
             "k": rng.standard_normal((batch, length, spec.kv_heads * spec.head_size)).astype(np.float32)}
    if spec.angles != "arange":
        feeds["position_ids"] = first + np.array([[0, 1, 2, 3, 4, 5], [1, 1, 1, 2, 3, 4], [30, 31, 32, 33, 34, 35]])
    return feeds


def positions(spec: spellings.RotarySpelling, feeds: dict[str, np.ndarray]) -> np.ndarray:
    length = feeds["q"].shape[1]
    return feeds.get("position_ids", np.broadcast_to(np.arange(length), (feeds["q"].shape[0], length)))


@pytest.mark.parametrize("name", ROTARIES)
def test_rotary_spelling_fused_and_equal(name):
    spec = ROTARIES[name]
    result = attnfuse.optimize_onnx(spellings.rotary_model(spec), padding_free=False)
    nodes = fused_nodes(result.proto, "RotaryEmbedding")
    assert len(nodes) == 2 and result.report.fused_ops == {"RotaryEmbedding": 2}
    assert not any(n.op_type == "Neg" for n in result.proto.graph.node)
    producers = {out: n for n in result.proto.graph.node for out in n.output}
    for output in result.proto.graph.output:  # q and k come out of the fused op (through views of its output)
        node = producers[output.name]
        while node.op_type in ("Reshape", "Transpose"):
            node = producers[node.input[0]]
        assert node.op_type == "RotaryEmbedding", output.name
    for node in nodes:
        assert attribute(node, "interleaved", 0) == (spec.form == "interleaved")
        assert attribute(node, "rotary_embedding_dim", 0) in (0, spec.rotary)

    far = 0 if spec.angles == "table" else 1000  # a table holds 64 positions; computed angles any
    feeds = rotary_feeds(spec, far)
    got = run(result.proto, feeds)
    for out, (name_, heads) in zip(got, (("q", spec.heads), ("k", spec.kv_heads))):
        expected = spellings.rotary_reference(spec, feeds[name_], heads, positions(spec, feeds))
        assert relative_error(expected, out) <= TOLERANCE, name_


def test_rotaries_share_one_cache_per_cos_sin_pair():
    result = attnfuse.optimize_onnx(spellings.rotary_model(spellings.RotarySpelling()), padding_free=False)
    first, second = fused_nodes(result.proto, "RotaryEmbedding")
    assert list(first.input[1:]) == list(second.input[1:])


def test_rotary_reads_the_graph_table_and_position_ids():
    """cos and sin gathered from constant tables by the position ids: the op reads the tables
    (the halves it uses) and the ids themselves."""
    spec = spellings.RotarySpelling(angles="table")
    result = attnfuse.optimize_onnx(spellings.rotary_model(spec), padding_free=False)
    node = fused_nodes(result.proto, "RotaryEmbedding")[0]
    assert node.input[1] == "position_ids"
    assert not any(n.op_type in ("Gather", "Range") for n in result.proto.graph.node)


@pytest.mark.parametrize("defect", [d for d in spellings.ROTARY_DEFECTS if d != "none"])
def test_not_a_rotary_is_not_fused(defect):
    spec = spellings.RotarySpelling(defect=defect)
    model = spellings.rotary_model(spec)
    result = attnfuse.optimize_onnx(model, padding_free=False)
    assert "RotaryEmbedding" not in result.report.fused_ops
    feeds = rotary_feeds(spec)
    for expected, got in zip(run(model, feeds), run(result.proto, feeds)):
        assert relative_error(expected, got) <= TOLERANCE
    if defect == "sign":  # x cos - rotate(x) sin: a cos/sin pair, but no rotary the op computes
        assert any(f.op == "RotaryEmbedding" and not f.fused and "equals no rotary" in f.reason
                   for f in result.report.fusions)


# --------------------------------------------------------------------------- the decoder zoo

RMSNORM_FAMILIES = ("llama", "qwen2", "phi3", "gemma")  # phi normalises with LayerNorm
# Each family by both exporters, one with a cache and one without (which one alternates), in the
# attention implementation the other decoder tests export (the same files): ten files.
ZOO = [next(case for case in decoders.TESTED if (case.family, case.exporter, case.cache)
            == (family, exporter, (wrappers.PAST_MODE, wrappers.NO_CACHE)[(i + j) % 2]))
       for i, family in enumerate(("llama", "qwen2", "phi", "phi3", "gemma"))
       for j, exporter in enumerate(("dynamo", "torchscript"))]


@pytest.mark.parametrize("case", ZOO, ids=lambda case: case.id)
def test_zoo_norms_and_rotaries_fused_and_equal(case):
    path = str(decoders.exported(case))
    result = attnfuse.optimize_onnx(path, padding_free=False)
    ops = result.report.fused_ops
    norms = 2 * LAYERS + 1 if case.family in RMSNORM_FAMILIES else 0
    assert sum(ops.get(op, 0) for op in NORM_OPS) == norms, ops
    assert ops.get("RotaryEmbedding") == 2 * LAYERS, ops
    assert not any(f.op in (*NORM_OPS, "RotaryEmbedding") and not f.fused for f in result.report.fusions)
    left = {node.op_type for node in result.proto.graph.node}
    assert not left & {"ReduceMean", "Neg"}, left  # no decomposed norm or rotate-half left
    assert result.report.verify.ok

    names = decoders.signature(case).output_names
    for step in (PREFILL, *DECODES) if case.cache == wrappers.PAST_MODE else (PREFILL,):
        feeds = {k: v.numpy() for k, v in decoders.example(case, step, seed=3).items()}
        for name, expected, got in zip(names, run(path, feeds), run(result.proto, feeds)):
            real = np.broadcast_to(decoders.real_positions(name, feeds, expected), expected.shape)
            assert relative_error(expected[real], got[real]) <= TOLERANCE, (name, step)
