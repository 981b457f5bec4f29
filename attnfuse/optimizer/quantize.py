"""`--quantize int8|int4`: the model quantized by ONNX Runtime's own quantizers, then optimized.

The export is quantized first and attnfuse then rewrites the quantized model, which is the original
it verifies against (by the twins, optimizer/twin.py) and rolls rewrites back against, the fp32
input being the reference whose error is reported. Quantizing attnfuse's output instead (with
quantize_dynamic's EnableSubgraph, which finds the MatMuls inside its If branches) writes the
same graph, as fast and as accurate (measured on all-MiniLM-L6-v2; README "Quantized models"),
but needs a second verification after the first and cannot roll back one rewrite.

- int8: quantize_dynamic, int8 weights per output channel (per tensor: sentence cosine 0.922
  against 0.988 on MiniLM), activations quantized per tensor at run time; MatMuls only, so that
  embedding tables stay float and still fuse into EmbedLayerNormalization.
- int4: MatMulNBitsQuantizer, 4-bit weights in blocks of 32 along K, symmetric; activations stay float.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from attnfuse.core.text_enum import TextEnum
from attnfuse.optimizer import io
from attnfuse.optimizer.errors import UserError, first_line
from attnfuse.passes.onnx.graph import nodes_on_one_path
from attnfuse.passes.onnx.quantized import MatMulCount, count_matmuls

INT4_BLOCK = 32
# What a user of quantize_dynamic passes for a model optimized by attnfuse: its MatMuls sit in If branches.
SUBGRAPH_OPTION = 'extra_options={"EnableSubgraph": True}'


class Quantization(TextEnum):
    INT8 = "int8"  # quantize_dynamic: int8 weights per channel, activations quantized per tensor at run time
    INT4 = "int4"  # MatMulNBitsQuantizer: 4-bit weights in blocks of 32, symmetric; activations stay float


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
    found = count_matmuls(list(model.graph.all_nodes()))
    if found.total_quantized:
        raise UserError(f"--quantize: the model is quantized already ({found.total_quantized} quantized MatMuls)")
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

    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True)
    quantizer = MatMulNBitsQuantizer(proto, block_size=INT4_BLOCK, is_symmetric=True, algo_config=config)
    quantizer.process()
    return quantizer.model.model


_QUANTIZERS = {Quantization.INT8: _int8, Quantization.INT4: _int4}


def padded_path_matmuls(model: ir.Model) -> MatMulCount:
    """The MatMuls a padded batch runs (If else-branches: padding-free's graph), quantized and float."""
    return count_matmuls(nodes_on_one_path(model.graph))


def unquantized_in_subgraphs(model: ir.Model) -> bool:
    """Float MatMuls with constant weights inside If branches or Loop bodies: where quantize_dynamic
    looks only with SUBGRAPH_OPTION."""
    inner = [node for graph in model.graphs() if graph is not model.graph for node in graph]
    return count_matmuls(inner).float_weights > 0
