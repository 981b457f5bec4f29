"""A quantized model's twin: the same model with its activation quantization removed and its weights'
quantization kept. Verification compares twins (optimizer/verify.py).

Dynamic quantization takes one scale over a whole activation, padded rows included, so a rewrite
that runs on the real tokens only (padding-free) moves every quantized activation by up to a
quantization step, and the model's outputs by about as much as quantizing moved them from float:
no tolerance on the quantized outputs tells that apart from a wrong rewrite of the same size (a
dropped bias). Without activation quantization the scales cancel and a correct rewrite reproduces
the original's twin to the float tolerance again:

    DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, zp_x, zp_W)   ->  MatMul(x / scale_x, W_q - zp_W)
        (its readers, Cast to float and the Mul by scale_x * scale_W, stay: the result is x @ W_dequantized)
    DynamicQuantizeMatMul(x, W_q, scale_W, zp_W, bias)                 ->  MatMul(x, (W_q - zp_W) * scale_W) + bias
    MatMulIntegerToFloat(DynamicQuantizeLinear(x), W_q, ...)           ->  the same
    QuantizeLinear -> DequantizeLinear of an activation                ->  the activation
    MatMulNBits with accuracy_level > 0 (activations quantized inside) ->  accuracy_level 0
"""
from __future__ import annotations

import onnx_ir as ir

from attnfuse.passes.onnx import quantized as q
from attnfuse.passes.onnx.graph import Builder, constant, named_inputs, replace_uses

NAME = "twin"
FLOAT = ir.DataType.FLOAT
# ONNX Runtime runs DequantizeLinear(int8 weight) -> MatMul as MatMulNBits, by default at accuracy_level 4:
# activations quantized inside. A twin's session keeps them float.
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


def twin(model: ir.Model, onnx_runtime: bool = True) -> ir.Model | None:
    """The model's twin (a copy; weights shared), or None when it quantizes no activation. In ONNX Runtime
    (`onnx_runtime`) a MatMul of a weight dequantized from int8 or int4 quantizes its activation too: ONNX
    Runtime runs it as MatMulNBits, int8 activations inside (unless its session says otherwise:
    SESSION_CONFIG); its twin is then the model itself."""
    copy = model.clone()
    changed = False
    for graph in list(copy.graphs()):
        for node in list(graph):
            changed |= _in_float(node)
    runs_int8_activations = onnx_runtime and any(q.reads_dequantized_weight(node, ("MatMul",))
                                                 for graph in copy.graphs() for node in graph)
    return copy if changed or runs_int8_activations else None


def _in_float(node: ir.Node) -> bool:
    """Rewrite `node` in its graph to compute without activation quantization; whether it did."""
    op = q.quantized(node)
    if op is q.MATMUL_NBITS:
        return _full_precision(node)
    if op is q.MATMUL_INTEGER:
        return _matmul_integer(node)
    if op is q.DYNAMIC_QUANTIZE_MATMUL:
        inputs = named_inputs(node, op.form)
        return _replace(node, lambda b: _dequantized_matmul(b, inputs["A"], inputs))
    if op is q.MATMUL_INTEGER_TO_FLOAT:
        inputs = named_inputs(node, op.form)
        source = _dynamic_quantization(inputs["A"])
        return source is not None and _replace(node, lambda b: _dequantized_matmul(b, source.inputs[0], inputs))
    if op is not None and op.op_type == q.DEQUANTIZE_LINEAR.op_type:
        return _qdq_pair(node)
    return False


def _full_precision(node: ir.Node) -> bool:
    level = node.attributes.get("accuracy_level")
    if level is None or level.value == 0:
        return False
    node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)
    return True


def _matmul_integer(node: ir.Node) -> bool:
    """MatMulInteger on a dynamically quantized activation, read only as float (quantize_dynamic's Cast)."""
    inputs = named_inputs(node, q.MATMUL_INTEGER.form)
    source = _dynamic_quantization(inputs["A"])
    readers = [use.node for use in node.outputs[0].uses()]
    if source is None or node.outputs[0].is_graph_output() \
            or not all(r.op_type == "Cast" and r.attributes["to"].value == FLOAT for r in readers):
        return False
    x, scale = source.inputs[0], source.outputs[q.DYNAMIC_QUANTIZE_LINEAR.form.output("y_scale")]

    def build(b: Builder) -> ir.Value:
        weight = _minus_zero_point(b, inputs["B"], inputs.get("b_zero_point"))
        return b.op("MatMul", [b.op("Div", [x, scale]), weight])
    return _replace(node, build)


def _dequantized_matmul(b: Builder, x: ir.Value, inputs: dict[str, ir.Value]) -> ir.Value:
    """x @ ((W_q - zp_W) * scale_W) (+ bias)."""
    weight = b.op("Mul", [_minus_zero_point(b, inputs["B"], inputs.get("b_zero_point")), inputs["b_scale"]])
    y = b.op("MatMul", [x, weight])
    return b.op("Add", [y, inputs["bias"]]) if "bias" in inputs else y


def _minus_zero_point(b: Builder, weight: ir.Value, zero_point: ir.Value | None) -> ir.Value:
    weight = b.op("Cast", [weight], {"to": FLOAT})
    return weight if zero_point is None else b.op("Sub", [weight, b.op("Cast", [zero_point], {"to": FLOAT})])


def _qdq_pair(node: ir.Node) -> bool:
    """DequantizeLinear(QuantizeLinear(x)) of an activation x (not a constant): x."""
    quantize = node.inputs[0].producer() if node.inputs[0] is not None else None
    found = q.quantized(quantize) if quantize is not None else None
    if found is None or found.op_type != q.QUANTIZE_LINEAR.op_type or constant(quantize.inputs[0]) is not None:
        return False
    x = quantize.inputs[0]
    return _replace(node, lambda b: b.op("Identity", [x]))


def _dynamic_quantization(value: ir.Value) -> ir.Node | None:
    """The DynamicQuantizeLinear whose quantized output `value` is, or None."""
    producer = value.producer()
    if producer is None or q.quantized(producer) is not q.DYNAMIC_QUANTIZE_LINEAR:
        return None
    return producer if value is producer.outputs[q.DYNAMIC_QUANTIZE_LINEAR.form.output("y")] else None


def _replace(node: ir.Node, build) -> bool:
    """`node`'s one output computed by what `build(builder)` makes, inserted before it; `node` removed."""
    b = Builder(f"{NAME}/{node.name}")
    value = build(b)
    graph = node.graph
    graph.insert_before(node, b.nodes)
    replace_uses(node.outputs[0], value)
    graph.remove(node, safe=True)
    return True
