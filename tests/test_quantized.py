"""Quantized models in and out: tiny BERT and Llama (random weights) quantized by ONNX Runtime's own
quantizers here, then fused, run padding-free and verified by their twins (optimizer/twin.py);
`--quantize` quantizing as the export quantizes; a wrong rewrite of a quantized model rolled back."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnx_ir as ir
import pytest

from attnfuse.core import registry
from attnfuse.core.driver import Applied, Candidate
from attnfuse.core.outcome import Fusion
from attnfuse.models import zoo
from attnfuse.models.decoders import cases
from attnfuse.optimizer import api, optimize_onnx
from attnfuse.optimizer.report import Baseline, Check
from attnfuse.optimizer.quantize import INT4_ACCURACY
from attnfuse.passes.onnx import padding_free, quantized, unpadded_branch
from attnfuse.passes.onnx.graph import graphs_in_order
from attnfuse.tools.cli import main

BERT = zoo.ZooCase("bert", "dynamo", "sdpa")
LLAMA = "llama-dynamo-sdpa-none"


@pytest.fixture(scope="module")
def bert() -> str:
    return str(zoo.exported(BERT))


@pytest.fixture(scope="module")
def llama() -> str:
    return str(cases.exported(cases.find(LLAMA)))


def quantize_dynamic(source: str, target: Path, **options) -> str:
    """quantize_dynamic as its users call it: int8 weights per channel."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    logging.disable(logging.WARNING)  # its advice to pre-process, at every call
    try:
        ort_quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, **options)
    finally:
        logging.disable(logging.NOTSET)
    return str(target)


def quantize_static(source: str, target: Path, quant_format: str) -> str:
    """quantize_static as its users call it (QDQ or QOperator; int8 weights per channel for QDQ),
    calibrated on the zoo model's own check-like inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    from attnfuse.optimizer.inputs import make_inputs

    model = ir.load(source)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([make_inputs(model, 4, 16, seed).feeds for seed in range(2)])

        def get_next(self):
            return next(self.batches, None)

    logging.disable(logging.WARNING)
    try:
        ort_quantize_static(source, target, Batches(), quant_format=QuantFormat[quant_format],
                            per_channel=quant_format == "QDQ", activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    return str(target)


def quantize_int4(source: str, target: Path) -> str:
    from attnfuse.optimizer.quantize import Quantization, quantize
    from attnfuse.optimizer.io import load_model, save_model

    save_model(quantize(load_model(source), Quantization.INT4), target)  # MatMulNBitsQuantizer, block 32
    return str(target)


def fused(report) -> dict[str, bool]:
    return {f.name: f.fused for f in report.fusions}


def ops_per_graph(model: ir.Model) -> list[Counter]:
    return [Counter(node.op_type for node in graph) for graph, _ in graphs_in_order(model.graph)]


def quantized_matmuls(model: ir.Model) -> list[int]:
    """The quantized MatMuls of each graph (the main graph, each If branch, ...) that has any."""
    counts = [quantized.count_matmuls(list(graph)).total_quantized for graph, _ in graphs_in_order(model.graph)]
    return [count for count in counts if count]


def the_branches(model: ir.Model) -> dict[str, ir.Graph]:
    (node,) = [node for node in model.graph if node.op_type == "If"]
    return {name: attribute.value for name, attribute in node.attributes.items()}


# --- quantized inputs -----------------------------------------------------------------------------

def test_int8_bert_is_fused_run_padding_free_and_verified_by_its_twin(bert, tmp_path):
    int8 = quantize_dynamic(bert, tmp_path / "int8.onnx")
    result = optimize_onnx(int8, reference=bert)
    report, plain = result.report, optimize_onnx(bert).report
    assert report.attention_fused == report.attention_total == 2
    assert {op: report.fused_ops.get(op) for op in ("MultiHeadAttention", "SkipLayerNormalization", "BiasGelu")} \
        == {op: plain.fused_ops[op] for op in ("MultiHeadAttention", "SkipLayerNormalization", "BiasGelu")}
    assert fused(report)[padding_free.NAME] and fused(report)[unpadded_branch.NAME]
    verify = report.verify
    assert verify.ok and verify.check is Check.TWIN and verify.max_rel_error <= verify.tolerance == 1e-4
    quantized_original, fp32 = verify.against
    assert quantized_original.model is Baseline.QUANTIZED_ORIGINAL
    assert quantized_original.max_rel_error <= quantized_original.bound
    assert fp32.model is Baseline.FP32_REFERENCE and fp32.max_rel_error < 0.05 and fp32.original_max_rel_error < 0.05
    assert report.quantized_matmuls == 12 and report.float_matmuls == 0  # 2 layers x q, k, v, o, up, down
    # The padded branch quantizes the packed rows: no activation is restored before it is quantized.
    padded = the_branches(result.model)["else_branch"]
    readers = [node for node in padded if quantized.quantized(node) is quantized.DYNAMIC_QUANTIZE_LINEAR]
    assert len(readers) == 8 and not any(node.inputs[0].name.startswith(f"{padding_free.NAME}/restore")
                                         for node in readers)
    assert ops_per_graph(result.model)[2]["MatMulInteger"] == 12


def test_a_statically_quantized_bert_keeps_activation_quantization_only_before_its_int8_matmuls(bert, tmp_path):
    """quantize_static (QDQ) quantizes nearly every activation: attention's scores and probabilities, the
    residual sums. attnfuse reads those in float (passes/onnx/activation_qdq.py), fuses as in the float
    model, and the twins prove the rest: 12 int8 MatMuls, each its activation's only QuantizeLinear."""
    qdq = quantize_static(bert, tmp_path / "qdq.onnx", "QDQ")
    result = optimize_onnx(qdq, reference=bert)
    report, plain = result.report, optimize_onnx(bert).report
    assert report.attention_fused == report.attention_total == 2
    assert report.fused_ops == plain.fused_ops
    assert fused(report)[padding_free.NAME] and fused(report)[unpadded_branch.NAME]
    verify = report.verify
    assert verify.ok and verify.check is Check.TWIN and verify.max_rel_error <= 1e-4
    quantized_original, fp32 = verify.against
    assert quantized_original.max_rel_error <= quantized_original.bound
    assert report.quantized_matmuls == 12 and report.float_matmuls == 0
    for branch in the_branches(result.model).values():
        ops = Counter(node.op_type for node in branch)
        assert ops["QuantizeLinear"] <= 12 and ops["MatMul"] == 12
        weights = [node.inputs[1].producer() for node in branch if node.op_type == "MatMul"]
        assert all(node.op_type == "DequantizeLinear" and node.inputs[0].graph is branch  # ORT needs them local
                   for node in weights)
    outputs = ort.InferenceSession(result.proto.SerializeToString(), providers=["CPUExecutionProvider"]).get_outputs()
    assert [o.name for o in outputs] == [o.name for o in ir.load(qdq).graph.outputs]


