"""Reading and writing ONNX models, and running them in ONNX Runtime.

Models are held as `onnx_ir.Model`s: weights stored as external data stay on disk
(memory-mapped) until something reads them, so models over the 2 GB protobuf limit
work as long as no one serialises them into a single proto.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort
from google.protobuf.message import DecodeError

from attnfuse.optimizer.errors import UserError, first_line

# Above this many bytes of weights a model is written with external data: the
# protobuf limit is 2 GB and the graph itself needs some room.
LARGE_MODEL_BYTES = int(1.5 * 2**30)
# Weights this small stay inside the .onnx file even when the others go to external data.
INLINE_BYTES = 1024


# --- loading ---------------------------------------------------------------


def load_model(src: str | os.PathLike | onnx.ModelProto) -> ir.Model:
    """Load a model from a path or a ModelProto; any unusable input raises UserError.

    Every value and node gets a name of its own across the model and its subgraphs (the
    passes and the probe know them by name)."""
    if isinstance(src, onnx.ModelProto):
        _check_structure(src, "the given ModelProto")
        return _named(ir.serde.deserialize_model(src))
    if not isinstance(src, (str, os.PathLike)):
        raise UserError(f"expected a path or an onnx.ModelProto, got {type(src).__name__}")
    path = Path(src)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not an ONNX file")
    try:
        # The IR memory-maps external data itself; onnx must not load it.
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise UserError(f"{path}: not an ONNX model or truncated ({first_line(e)})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    _check_structure(proto, str(path))
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    _check_external_data(model, path)
    return _named(model)


def _check_structure(proto: onnx.ModelProto, name: str) -> None:
    # Protobuf happily parses some garbage, and a file cut at a field boundary.
    if not (proto.ir_version > 0 and proto.HasField("graph") and proto.opset_import and proto.graph.output):
        raise UserError(f"{name}: not an ONNX model or truncated (no graph, opset or outputs)")
    _check_defined(proto.graph, set(), name)


def _check_defined(graph: onnx.GraphProto, outer: set[str], name: str) -> None:
    """Every tensor a node or output reads is an input, a weight, a node's output, or from an outer graph."""
    known = outer | {v.name for v in graph.input} | {t.name for t in graph.initializer} \
        | {t.values.name for t in graph.sparse_initializer} | {out for node in graph.node for out in node.output}
    for node in graph.node:
        for tensor in node.input:
            if tensor and tensor not in known:
                raise UserError(f"{name}: node {node.name or node.op_type!r} ({node.op_type}) reads tensor "
                                f"{tensor!r}, which no input, weight or node defines")
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                _check_defined(subgraph, known, name)
    for output in graph.output:
        if output.name not in known:
            raise UserError(f"{name}: graph output {output.name!r} is not computed by any node")


def _named(model: ir.Model) -> ir.Model:
    """Give every node and value a name unique in the whole model (subgraphs included): the
    probe and the passes know values by name, and sibling If branches may reuse names.
    The model's own inputs, outputs and weights keep theirs."""
    taken: set[str] = set()
    seen: set[int] = set()

    def rename(value_or_node, hint: str) -> None:
        if id(value_or_node) in seen:  # an initializer also listed as an input
            return
        seen.add(id(value_or_node))
        base = value_or_node.name or hint
        name, counter = base, 0
        while name in taken:
            counter += 1
            name = f"{base}__{counter}"
        taken.add(name)
        if name != value_or_node.name:
            value_or_node.name = name

    for graph in model.graphs():
        for value in [*graph.inputs, *graph.initializers.values()]:
            rename(value, "input")
    for graph in model.graphs():
        for node in graph:
            rename(node, node.op_type)
            for out in node.outputs:
                if out.name:  # an empty name is an output the node does not produce
                    rename(out, f"{node.name}_out")
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    for tensor in external_tensors(model):
        data = Path(tensor.path)
        if not data.is_file():
            raise UserError(f"{path}: external data file {tensor.location} not found next to the model")
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if data.stat().st_size < end:
            raise UserError(f"{path}: external data file {tensor.location} is truncated")


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for value in _initializers(model):
        if isinstance(value.const_value, ir.ExternalTensor):
            yield value.const_value


