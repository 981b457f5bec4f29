"""`--quantize int8|int4`: the model's MatMul weights quantized, then verified against the quantized original.

When to quantize: before the rewrites, or after them on the rewritten model (`after_rewrites`).
- int8 for ONNX Runtime: before. quantize_dynamic takes one scale per activation tensor, padded rows
  included, so the quantized export is the original the rewrites are verified against (by the twins,
  optimizer/twin.py) and rolled back against one by one. int8 weights per output channel (per tensor:
  sentence cosine 0.922 against 0.988 on MiniLM); MatMuls only, so that embedding tables stay float and
  still fuse into EmbedLayerNormalization. Quantizing attnfuse's output instead (quantize_dynamic's
  EnableSubgraph finds the MatMuls in its If branches) computes the same products as fast and as
  accurately (docs/quantized.md) but could only be verified, or undone, as a whole.
- Weights quantized in blocks along K within each output column: after. Then a joined q/k/v or gate/up
  weight quantizes exactly as its parts would (its columns are theirs), so the output quantized after
  the rewrites has the weights the export quantized before them has, which is the original it is verified
  against; and the joins, which a weight already dequantized would block, are kept.
  - int4: MatMulNBitsQuantizer, 4-bit weights in blocks of 32, symmetric, accuracy_level 4 (INT4_ACCURACY).
  - int8 for OpenVINO (`--target openvino`), symmetric, inside the graph that uses them (an If branch's
    weights must be its own constants: read from the outer graph they are inputs of the branch to
    OpenVINO, which then runs them in float). Its form follows the precision it will run at:
    - f32: one scale per block of 32, a blocked DequantizeLinear before each MatMul (`weights_int8`).
      OpenVINO quantizes the activations of such a MatMul itself, per group of 32 along K (its CPU
      default), and runs it in int8. Measured on MiniLM (docs/quantized.md): as fast as one scale per
      output channel (what OpenVINO's own int8 weight compression writes), sentence cosines 0.9994-0.9997
      against 0.9990-0.9993.
    - bf16: one scale per output channel, applied after the product (`weights_int8_widened`). At bf16
      OpenVINO does not quantize activations: a DequantizeLinear's weights were widened to bf16 at every
      run, and the int8 file ran slower than the float one (96 against 73 ms on MiniLM's varlen batch); the
      Cast of the int8 constant is folded when OpenVINO loads the model, and the file runs as the float
      one does, at a quarter of its weights' size.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from attnfuse.core.text_enum import TextEnum
from attnfuse.optimizer import io
from attnfuse.optimizer.errors import UserError, first_line
from attnfuse.kernels import onnx_forms as forms
from attnfuse.passes.onnx.graph import attr, nodes_on_one_path, remove_unused, replace_node
from attnfuse.passes.onnx.quantized import MatMulCount, count_matmuls

INT4_BLOCK = 32
# MatMulNBits' accuracy_level 4: activations quantized to int8 per block of each row inside the op, so int8
# dot products (VNNI) instead of dequantizing the weights to float: what onnxruntime-genai's builder writes
# for the CPU. Per row, so padding-free changes no activation's scale.
INT4_ACCURACY = 4
INT8_BLOCK = 32  # OpenVINO: weights' blocks along K, as its activations' groups
# What a user of quantize_dynamic passes for a model optimized by attnfuse: its MatMuls sit in If branches.
SUBGRAPH_OPTION = 'extra_options={"EnableSubgraph": True}'


class Quantization(TextEnum):
    INT8 = "int8"  # quantize_dynamic: int8 weights per channel, activations quantized per tensor at run time
    INT4 = "int4"  # MatMulNBitsQuantizer: 4-bit weights in blocks of 32, symmetric, int8 activations inside


def parse_quantization(value: Quantization | str | None) -> Quantization | None:
    """None, or one of Quantization's values; ValueError naming the choices."""
    if value is None or isinstance(value, Quantization):
        return value
    try:
        return Quantization(str(value).strip().lower())
    except ValueError:
        raise ValueError(f"unknown quantization {value!r}; choose {' or '.join(q.value for q in Quantization)}") from None


def quantize(model: ir.Model, how: Quantization) -> ir.Model:
    """`model` with its MatMuls' weights quantized as `how` says (a new model). UserError for a model
    that is quantized already, or that the quantizer refuses."""
    check_float(model)
    try:
        proto = io.to_proto(model)
    except ValueError as e:
        raise UserError(f"--quantize: {e}") from None
    try:
        with _quiet_logging():
            quantized = _QUANTIZERS[how](proto)
    except Exception as e:
        raise UserError(f"--quantize {how}: ONNX Runtime's quantizer failed: {type(e).__name__}: {first_line(e)}") from None
    return io.load_model(quantized)