def test_a_qoperator_model_runs_padding_free_and_is_verified_exactly(bert, tmp_path):
    """quantize_static's QOperator format (QLinearMatMul, QLinearAdd, ...): nothing to fuse in float, and the
    QLinear ops' int8 outputs keep the types ONNX Runtime infers for them."""
    qop = quantize_static(bert, tmp_path / "qop.onnx", "QOperator")
    assert main(["optimize", qop, "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verify"]["ok"] and report["verify"]["max_rel_error"] <= 1e-4


def test_weights_dequantized_from_int4_are_judged_by_their_twin(llama, tmp_path):
    """MatMulNBitsQuantizer's QDQ format: DequantizeLinear(int4 blocks) -> MatMul, weights only. ONNX Runtime runs
    each as MatMulNBits with int8 activations inside, so a rewrite that moves an activation by one unit in the
    last place moves the outputs by a quantization step: the twins (sessions without those int8 activations)
    judge the rewrites, and the outputs stay within the bound they give against the quantized original."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, quant_format=QuantFormat.QDQ)
    quantizer = MatMulNBitsQuantizer(onnx.load(llama), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(tmp_path / "w4.onnx"))
    report = optimize_onnx(str(tmp_path / "w4.onnx")).report
    assert report.attention_fused == report.attention_total == 2 and report.quantized_matmuls == 15
    verify = report.verify
    assert verify.ok and verify.check is Check.TWIN and verify.max_rel_error <= 1e-4
    assert verify.against[0].max_rel_error <= verify.against[0].bound


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized_llama_keeps_its_attention_rotary_and_norms_fused(llama, tmp_path, bits):
    source = quantize_dynamic(llama, tmp_path / "q.onnx") if bits == "int8" else quantize_int4(llama, tmp_path / "q.onnx")
    report = optimize_onnx(source, reference=llama).report
    assert report.attention_fused == report.attention_total == 2
    assert report.fused_ops["GroupQueryAttention"] == 2 and report.fused_ops["RotaryEmbedding"] == 4
    assert report.fused_ops["SkipSimplifiedLayerNormalization"] == 4
    assert fused(report)[padding_free.NAME]
    assert report.verify.ok and report.quantized_matmuls == 15 and report.float_matmuls == 0  # 2 x 7 and the head
    # Both quantize activations (int4 inside MatMulNBits, accuracy_level 4): judged by the twins.
    assert report.verify.check is Check.TWIN
    assert report.verify.against[-1].model is Baseline.FP32_REFERENCE


def test_a_wrong_rewrite_of_a_quantized_model_is_rolled_back_with_its_reason(bert, tmp_path, monkeypatch):
    """A rewrite that drops one bias changes the quantized model's outputs by about as much as padding-free's
    scales move them; the twins tell them apart: the dropped bias goes, padding-free stays."""
    real_passes = api.run_passes
    dropped = Candidate("fake", "dropped bias")

    def run_passes(model, probe, options, excluded=()):
        result = real_passes(model, probe, options, excluded)
        if dropped not in excluded:
            bias = next(value for name, value in model.graph.initializers.items()
                        if name.endswith("layer.1.attention.output.dense.bias"))
            bias.const_value = ir.tensor(bias.const_value.numpy() * 0)
        result.applied.insert(0, Applied(dropped, Fusion(dropped.anchor, "Fake", dropped not in excluded)))
        return result

    monkeypatch.setattr(api, "run_passes", run_passes)
    report = optimize_onnx(quantize_dynamic(bert, tmp_path / "int8.onnx")).report
    assert report.verify.ok and report.rolled_back == [dropped.anchor]
    reason = next(f.reason for f in report.fusions if f.name == dropped.anchor)
    assert reason.startswith("rolled back: twin check (activation quantization removed): max relative error")
    assert "over tolerance 0.0001" in reason
    assert fused(report)[padding_free.NAME] and report.attention_fused == 2


# --- --quantize ----------------------------------------------------------------------------------

def test_quantize_int8_quantizes_every_matmul_the_export_has_in_each_branch(bert, tmp_path):
    export = quantized_matmuls(ir.load(quantize_dynamic(bert, tmp_path / "int8.onnx", op_types_to_quantize=["MatMul"])))
    result = optimize_onnx(bert, quantize="int8")
    report = result.report
    assert export == [12] and quantized_matmuls(result.model) == [12, 12]  # the unpadded and the padded branch
    assert report.quantize == "int8" and report.quantized_matmuls == 12 and report.float_matmuls == 0
    assert report.verify.ok and report.verify.check is Check.TWIN
    assert [other.model for other in report.verify.against] == [Baseline.QUANTIZED_ORIGINAL, Baseline.FP32_REFERENCE]
    assert report.fused_ops["EmbedLayerNormalization"] == 1  # the embedding tables stay float
    # What the note tells a user of quantize_dynamic: EnableSubgraph finds the branches' MatMuls too. In
    # float, q, k and v are one fused projection: 4 MatMuls a layer (quantizing first keeps the 6: a
    # dequantized weight is not stored, so projections leave it alone).
    plain = tmp_path / "fp32.onnx"
    optimize_onnx(bert).save(plain)
    again = quantize_dynamic(str(plain), tmp_path / "again.onnx", extra_options={"EnableSubgraph": True})
    assert quantized_matmuls(ir.load(again)) == [8, 8]
    # And it runs, computing what the fp32 output does up to int8's error (an untyped MatMul output in a branch
    # made quantize_dynamic write an invalid Cast: passes/onnx/types.py).
    mask = np.array([[1] * 7 + [0] * 2, [1] * 9], dtype=np.int64)
    feeds = {"input_ids": np.random.default_rng(3).integers(2, zoo.VOCAB, mask.shape), "attention_mask": mask}
    fp32, int8 = (ort.InferenceSession(path).run(None, feeds)[0] for path in (str(plain), again))
    real = mask.astype(bool)
    assert np.abs(int8[real] - fp32[real]).max() < 0.1 * np.abs(fp32[real]).max()


def test_quantize_int4_writes_matmulnbits_in_each_branch(bert, tmp_path):
    result = optimize_onnx(bert, quantize="int4")
    kinds = {node.op_type for graph, _ in graphs_in_order(result.model.graph) for node in graph
             if (op := quantized.quantized(node)) is not None and op.matmul}
    # Quantized after the rewrites: q, k and v stay one MatMul (2 layers x qkv, o, up, down in each branch).
    assert kinds == {quantized.MATMUL_NBITS.op_type} and quantized_matmuls(result.model) == [8, 8]
    levels = {node.attributes["accuracy_level"].value for node in result.model.graph.all_nodes()
              if node.op_type == quantized.MATMUL_NBITS.op_type}
    assert levels == {INT4_ACCURACY}  # int8 activations inside the op, as onnxruntime-genai writes for the CPU
    assert result.report.verify.ok and result.report.verify.check is Check.TWIN


def test_quantize_refuses_a_quantized_model(bert, tmp_path):
    from attnfuse.optimizer.errors import UserError

    with pytest.raises(UserError, match="quantized already"):
        optimize_onnx(quantize_dynamic(bert, tmp_path / "int8.onnx"), quantize="int8")


# --- the command line ----------------------------------------------------------------------------

def test_an_int8_model_through_the_command_line(bert, tmp_path, capsys):
    int8 = quantize_dynamic(bert, tmp_path / "int8.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["optimize", int8, "-o", str(out), "--reference", bert, "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "attention fused: 2/2" in printed and "twin check" in printed and "against the fp32 reference" in printed
    assert "quantized MatMuls: 12 (as given), 0 with float weights" in printed
    written = onnx.load(out)
    assert any(node.op_type == "If" for node in written.graph.node)
    assert '"check": "twin"' in report.read_text()


def test_the_command_line_quantizes_and_says_how_to_quantize_its_output(bert, tmp_path, capsys):
    assert main(["optimize", bert, "-o", str(tmp_path / "int8.onnx"), "--quantize", "int8"]) == 0
    assert "quantized MatMuls: 12 (int8), 0 with float weights" in capsys.readouterr().out
    assert main(["optimize", bert, "-o", str(tmp_path / "fp32.onnx")]) == 0
    assert 'extra_options={"EnableSubgraph": True}' in capsys.readouterr().out


def test_an_unknown_quantization_is_one_line(bert, tmp_path, capsys):
    assert main(["optimize", bert, "-o", str(tmp_path / "out.onnx"), "--quantize", "int3"]) == 1
    assert capsys.readouterr().err == "attnfuse: error: unknown quantization 'int3'; choose int8 or int4\n"
    assert not (tmp_path / "out.onnx").exists()


def test_a_reference_that_does_not_fit_is_one_line(bert, tmp_path, capsys):
    other = str(cases.exported(cases.find(LLAMA)))
    assert main(["optimize", bert, "-o", str(tmp_path / "out.onnx"), "--reference", other]) == 1
    assert capsys.readouterr().err.startswith("attnfuse: error: the reference model does not compute")


def test_registry_and_quantized_ops_do_not_overlap():
    """A quantized op is ONNX Runtime's, never one of attnfuse's fused ops."""
    for op in quantized.QUANTIZED_OPS:
        assert registry.of_onnx(op.form.domain, op.op_type) is None


def test_gemms_of_constant_weights_become_matmuls_for_the_weight_quantizers():
    """Conv1D exports (GPT-2 through Optimum) spell projections as Gemm, which the weight-only quantizers skip:
    Gemm(transB) + bias and plain Gemm become MatMul (+ Add) computing the same; a scaling Gemm stays."""
    from onnx import TensorProto, helper, numpy_helper

    from attnfuse.optimizer.io import load_model, to_proto
    from attnfuse.optimizer.quantize import gemms_as_matmuls

    rng = np.random.default_rng(0)
    weights = {"w_t": rng.standard_normal((6, 4)), "b": rng.standard_normal(6), "w": rng.standard_normal((6, 5)),
               "w2": rng.standard_normal((5, 3))}
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w_t", "b"], ["h"], transB=1),
         helper.make_node("Gemm", ["h", "w"], ["y"]),
         helper.make_node("Gemm", ["y", "w2"], ["z"], alpha=2.0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((3, 4)).astype(np.float32)}
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    rewritten = gemms_as_matmuls(load_model(model))
    assert [node.op_type for node in rewritten.graph] == ["MatMul", "Add", "MatMul", "Gemm"]
    got = ort.InferenceSession(to_proto(rewritten).SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