def _initializers(model: ir.Model) -> Iterator[ir.Value]:
    for graph in model.graphs():
        yield from graph.initializers.values()


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in _initializers(model) if v.const_value is not None)


def is_large(model: ir.Model) -> bool:
    return weight_bytes(model) > LARGE_MODEL_BYTES


def needs_external_data(model: ir.Model) -> bool:
    """Large models, and models whose weights came from external data, keep them outside."""
    return is_large(model) or any(True for _ in external_tensors(model))


# --- saving ----------------------------------------------------------------


def check_writable(path: str | os.PathLike) -> None:
    """Raise UserError unless a file can be created at `path` (checked by creating one)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{path}: directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def external_data_name(path: str | os.PathLike) -> str:
    """The weights of OUT.onnx go to OUT.onnx.data, next to it."""
    return Path(path).name + ".data"


def save_model(model: ir.Model, path: str | os.PathLike) -> None:
    """Write `model` to `path` whole or not at all (and its weights to PATH.data when needed).

    Everything is written into a temporary directory beside `path` and then renamed
    into place, so a failure leaves neither a half-written file nor a temporary one.
    """
    path = Path(path)
    check_writable(path)
    data_name = external_data_name(path) if needs_external_data(model) else None
    with _staging_dir(path) as staging:
        _write(model, staging / path.name, data_name)
        if data_name:
            # Weights first: the model file that refers to them appears last.
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staging / path.name, path)


def _write(model: ir.Model, file: Path, data_name: str | None) -> None:
    if data_name is None:
        ir.save(model, file)
        return
    # ir.save reads small external weights into memory and closes their files, which
    # fails while anyone holds a view of them: hand it copies instead.
    model = _weights_in_memory(model, up_to_bytes=INLINE_BYTES)
    ir.save(model, file, external_data=data_name, size_threshold_bytes=INLINE_BYTES)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (the JSON report)."""
    path = Path(path)
    check_writable(path)
    with _staging_dir(path) as staging:
        (staging / path.name).write_text(text)
        os.replace(staging / path.name, path)


@contextlib.contextmanager
def _staging_dir(path: Path) -> Iterator[Path]:
    # Same directory as the target, so that os.replace is a rename, not a copy.
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- running ---------------------------------------------------------------


def session(
    model: ir.Model,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    extra_outputs: Iterable[str] | None = None,
    optimize: bool = True,
) -> ort.InferenceSession:
    """An ONNX Runtime session for `model`, which is left unchanged.

    `extra_outputs` names values of the main graph to return besides the outputs;
    `optimize=False` turns ONNX Runtime's own graph optimizations off.
    """
    if extra_outputs:
        model = _with_outputs(model, extra_outputs)
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not is_large(model):
        return ort.InferenceSession(to_proto(model).SerializeToString(), options, providers=list(providers))
    # Over the protobuf limit: go through a file with external data.
    with tempfile.TemporaryDirectory(prefix="attnfuse-") as tmp:
        file = Path(tmp) / "model.onnx"
        _write(model, file, external_data_name(file))
        return ort.InferenceSession(str(file), options, providers=list(providers))


def _with_outputs(model: ir.Model, names: Iterable[str]) -> ir.Model:
    copy = model.clone()  # shares the weights
    values = {v.name: v for node in copy.graph for v in node.outputs}
    present = {v.name for v in copy.graph.outputs}
    copy.graph.outputs.extend(values[n] for n in dict.fromkeys(names) if n in values and n not in present)
    return copy


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """A self-contained ModelProto (external weights read in); only for models under 2 GB."""
    if is_large(model):
        raise ValueError("the model is over 2 GB and cannot be one ModelProto; save it to a file instead")
    return ir.to_proto(_weights_in_memory(model))


def _weights_in_memory(model: ir.Model, up_to_bytes: int | None = None) -> ir.Model:
    """A copy of `model` whose external weights (all, or those up to a size) are read into memory."""
    copy = model.clone()
    for value in _initializers(copy):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and (up_to_bytes is None or tensor.nbytes <= up_to_bytes):
            value.const_value = ir.Tensor(tensor.numpy().copy(), name=value.name, dtype=tensor.dtype)
    return copy

