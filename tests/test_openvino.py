"""The openvino target: every fused op in standard ONNX ops, attention on length buckets, verified in OpenVINO.

- Each contrib op's standard spelling (passes/onnx/standard.py) equals the contrib op in ONNX Runtime.
- The bucketed attention (passes/onnx/buckets.py) equals the original in ONNX Runtime on every shape of mask.
- End to end in OpenVINO (skipped where it is not installed): optimize_onnx verifies there, at f32 and bf16.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import attnfuse
from attnfuse.core.rule import NoMatch
from attnfuse.kernels import onnx_forms as forms
from attnfuse.models import zoo
from attnfuse.optimizer import openvino_run
from attnfuse.optimizer.errors import UserError
from attnfuse.passes.onnx.spelling import OnnxBuilder
from attnfuse.passes.onnx.standard import OPSET
from test_padding_free import masks

TOLERANCE = 1e-5
B, S, T, HEADS, D = 2, 5, 7, 3, 4
rng = np.random.default_rng(0)


def floats(*shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


class _Feeds:
    """The View a builder reads a graph's inputs through: the feeds themselves."""

    def __init__(self, feeds: dict[str, np.ndarray]):
        self.feeds = feeds

    def value(self, x, run=None):
        return self.feeds.get(x.name)

    def constant(self, x):
        return None


def spelled(form: forms.OnnxForm, feeds: dict[str, np.ndarray], attributes: dict, outputs: tuple[str, ...],
            standard: bool) -> list[np.ndarray]:
    """`form` on `feeds` (named by its input slots), as the builder writes it for ONNX Runtime or in standard ops,
    run in ONNX Runtime."""
    inputs = {name: ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(a.dtype)), shape=ir.Shape(a.shape))
              for name, a in feeds.items()}
    b = OnnxBuilder("spelled", _Feeds(feeds), standard=standard)
    made = b.fused(form, inputs, attributes, outputs=outputs)
    graph = ir.Graph(list(inputs.values()), made if outputs else [made], nodes=b.nodes, opset_imports={"": OPSET, forms.MS_DOMAIN: 1})
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def key_padding() -> np.ndarray:
    return np.array([[1] * T, [1] * 3 + [0] * (T - 3)], np.int32)


def attention_bias(batch: int = B) -> np.ndarray:
    return np.where(rng.random((batch, 1, S, T)) < 0.2, -1e4, floats(batch, 1, S, T)).astype(np.float32)