def after_rewrites(how: Quantization, openvino: bool, precision: str = "f32") -> Callable[[ir.Model], ir.Model] | None:
    """The quantizer to apply to each rewritten model, where `how` quantizes after the rewrites (module
    docstring); None where it quantizes the export before them. For OpenVINO the int8 form follows the
    `precision` it will run at (module docstring)."""
    if how is Quantization.INT4:
        return lambda model: quantize(gemms_as_matmuls(model), how)
    if not openvino:
        return None
    int8 = weights_int8 if precision == "f32" else weights_int8_widened
    return lambda model: int8(gemms_as_matmuls(model))


def gemms_as_matmuls(model: ir.Model) -> ir.Model:
    """`model` (changed in place, and returned) with each Gemm of a constant 2-D weight written as MatMul
    (then Add of its bias): the weight-only quantizers take MatMuls only, and exports of Conv1D layers
    (GPT-2) spell their projections as Gemm. Gemms that scale (alpha, beta) or transpose A stay."""
    for graph in model.graphs():
        for node in list(graph):
            if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
                continue
            a, weight, bias = (list(node.inputs) + [None])[:3]
            tensor = _stored_matrix(weight)
            if tensor is None or attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 \
                    or attr(node, "beta", 1.0) != 1.0:
                continue
            if attr(node, "transB", 0):
                transposed = ir.tensor(np.ascontiguousarray(tensor.numpy().T), name=f"{weight.name}.transposed")
                weight = ir.Value(name=transposed.name, const_value=transposed)
                graph.register_initializer(weight)
            out = node.outputs[0]
            made = [ir.node("MatMul", [a, weight], outputs=[ir.Value(name=f"{out.name}.product")])]
            if bias is not None:
                made.append(ir.node("Add", [made[0].outputs[0], bias], outputs=[ir.Value(name=f"{out.name}.biased")]))
            replace_node(graph, node, made, [made[-1].outputs[0]], take_name=False)
    return model


