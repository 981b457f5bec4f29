"""ONNX Runtime's quantized ops on tiny graphs (quantized here by its own quantizers): padding-free runs
them on the packed rows (passes/onnx/quantized.py says which may), and their twins compute without
activation quantization (optimizer/twin.py)."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_padding_free_units import masks, packed, session, token_mask

from attnfuse.optimizer.io import load_model, to_proto
from attnfuse.optimizer.probe import Probe
from attnfuse.optimizer.twin import twin
from attnfuse.passes.onnx import quantized

HIDDEN, OUT = 32, 16
RNG = np.random.default_rng(0)
W1 = (RNG.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN)).astype(np.float32)
W2 = (RNG.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN)).astype(np.float32)
BIAS = RNG.normal(size=OUT).astype(np.float32)


def float_graph(projections: int = 1) -> onnx.ModelProto:
    """y = x @ w1 + bias (+ x @ w2): one projection, or two that read the same x."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Add", ["h1", "bias"], ["y1"])]
    weights = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(BIAS, "bias")]
    if projections == 2:
        nodes += [helper.make_node("MatMul", ["x", "w2"], ["h2"]), helper.make_node("Add", ["y1", "h2"], ["y"])]
        weights.append(numpy_helper.from_array(W2, "w2"))
    else:
        nodes.append(helper.make_node("Identity", ["y1"], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", OUT])
    graph = helper.make_graph(nodes, "g", [x, token_mask("attention_mask")], [y], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def with_mask_input(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The quantizers drop an input nothing reads; padding-free needs the mask."""
    if not any(i.name == "attention_mask" for i in proto.graph.input):
        proto.graph.input.append(token_mask("attention_mask"))
    return proto


def dynamic(tmp_path, projections: int = 1) -> onnx.ModelProto:
    """DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul, as quantize_dynamic writes it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(float_graph(projections), source)
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        logging.disable(logging.NOTSET)
    return with_mask_input(onnx.load(target))


def ort_fused(tmp_path, projections: int) -> onnx.ModelProto:
    """quantize_dynamic's graph as ONNX Runtime's own optimizer saves it: DynamicQuantizeMatMul (one
    reader of the quantized x), MatMulIntegerToFloat (several)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(dynamic(tmp_path, projections).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return with_mask_input(onnx.load(tmp_path / "fused.onnx"))


def nbits(tmp_path, accuracy_level: int | None = None) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=16, is_symmetric=True, accuracy_level=accuracy_level)
    quantizer = MatMulNBitsQuantizer(float_graph(), block_size=16, is_symmetric=True, accuracy_level=accuracy_level,
                                     algo_config=config)
    quantizer.process()
    return with_mask_input(quantizer.model.model)


def qdq(tmp_path) -> onnx.ModelProto:
    """x quantized and dequantized with a constant scale (static QDQ) before the projection."""
    proto = float_graph()
    proto.graph.node.insert(0, helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]))
    proto.graph.node.insert(1, helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]))
    proto.graph.node[2].input[0] = "xd"
    proto.graph.initializer.extend([numpy_helper.from_array(np.float32(0.02), "s"),
                                    numpy_helper.from_array(np.int8(0), "zp")])
    return proto


KINDS = {
    "DynamicQuantizeLinear + MatMulInteger": lambda tmp: dynamic(tmp),
    "DynamicQuantizeMatMul": lambda tmp: ort_fused(tmp, 1),
    "MatMulIntegerToFloat": lambda tmp: ort_fused(tmp, 2),
    "MatMulNBits": lambda tmp: nbits(tmp),
    "QuantizeLinear + DequantizeLinear": qdq,
}


def quantized_nodes(m: ir.Model) -> list[ir.Node]:
    return [node for node in m.graph if quantized.quantized(node) is not None]


def shape_of(m: ir.Model, value: ir.Value, feeds: dict[str, np.ndarray]) -> tuple[int, ...]:
    """The shape `value` (of any type) takes when `m` runs on `feeds`."""
    copy = m.clone()
    inside = next(out for node in copy.graph for out in node.outputs if out.name == value.name)
    inside.type = None  # ONNX Runtime types an output itself
    copy.graph.outputs.append(inside)
    return session(copy).run(None, feeds)[-1].shape


def feeds_for(mask: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": RNG.normal(size=(*mask.shape, HIDDEN)).astype(np.float32), "attention_mask": mask}


@pytest.mark.parametrize("kind", list(KINDS))
def test_quantized_ops_run_on_the_packed_rows_as_on_zeros_at_padded_rows(kind, tmp_path):
    """Dynamic quantization's range always includes 0: on the packed rows it takes the scale it takes on
    the padded layout with zeros at padded rows (what a restore writes), so the packed model computes
    exactly that; static scales do not depend on the rows at all."""
    original = load_model(KINDS[kind](tmp_path))
    assert {node.op_type for node in quantized_nodes(original)} >= set(kind.split(" + "))
    rewritten = original.clone()
    packed(rewritten, Probe.capture(rewritten))
    before, after = session(original), session(rewritten)
    for name, mask in masks().items():
        feeds = feeds_for(mask)
        real = mask.astype(bool)
        for node in quantized_nodes(rewritten):  # every quantized op's rows are the real tokens
            assert shape_of(rewritten, node.outputs[0], feeds)[:2] == (1, real.sum()), (node.op_type, name)
        zeroed = dict(feeds, x=feeds["x"] * real[..., None])
        expected, got = before.run(None, zeroed)[0], after.run(None, feeds)[0]
        assert np.abs(expected[real] - got[real]).max() <= 1e-5 * np.abs(expected[real]).max(), name
        assert not got[~real].any(), name


def test_a_matmulinteger_of_two_activations_stays_on_the_padded_layout():
    """Near miss: its second operand is quantized at run time too (a weight fed as an input)."""
    nodes = [helper.make_node("DynamicQuantizeLinear", [name], [f"{name}_q", f"{name}_s", f"{name}_z"])
             for name in ("x", "w")]
    nodes += [helper.make_node("MatMulInteger", ["x_q", "w_q", "x_z", "w_z"], ["product"]),
              helper.make_node("Cast", ["product"], ["as_float"], to=TensorProto.FLOAT),
              helper.make_node("Mul", ["x_s", "w_s"], ["scale"]),
              helper.make_node("Mul", ["as_float", "scale"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]),
              token_mask("attention_mask"), helper.make_tensor_value_info("w", TensorProto.FLOAT, [HIDDEN, OUT])]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = load_model(helper.make_model(helper.make_graph(nodes, "g", inputs, [y]),
                                     opset_imports=[helper.make_opsetid("", 17)]))
    packed(m, Probe.capture(m))
    (matmul,) = [node for node in m.graph if node.op_type == quantized.MATMUL_INTEGER.op_type]
    mask = masks()["right"]
    feeds = dict(feeds_for(mask), w=W1)
    assert shape_of(m, matmul.outputs[0], feeds)[:2] == mask.shape


def dequantized(proto: onnx.ModelProto, name: str) -> np.ndarray:
    """quantize_dynamic's weight `name` back in float: (w_q - zero point) * scale, per output channel."""
    weights = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return ((weights[f"{name}_quantized"].astype(np.float32) - weights[f"{name}_zero_point"])
            * weights[f"{name}_scale"])


@pytest.mark.parametrize("kind", ["DynamicQuantizeLinear + MatMulInteger", "DynamicQuantizeMatMul",
                                  "MatMulIntegerToFloat"])
def test_the_twin_of_dynamic_quantization_is_x_times_the_dequantized_weights(kind, tmp_path):
    proto = KINDS[kind](tmp_path)
    weights = dynamic(tmp_path, 2 if kind == "MatMulIntegerToFloat" else 1)  # the same weights, by name
    mask = masks()["right"]
    feeds = feeds_for(mask)
    expected = feeds["x"] @ dequantized(weights, "w1") + BIAS
    if kind == "MatMulIntegerToFloat":
        expected = expected + feeds["x"] @ dequantized(weights, "w2")
    got = session(twin(load_model(proto))).run(None, feeds)[0]
    quantized_error = np.abs(session(load_model(proto)).run(None, feeds)[0] - expected).max()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max() < quantized_error


def test_the_twin_of_a_qdq_pair_is_the_activation(tmp_path):
    mask = masks()["right"]
    feeds = feeds_for(mask)
    got = session(twin(load_model(qdq(tmp_path)))).run(None, feeds)[0]
    np.testing.assert_allclose(got, feeds["x"] @ W1 + BIAS, rtol=1e-5, atol=1e-5)


def test_weight_only_quantization_has_no_twin_and_matmulnbits_drops_its_activation_quantization(tmp_path):
    assert twin(load_model(nbits(tmp_path))) is None  # accuracy_level 0: activations stay float
    assert twin(load_model(float_graph())) is None
    inside = twin(load_model(nbits(tmp_path, accuracy_level=4)))
    (node,) = [node for node in inside.graph if node.op_type == quantized.MATMUL_NBITS.op_type]
    assert node.attributes["accuracy_level"].value == 0
    assert to_proto(inside) is not None