ONE = dict(num_heads=HEADS, scale=0.3)
CASES = {
    "mha, bias and key padding": (forms.MULTI_HEAD_ATTENTION, dict(
        query=floats(B, S, HEADS * D), key=floats(B, T, HEADS * D), value=floats(B, T, HEADS * D),
        bias=floats(3 * HEADS * D), key_padding_mask=key_padding()), ONE, ()),
    "mha, attention bias": (forms.MULTI_HEAD_ATTENTION, dict(
        query=floats(B, S, HEADS * D), key=floats(B, T, HEADS * D), value=floats(B, T, HEADS * D),
        attention_bias=attention_bias()), ONE, ()),
    "mha, key padding and a shared bias": (forms.MULTI_HEAD_ATTENTION, dict(
        query=floats(B, S, HEADS * D), key=floats(B, T, HEADS * D), value=floats(B, T, HEADS * D),
        key_padding_mask=key_padding(), attention_bias=attention_bias(1)), ONE, ()),
    "mha, heads-first k and v": (forms.MULTI_HEAD_ATTENTION, dict(
        query=floats(B, S, HEADS * D), key=floats(B, HEADS, T, D), value=floats(B, HEADS, T, D),
        attention_bias=attention_bias()), dict(num_heads=HEADS), ()),
    "skip layernorm": (forms.SKIP_LAYER_NORMALIZATION, dict(
        input=floats(B, S, 8), skip=floats(B, S, 8), gamma=floats(8), beta=floats(8), bias=floats(8)),
        dict(epsilon=1e-5), ("output", "input_skip_bias_sum")),
    "skip rms norm": (forms.SKIP_SIMPLIFIED_LAYER_NORMALIZATION, dict(
        input=floats(B, S, 8), skip=floats(B, S, 8), gamma=floats(8), bias=floats(8)),
        dict(epsilon=1e-6), ("output", "input_skip_bias_sum")),
    "rms norm": (forms.SIMPLIFIED_LAYER_NORMALIZATION, dict(X=floats(B, S, 8), scale=floats(8)),
                 dict(epsilon=1e-6, axis=-1, stash_type=1), ()),
    "embed layernorm": (forms.EMBED_LAYER_NORMALIZATION, dict(
        input_ids=rng.integers(0, 11, (B, S)).astype(np.int32), segment_ids=rng.integers(0, 2, (B, S)).astype(np.int32),
        word_embedding=floats(11, 8), position_embedding=floats(9, 8), segment_embedding=floats(2, 8),
        gamma=floats(8), beta=floats(8), position_ids=np.tile(np.arange(S, dtype=np.int32), (B, 1))),
        dict(epsilon=1e-12), ("output", "embedding_sum")),
    "bias gelu": (forms.BIAS_GELU_FORM, dict(A=floats(B, S, 8), B=floats(8)), {}, ()),
    "fast gelu": (forms.FAST_GELU, dict(X=floats(B, S, 8), bias=floats(8)), {}, ()),
    "gelu": (forms.GELU_FORM, dict(X=floats(B, S, 8)), {}, ()),
    "rotary, halves, token rows": (forms.ROTARY_EMBEDDING, dict(
        input=floats(B, S, HEADS * 8), position_ids=rng.integers(0, 16, (B, S)), cos_cache=floats(16, 4),
        sin_cache=floats(16, 4)), dict(num_heads=HEADS), ()),
    "rotary, interleaved, heads first, offset": (forms.ROTARY_EMBEDDING, dict(
        input=floats(B, HEADS, S, 8), position_ids=np.array([3]), cos_cache=floats(16, 4), sin_cache=floats(16, 4)),
        dict(interleaved=1), ()),
    "rotary, partial": (forms.ROTARY_EMBEDDING, dict(
        input=floats(B, S, HEADS * 8), position_ids=rng.integers(0, 16, (B, S)), cos_cache=floats(16, 2),
        sin_cache=floats(16, 2)), dict(num_heads=HEADS, rotary_embedding_dim=4), ()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_standard_spelling_equals_the_contrib_op(case):
    form, feeds, attributes, outputs = CASES[case]
    expected = spelled(form, feeds, attributes, outputs, standard=False)
    got = spelled(form, feeds, attributes, outputs, standard=True)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape
        assert np.abs(e - g).max() <= TOLERANCE * max(1.0, np.abs(e).max()), case


def test_standard_spelling_refuses_grouped_query_attention():
    feeds = dict(query=floats(B, S, HEADS * D), key=floats(B, S, D), value=floats(B, S, D))
    with pytest.raises(NoMatch, match="GroupQueryAttention"):
        spelled(forms.GROUP_QUERY_ATTENTION, feeds, dict(num_heads=HEADS, kv_num_heads=1), (), standard=True)


# ---- the whole model, in ONNX Runtime -----------------------------------------------------------

BERT = zoo.ZooCase("bert", "dynamo", "sdpa")


@pytest.fixture(scope="module")
def bert_for_openvino():
    path = str(zoo.exported(BERT))
    result = attnfuse.optimize_onnx(path, target="openvino", verify=False)
    return path, result


def test_openvino_target_writes_standard_ops_only(bert_for_openvino):
    _, result = bert_for_openvino
    proto = result.proto
    onnx.checker.check_model(proto)
    domains = {(node.domain or "", node.op_type) for node in result.model.graph.all_nodes()}
    assert {domain for domain, _ in domains} == {""}
    assert ("", "Attention") in domains and not any(op in ("Loop", "SequenceInsert") for _, op in domains)
    assert {o.domain: o.version for o in proto.opset_import} == {"": OPSET}
    assert result.report.attention_fused == result.report.attention_total == 2
    fusions = {f.name: f.fused for f in result.report.fusions}
    assert fusions["padding-free"] and fusions["unpadded-branch"]


@pytest.mark.parametrize("kind", list(masks()))
def test_bucketed_attention_equals_the_original(bert_for_openvino, kind):
    path, result = bert_for_openvino
    mask = masks()[kind].astype(np.int64)
    feeds = {"input_ids": np.random.default_rng(5).integers(2, zoo.VOCAB, mask.shape), "attention_mask": mask}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    expected = ort.InferenceSession(path).run(None, feeds)[0]
    got = ort.InferenceSession(result.proto.SerializeToString(), options).run(None, feeds)[0]
    real = mask.astype(bool)
    assert got.shape == expected.shape
    assert np.abs(got[real] - expected[real]).max() <= 1e-4 * np.abs(expected[real]).max()
    assert not got[~real].any()  # padded positions are zero


# ---- options and errors -------------------------------------------------------------------------

def test_bf16_is_for_the_openvino_target():
    with pytest.raises(UserError, match="precision bf16 is for target openvino"):
        attnfuse.optimize_onnx(str(zoo.exported(BERT)), precision="bf16")


def test_int4_is_for_the_onnx_runtime_targets():
    with pytest.raises(UserError, match="--quantize int4 is for the ONNX Runtime targets"):
        attnfuse.optimize_onnx(str(zoo.exported(BERT)), target="openvino", quantize="int4")


def _through_int8_weights(quantizer, weight: np.ndarray, readers: int = 1):
    """`quantizer` on `readers` MatMuls x @ W of one weight, the first product the graph's output: the model,
    and each product read back through ONNX Runtime with x the identity (the weights as the file computes them)."""
    from attnfuse.optimizer.io import load_model, to_proto

    rows, columns = weight.shape
    builder = onnx.helper
    nodes = [builder.make_node("MatMul", ["x", "w"], [f"y{i}"]) for i in range(readers)]
    graph = builder.make_graph(nodes, "g", [builder.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [rows, rows])],
                               [builder.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [rows, columns])
                                for i in range(readers)],
                               [onnx.numpy_helper.from_array(weight, "w")])
    model = quantizer(load_model(builder.make_model(graph, opset_imports=[builder.make_opsetid("", OPSET)])))
    session = ort.InferenceSession(to_proto(model).SerializeToString())
    return model, session.run(None, {"x": np.eye(rows, dtype=np.float32)})


