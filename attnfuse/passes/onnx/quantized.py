"""ONNX Runtime's quantized ops (spelled in kernels/onnx_forms.py), described once: which input is
the activation, which inputs are weights, which must be one value for the whole tensor, and which
outputs are laid out like the activation. Padding-free reads this to run them on packed rows,
verification to build the graph's twin without activation quantization (optimizer/twin.py),
`--quantize` to count what it quantized.

    int8, dynamic: DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q) -> Cast -> Mul(scale_x * scale_W)
                   (quantize_dynamic), DynamicQuantizeMatMul and MatMulIntegerToFloat (ORT's fusions of it)
    int8, static:  QuantizeLinear -> DequantizeLinear pairs with constant scales (QDQ)
    4-bit weights: MatMulNBits (MatMulNBitsQuantizer, onnxruntime-genai's builder)

Dynamic quantization takes one scale over the whole tensor; its range always includes 0, so on the
packed real rows it gives the scale it gives on the padded layout with zeros at padded rows (what a
restore writes there): running it packed is exactly what restoring before it computes.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir

from attnfuse.kernels import onnx_forms as forms
from attnfuse.kernels.onnx_forms import MS_DOMAIN, ONNX_DOMAIN, OnnxForm


@dataclass(frozen=True)
class QuantizedOp:
    form: OnnxForm
    activation: str  # the input slot that holds the token-major activation
    weights: tuple[str, ...] = ()  # slots that must be constants (a weight, its scales and zero points, a bias)
    per_tensor: tuple[str, ...] = ()  # slots that must hold one value for the whole activation
    token_major: tuple[str, ...] = ()  # outputs laid out like the activation (the others are per tensor)
    matrix: str | None = None  # the slot of a 2-D weight matrix the activation is multiplied by
    matmul: bool = False  # a MatMul with a quantized weight

    @property
    def op_type(self) -> str:
        return self.form.op_type


DYNAMIC_QUANTIZE_LINEAR = QuantizedOp(forms.DYNAMIC_QUANTIZE_LINEAR, "x", token_major=("y",))
MATMUL_INTEGER = QuantizedOp(forms.MATMUL_INTEGER, "A", weights=("B", "b_zero_point"), per_tensor=("a_zero_point",),
                             token_major=("Y",), matrix="B", matmul=True)
DYNAMIC_QUANTIZE_MATMUL = QuantizedOp(forms.DYNAMIC_QUANTIZE_MATMUL, "A",
                                      weights=("B", "b_scale", "b_zero_point", "bias"), token_major=("Y",),
                                      matrix="B", matmul=True)
MATMUL_INTEGER_TO_FLOAT = QuantizedOp(forms.MATMUL_INTEGER_TO_FLOAT, "A",
                                      weights=("B", "b_scale", "b_zero_point", "bias"),
                                      per_tensor=("a_scale", "a_zero_point"), token_major=("Y",), matrix="B",
                                      matmul=True)
MATMUL_NBITS = QuantizedOp(forms.MATMUL_NBITS, "A", weights=("B", "scales", "zero_points", "g_idx", "bias"),
                           token_major=("Y",), matmul=True)


def _qdq(form: OnnxForm) -> QuantizedOp:
    """(De)QuantizeLinear: elementwise with constant scales (per tensor, or per channel along an axis
    of one token: padding-free checks the axis)."""
    return QuantizedOp(form, form.inputs[0], weights=form.inputs[1:], token_major=form.outputs)


QUANTIZE_LINEAR = _qdq(forms.QUANTIZE_LINEAR)
DEQUANTIZE_LINEAR = _qdq(forms.DEQUANTIZE_LINEAR)
QDQ = (QUANTIZE_LINEAR, DEQUANTIZE_LINEAR,
       *(_qdq(dataclasses.replace(op.form, domain=MS_DOMAIN)) for op in (QUANTIZE_LINEAR, DEQUANTIZE_LINEAR)))
QUANTIZED_OPS = (DYNAMIC_QUANTIZE_LINEAR, MATMUL_INTEGER, DYNAMIC_QUANTIZE_MATMUL, MATMUL_INTEGER_TO_FLOAT,
                 MATMUL_NBITS, *QDQ)


def of_onnx(domain: str, op_type: str) -> QuantizedOp | None:
    domain = ONNX_DOMAIN if domain == "ai.onnx" else domain
    return next((op for op in QUANTIZED_OPS if (op.form.domain, op.op_type) == (domain, op_type)), None)


def quantized(node: ir.Node) -> QuantizedOp | None:
    return of_onnx(node.domain, node.op_type)


def is_qdq(op: QuantizedOp | None) -> bool:
    return op is not None and op.op_type in (QUANTIZE_LINEAR.op_type, DEQUANTIZE_LINEAR.op_type)


@dataclass(frozen=True)
class MatMulCount:
    """The MatMuls of a graph with a constant weight: quantized ones by op type, and those left in float."""

    quantized: dict[str, int]
    float_weights: int

    @property
    def total_quantized(self) -> int:
        return sum(self.quantized.values())


def count_matmuls(nodes: list[ir.Node]) -> MatMulCount:
    """Among `nodes`, the quantized MatMuls and the float MatMuls / Gemms whose weight is an initializer
    (what ONNX Runtime's quantizers quantize)."""
    quantized_ops = Counter(node.op_type for node in nodes if (found := quantized(node)) is not None and found.matmul)
    float_matmuls = [node for node in nodes if node.domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm")
                     and len(node.inputs) > 1 and node.inputs[1] is not None]
    # A weight dequantized or widened from an int8 constant (QDQ, or attnfuse's int8 weights for OpenVINO) is a
    # quantized weight.
    quantized_ops.update(node.op_type for node in float_matmuls
                         if dequantized_constant(node.inputs[1]) or widened_int8_constant(node.inputs[1]))
    left = sum(1 for node in float_matmuls if node.inputs[1].is_initializer())
    return MatMulCount(dict(quantized_ops), left)


def reads_dequantized_weight(node: ir.Node, op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")) -> bool:
    """Whether `node` is one of `op_types` (ONNX's) whose weight (input 1) is dequantized from constants:
    ONNX Runtime runs it in int8 on a quantized activation, and as MatMulNBits with int8 activations inside
    on a float one."""
    return (node.op_type in op_types and node.domain in ("", "ai.onnx") and len(node.inputs) > 1
            and node.inputs[1] is not None and dequantized_constant(node.inputs[1]))


def widened_int8_constant(value: ir.Value) -> bool:
    """Whether `value` is a Cast of an int8 constant (attnfuse's int8 weights for OpenVINO at bf16, scaled
    after their product: optimizer/quantize.weights_int8_widened)."""
    producer = value.producer()
    return (producer is not None and producer.op_type == "Cast" and producer.inputs[0] is not None
            and producer.inputs[0].const_value is not None and producer.inputs[0].const_value.dtype == ir.DataType.INT8)


def dequantized_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return (producer is not None and producer.op_type == DEQUANTIZE_LINEAR.op_type and quantized(producer) is not None
            and producer.inputs[0] is not None and producer.inputs[0].const_value is not None)
