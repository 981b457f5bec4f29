"""A statically quantized model (QDQ) keeps its activation quantization where an int8 kernel uses it:
on the activation of a MatMul, Gemm or Conv whose weight is dequantized from int8 constants. Elsewhere (the
attention's scores and probabilities, residual Adds, layer-norm inputs) the float value is read instead.

ONNX Runtime's quantize_static puts a QuantizeLinear -> DequantizeLinear pair on nearly every activation.
Those between a projection and the next are what keeps the matchers from seeing attention, layer norms
and GELU: the region computes attention of rounded values. Reading the float value moves each by at most
half a quantization step, which verification bounds: the rewritten model's twin (activation quantization
removed, optimizer/twin.py) must equal the original's to the float tolerance, and its outputs stay within
the bound the twins derive against the quantized original. Static scales are constants, so the pairs left
run on packed tokens exactly as on padded ones.
"""
from __future__ import annotations

import onnx_ir as ir

from attnfuse.passes.onnx import quantized as q
from attnfuse.passes.onnx.graph import constant, remove_unused

def float_outside_int8_kernels(model: ir.Model) -> int:
    """Every read of a dequantized activation but an int8 kernel's (quantized.reads_dequantized_weight, its
    activation) reads the float value instead (in place); returns how many reads changed."""
    reads = float_reads(model)
    for node, slot, x in reads:
        node.replace_input_with(slot, x)
    if reads:
        remove_unused(model)
    return len(reads)


def float_reads(model: ir.Model) -> list[tuple[ir.Node, int, ir.Value]]:
    """(reader, input slot, the float activation) of each read that float_outside_int8_kernels changes."""
    reads = []
    for graph in model.graphs():
        for node in graph:
            x = _quantized_activation(node)
            if x is not None:
                reads += [(use.node, use.idx, x) for use in node.outputs[0].uses()
                          if not (use.idx == 0 and q.reads_dequantized_weight(use.node))]
    return reads


def _quantized_activation(node: ir.Node) -> ir.Value | None:
    """x, where `node` is DequantizeLinear(QuantizeLinear(x)) of an activation x; None otherwise."""
    if not q.is_qdq(q.quantized(node)) or node.op_type != q.DEQUANTIZE_LINEAR.op_type or node.inputs[0] is None:
        return None
    quantize = node.inputs[0].producer()
    if quantize is None or quantize.op_type != q.QUANTIZE_LINEAR.op_type or not q.is_qdq(q.quantized(quantize)):
        return None
    x = quantize.inputs[0]
    if x is None or constant(x) is not None or None not in (x.dtype, node.outputs[0].dtype) \
            and x.dtype != node.outputs[0].dtype:
        return None
    return x