def test_int8_weights_are_within_half_a_step_of_each_block():
    """weights_int8 on x @ W (K = 64: two blocks of 32 per column; K = 48: one scale per column), read back
    through ONNX Runtime with x the identity: each weight within half its block's step, the steps per block."""
    from attnfuse.optimizer.quantize import INT8_BLOCK, weights_int8

    for rows in (2 * INT8_BLOCK, 48):
        weight = floats(rows, 6) * np.linspace(0.1, 10, rows, dtype=np.float32)[:, None]  # blocks of other ranges
        model, (got,) = _through_int8_weights(weights_int8, weight)
        assert [node.op_type for node in model.graph] == ["DequantizeLinear", "MatMul"]
        assert "w" not in model.graph.initializers
        block = INT8_BLOCK if rows % INT8_BLOCK == 0 else rows
        step = np.abs(weight.reshape(rows // block, block, 6)).max(axis=1) / 127
        assert np.all(np.abs(got - weight).reshape(rows // block, block, 6) <= step[:, None, :] / 2 + 1e-7)


def test_widened_int8_weights_are_within_half_a_step_of_each_column():
    """weights_int8_widened (OpenVINO at bf16): x @ Cast(int8 W) then each column's scale; two MatMuls of one
    weight share its int8 constant and Cast, the graph's outputs keep their names; each weight within half its
    column's step; counted as quantized MatMuls."""
    from attnfuse.optimizer.quantize import weights_int8_widened
    from attnfuse.passes.onnx.quantized import count_matmuls

    weight = floats(48, 6) * np.linspace(0.1, 10, 6, dtype=np.float32)[None, :]  # columns of other ranges
    model, outputs = _through_int8_weights(weights_int8_widened, weight, readers=2)
    assert sorted(node.op_type for node in model.graph) == ["Cast", "MatMul", "MatMul", "Mul", "Mul"]
    assert [value.name for value in model.graph.outputs] == ["y0", "y1"]
    assert list(model.graph.initializers) == ["w.int8", "w.scale"]
    assert count_matmuls(list(model.graph)).total_quantized == 2
    step = np.abs(weight).max(axis=0) / 127
    for got in outputs:
        assert np.all(np.abs(got - weight) <= step / 2 + 1e-6)
        assert not np.array_equal(got, weight)  # quantized, not the float weight


def test_bf16_needs_a_cpu_that_has_it(monkeypatch):
    monkeypatch.setattr(openvino_run, "installed", lambda: True)
    monkeypatch.setattr(openvino_run, "has_bf16", lambda: False)
    with pytest.raises(UserError, match="AVX512_BF16 or AMX"):
        attnfuse.optimize_onnx(str(zoo.exported(BERT)), target="openvino", precision="bf16")


def test_missing_openvino_is_a_one_line_user_error(tmp_path):
    """The command line, with openvino unimportable: exit 1, one line naming the install command."""
    blocked = "import sys; sys.modules['openvino'] = None; from attnfuse.tools.cli import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", blocked, "optimize", str(zoo.exported(BERT)), "-o",
                           str(tmp_path / "out.onnx"), "--target", "openvino"], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and openvino_run.INSTALL in done.stderr
    assert not (tmp_path / "out.onnx").exists()


# ---- in OpenVINO --------------------------------------------------------------------------------

needs_openvino = pytest.mark.skipif(not openvino_run.installed(), reason="OpenVINO is not installed")


@needs_openvino
def test_verified_in_openvino():
    result = attnfuse.optimize_onnx(str(zoo.exported(BERT)), target="openvino")
    verify = result.report.verify
    assert verify.ok and verify.max_rel_error <= 1e-4
    assert any("batch 32 x 48" in entry["case"] for entry in verify.inputs)
    assert result.report.verify_precision is None


@needs_openvino
@pytest.mark.skipif(not openvino_run.installed() or not openvino_run.has_bf16(), reason="no bf16 on this CPU")
def test_verified_in_openvino_at_bf16():
    result = attnfuse.optimize_onnx(str(zoo.exported(BERT)), target="openvino", precision="bf16")
    check = result.report.verify_precision
    # The tolerance: bf16's plus the original's own error at bf16 in OpenVINO (rounding adds up over layers).
    assert check.ok and check.precision == "bf16" and 0 < check.original_error < 5e-2
    assert check.tolerance == pytest.approx(5e-2 + check.original_error)
    assert 0.99 < check.min_cosine <= 1.0
    assert result.report.to_dict()["verify_precision"]["min_cosine"] == check.min_cosine


@needs_openvino
@pytest.mark.skipif(not openvino_run.installed() or not openvino_run.has_bf16(), reason="no bf16 on this CPU")
def test_the_bf16_check_still_catches_a_wrong_model():
    """The bf16 tolerance grows by the original's own bf16 error, not so far that a wrong model passes: the
    last LayerNorm's scale x1.5."""
    from attnfuse.core.options import PassOptions, Target
    from attnfuse.optimizer.inputs import make_inputs
    from attnfuse.optimizer.io import load_model
    from attnfuse.optimizer.verify import Verifier

    original = load_model(str(zoo.exported(BERT)))
    verifier = Verifier(original, PassOptions(Target.OPENVINO), [make_inputs(original, batch=3, seqlen=12, seed=0)])
    wrong = original.clone()
    scale = [value for name, value in wrong.graph.initializers.items() if "LayerNorm.weight" in name][-1]
    scale.const_value = ir.tensor(scale.const_value.numpy() * np.float32(1.5))
    right = verifier.check(original.clone(), "bf16")
    assert right.ok and 0 < right.original_error < 5e-2
    assert not verifier.check(wrong, "bf16").ok


@needs_openvino
@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_int8_weights_verified_in_openvino(precision):
    """--quantize int8 for OpenVINO: int8 weights in each If branch's own constants (else OpenVINO runs them in
    float), proved against the weight-quantized original exactly, then as OpenVINO runs them at their
    tolerance: at f32 as DequantizeLinear before each MatMul, OpenVINO quantizing the activations; at bf16
    widened by a Cast and scaled after the product; the error against the fp32 model is reported."""
    if precision == "bf16" and not openvino_run.has_bf16():
        pytest.skip("no bf16 on this CPU")
    result = attnfuse.optimize_onnx(str(zoo.exported(BERT)), target="openvino", quantize="int8", precision=precision)
    report = result.report
    assert report.verify.ok and report.verify.max_rel_error <= 1e-4
    check = report.verify_precision
    assert check.ok and check.precision == {"f32": "f32, int8 activations", "bf16": "bf16"}[precision]
    assert 0 < check.original_error < 5e-2 and check.tolerance == pytest.approx(5e-2 + check.original_error)
    assert 0.99 < check.min_cosine < 1.0
    assert report.quantized_matmuls > 0 and report.float_matmuls == 0
    assert [str(against.model) for against in report.verify.against] == ["fp32 reference"]
    branches = [graph for graph in result.model.graphs() if graph is not result.model.graph]
    assert branches
    weight_op = {"f32": "DequantizeLinear", "bf16": "Cast"}[precision]
    for graph in branches:
        weights = [node for node in graph if node.op_type == weight_op and node.inputs[0] in graph.initializers.values()]
        assert weights and all(node.inputs[1].producer() in weights for node in graph if node.op_type == "MatMul"
                               and node.inputs[1].producer() is not None)


@needs_openvino
def test_a_model_openvino_cannot_run_fails_verification():
    """A child that OpenVINO refuses or kills is a failed run, not a crash of attnfuse."""
    bad = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("NoSuchOp", ["x"], ["y"], domain="nowhere")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[onnx.helper.make_opsetid("", OPSET), onnx.helper.make_opsetid("nowhere", 1)])
    with pytest.raises(RuntimeError, match="OpenVINO"):
        openvino_run.run(ir.serde.deserialize_model(bad), [{"x": np.ones(1, np.float32)}])


@needs_openvino
@pytest.mark.parametrize("precision, has_bf16, noted", [("f32", True, True), ("f32", False, False),
                                                         ("bf16", True, False)])
def test_the_cli_notes_the_int8_form_for_a_cpu_that_runs_openvino_at_bf16(monkeypatch, tmp_path, capsys, precision,
                                                                          has_bf16, noted):
    """OpenVINO computes in bf16 by default on a CPU that has it, where the f32 int8 form's weights are widened at
    every run: the summary says so, and which option writes the form for bf16."""
    from attnfuse.tools.cli import main

    monkeypatch.setattr(openvino_run, "has_bf16", lambda: has_bf16)
    out = tmp_path / "int8.onnx"
    assert main(["optimize", str(zoo.exported(BERT)), "-o", str(out), "--target", "openvino", "--quantize", "int8",
                 "--precision", precision, "--no-verify"]) == 0
    assert out.exists()
    assert ("--precision bf16 writes the int8 file" in capsys.readouterr().out) == noted