def _stored_matrix(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The 2-D tensor of an initializer, or None."""
    tensor = value.const_value if value is not None and value.is_initializer() else None
    return tensor if tensor is not None and len(tensor.shape) == 2 else None


def check_float(model: ir.Model) -> ir.Model:
    """`model`, when none of its MatMuls is quantized; else a UserError."""
    found = count_matmuls(list(model.graph.all_nodes()))
    if found.total_quantized:
        raise UserError(f"--quantize: the model is quantized already ({found.total_quantized} quantized MatMuls)")
    return model


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """The quantizers advise pre-processing at every call, and importing MatMulNBitsQuantizer sets the
    root logger to INFO (logging.basicConfig), after which every library's info messages print: keep
    them quiet, and the root logger as it was."""
    root = logging.getLogger()
    level, handlers, disabled = root.level, list(root.handlers), logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(disabled)
        root.setLevel(level)
        root.handlers[:] = handlers


def _int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="attnfuse-quantize-") as folder:
        path = Path(folder) / "int8.onnx"
        quantize_dynamic(proto, path, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                         extra_options={"EnableSubgraph": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load(path)


def _int4(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=INT4_ACCURACY)
    quantizer = MatMulNBitsQuantizer(proto, block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=INT4_ACCURACY,
                                     algo_config=config)
    quantizer.process()
    return quantizer.model.model


_QUANTIZERS = {Quantization.INT8: _int8, Quantization.INT4: _int4}


def weights_int8(model: ir.Model, block: int | None = INT8_BLOCK) -> ir.Model:
    """`model` (changed in place, and returned) with every MatMul's constant 2-D float weight W replaced
    by DequantizeLinear(int8 W, a scale per `block` along K; None: one per output channel, as OpenVINO's
    own int8 weight compression has it) in the graph of the MatMul: what OpenVINO runs as an int8 MatMul,
    quantizing its activations at run time. Needs opset 21."""
    def dequantized(graph: ir.Graph, node: ir.Node, weight: ir.Value, tensor: ir.TensorProtocol) -> ir.Value:
        quantized, scale, block_rows = _int8_blocks(tensor.numpy(), block)
        dequantize = ir.node(forms.DEQUANTIZE_LINEAR.op_type, _constants(graph, weight.name, quantized, scale),
                             {"axis": 0, "block_size": block_rows}, name=f"{weight.name}.dequantize")
        dequantize.outputs[0].name = f"{weight.name}.dequantized"
        graph.insert_before(node, dequantize)
        return dequantize.outputs[0]

    local: dict[tuple[ir.Graph, ir.Value], ir.Value] = {}  # (graph, float weight) -> its dequantized weight there
    for graph, node, weight, tensor in _float_weight_matmuls(model):
        if (graph, weight) not in local:
            local[graph, weight] = dequantized(graph, node, weight, tensor)
        node.replace_input_with(1, local[graph, weight])
    remove_unused(model)  # the float weights no MatMul reads any more
    return model


def weights_int8_widened(model: ir.Model) -> ir.Model:
    """`model` (changed in place, and returned) with every MatMul x @ W of a constant 2-D float weight written
    (x @ Cast(int8 W)) * s, one scale per output channel, the Cast in the graph of the MatMul: OpenVINO folds
    that Cast of a constant when it loads the model, so the MatMul runs on widened weights like a float one
    (at bf16, on AMX), where a DequantizeLinear before it is kept compressed and widened at every run (twice
    the time on an encoder's batch of tokens, docs/quantized.md). The file holds int8 weights."""
    local: dict[tuple[ir.Graph, ir.Value], tuple[ir.Value, ir.Value]] = {}  # -> (widened weight, its scales)
    for graph, node, weight, tensor in _float_weight_matmuls(model):
        if (graph, weight) not in local:
            quantized, scale, _ = _int8_blocks(tensor.numpy(), None)
            integers, scales = _constants(graph, weight.name, quantized, scale.reshape(-1))
            widen = ir.node("Cast", [integers], {"to": ir.DataType.FLOAT}, name=f"{weight.name}.widen")
            widen.outputs[0].name = f"{weight.name}.widened"
            graph.insert_before(node, widen)
            local[graph, weight] = (widen.outputs[0], scales)
        widened, scales = local[graph, weight]
        product = node.outputs[0]
        made = [ir.node("MatMul", [node.inputs[0], widened], outputs=[ir.Value(name=f"{product.name}.int8")])]
        made.append(ir.node("Mul", [made[0].outputs[0], scales], outputs=[ir.Value(name=f"{product.name}.scaled")]))
        replace_node(graph, node, made, [made[-1].outputs[0]], take_name=False)
    remove_unused(model)
    return model


def _float_weight_matmuls(model: ir.Model) -> Iterator[tuple[ir.Graph, ir.Node, ir.Value, ir.TensorProtocol]]:
    """(graph, MatMul, its weight, the weight's float 2-D tensor) for every standard MatMul of a stored float
    matrix. The quantizers write each weight's int8 form in the graph that reads it: an If branch's weights
    must be its own constants (read from the outer graph they are inputs of the branch to OpenVINO, which
    then runs them in float)."""
    for graph in model.graphs():
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            tensor = _stored_matrix(node.inputs[1])
            if tensor is not None and tensor.dtype == ir.DataType.FLOAT:
                yield graph, node, node.inputs[1], tensor


def _int8_blocks(weight: np.ndarray, block: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(round(W / s) in int8, s [K / rows, N], rows) with s = max |W| / 127 over each block of `rows` = `block`
    values of a column (the whole column where K is no multiple of `block`, or `block` is None)."""
    rows, columns = weight.shape
    block = block if block and rows % block == 0 else rows
    blocks = weight.reshape(rows // block, block, columns)
    scale = np.abs(blocks).max(axis=1) / 127.0  # [K / block, N]
    scale[scale == 0] = 1.0
    quantized = np.clip(np.rint(blocks / scale[:, None, :]), -127, 127).astype(np.int8).reshape(rows, columns)
    return quantized, scale.astype(np.float32), block


def _constants(graph: ir.Graph, name: str, quantized: np.ndarray, scale: np.ndarray) -> list[ir.Value]:
    """The int8 weight and its scales as initializers of `graph`, named after the float weight `name`."""
    constants = []
    for suffix, array in (("int8", quantized), ("scale", scale)):
        value = ir.Value(name=f"{name}.{suffix}", const_value=ir.tensor(array, name=f"{name}.{suffix}"))
        graph.register_initializer(value)
        constants.append(value)
    return constants


def padded_path_matmuls(model: ir.Model) -> MatMulCount:
    """The MatMuls a padded batch runs (If else-branches: padding-free's graph), quantized and float."""
    return count_matmuls(nodes_on_one_path(model.graph))


def unquantized_in_subgraphs(model: ir.Model) -> bool:
    """Float MatMuls with constant weights inside If branches or Loop bodies: where quantize_dynamic
    looks only with SUBGRAPH_OPTION."""
    inner = [node for graph in model.graphs() if graph is not model.graph for node in graph]
    return count_matmuls(inner).float_weights > 0
