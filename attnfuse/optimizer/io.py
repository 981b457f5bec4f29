"""Reading and writing ONNX models, and running them in ONNX Runtime.

Models are held as `onnx_ir.Model`s: weights stored as external data stay on disk
(memory-mapped) until something reads them, so models over the 2 GB protobuf limit
work as long as no one serialises them into a single proto.

External data may hold any tensor ONNX lets it hold: initializers and nodes' tensor
attributes (a Constant's value), in the main graph and in subgraphs, in files of any
name, several files to a model. Loading checks every such file; sessions read the
weights where they lie (see `session`); saving writes them all to OUT.onnx.data.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
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
        model = ir.serde.deserialize_model(src)
        _check_external_data(model, "the given ModelProto (its external data is read from the current directory)")
        return _named(_sorted(model))
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
    for tensor in external_tensors(model):  # functions' tensors too, which ir.external_data.set_base_dir skips
        tensor.base_dir = path.parent
    _check_external_data(model, str(path))
    return _named(_sorted(model))


# Ops whose meaning changed after opset 18 (GroupNormalization 21, GridSample 20, DFT 20): a model with one
# is converted by onnx's version converter; any other model of opset 18 on reads the same at a later opset.
_CHANGED_AFTER_18 = frozenset({"GroupNormalization", "GridSample", "DFT"})


def with_opset(model: ir.Model, version: int) -> ir.Model:
    """`model` in `version` of the ONNX domain or later (a copy that shares the weights, where it was earlier):
    its opset raised where its ops read the same there, else converted by onnx's version converter."""
    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    if current >= version:
        return model
    if current >= 18 and not any(node.op_type in _CHANGED_AFTER_18 for node in model.graph.all_nodes()):
        copy = model.clone()
        copy.opset_imports.pop("ai.onnx", None)
        copy.opset_imports[""] = version
        return copy
    try:
        converted = onnx.version_converter.convert_version(to_proto(model), version)
    except Exception as e:
        raise UserError(f"the model's opset {current} could not be converted to opset {version}, which the target "
                        f"needs: {first_line(e)}") from None
    return load_model(converted)


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


def _sorted(model: ir.Model) -> ir.Model:
    """Every graph's nodes in an order where each reads only values made before it. ONNX Runtime sorts a
    graph itself, so files come out of order (onnxconverter's float16 conversion with keep_io_types appends
    its casts of the inputs last); the passes and copies of the model need the order."""
    for graph in model.graphs():
        graph.sort()
    return model


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


def _check_external_data(model: ir.Model, name: str) -> None:
    """Every external tensor's file is inside the model's folder, readable and long enough."""
    for tensor in external_tensors(model):
        problem = _external_data_problem(tensor)
        if problem:
            raise UserError(f"{name}: external data {problem}")


def _external_data_problem(tensor: ir.ExternalTensor) -> str | None:
    location = os.fspath(tensor.location)
    if os.path.isabs(location) or os.path.normpath(location).split(os.sep)[0] == os.pardir:
        return f"location {location!r} is outside the model's folder"
    data = Path(tensor.path)
    if not data.is_file():
        return f"file {location} not found next to the model"
    if tensor.base_dir:  # onnx_ir checks links only for files read from a folder; so do we
        problem = _link_problem(data, Path(tensor.base_dir), location)
        if problem:
            return problem
    end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
    if data.stat().st_size < end:
        return f"file {location} is truncated ({data.stat().st_size} bytes, tensor {tensor.name!r} ends at {end})"
    return None


def _link_problem(data: Path, folder: Path, location: str) -> str | None:
    """The rules onnx_ir reads weights by (ONNX Runtime keeps the first too), said at load in one
    line, rather than as an error from deep inside the first pass that reads the weight."""
    if not data.resolve().is_relative_to(folder.resolve()):
        return f"file {location} is a link to a file outside the model's folder"
    if data.stat().st_nlink > 1:
        return (f"file {location} has {data.stat().st_nlink} hard links, and onnx_ir, which attnfuse reads "
                f"weights with, refuses such files; copy it")
    return None


# --- tensors, wherever the model holds them ----------------------------------

# Puts a tensor in the place another one was taken from (an initializer, an attribute).
Put = Callable[[ir.TensorProtocol], None]


def tensor_slots(model: ir.Model) -> Iterator[tuple[ir.TensorProtocol, Put]]:
    """Every tensor of `model` (initializers and nodes' tensor attributes, subgraphs included)
    with a function that puts another tensor in its place."""
    for graph in _all_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value, _initializer_put(value)
        for node in graph:
            for attribute in list(node.attributes.values()):
                if attribute.is_ref() or attribute.value is None:
                    continue
                if attribute.type == ir.AttributeType.TENSOR:
                    yield attribute.value, _attribute_put(node, attribute.name)
                elif attribute.type == ir.AttributeType.TENSORS:
                    for index, tensor in enumerate(attribute.value):
                        yield tensor, _attribute_put(node, attribute.name, index)


def _all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, its subgraphs, and the graphs of the model's functions and their subgraphs."""
    yield from model.graphs()
    for function in model.functions.values():
        yield function.graph
        yield from function.graph.subgraphs()


def _initializer_put(value: ir.Value) -> Put:
    def put(tensor: ir.TensorProtocol) -> None:
        value.const_value = tensor
    return put


def _attribute_put(node: ir.Node, name: str, index: int | None = None) -> Put:
    def put(tensor: ir.TensorProtocol) -> None:
        if index is None:
            node.attributes[name] = ir.AttrTensor(name, tensor)
        else:  # read the list when putting: earlier puts into it must stay
            tensors = list(node.attributes[name].value)
            tensors[index] = tensor
            node.attributes[name] = ir.AttrTensors(name, tensors)
    return put


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for tensor, _ in tensor_slots(model):
        if isinstance(tensor, ir.ExternalTensor):
            yield tensor


def weight_bytes(model: ir.Model) -> int:
    return sum(tensor.nbytes for tensor, _ in tensor_slots(model))


def is_large(model: ir.Model) -> bool:
    return weight_bytes(model) > LARGE_MODEL_BYTES


def needs_external_data(model: ir.Model) -> bool:
    """Large models, and models whose weights came from external data, keep them outside."""
    return is_large(model) or any(True for _ in external_tensors(model))


def _in_memory(tensor: ir.TensorProtocol) -> ir.Tensor:
    """A copy of `tensor` in memory. The file stays open: closing it (ExternalTensor.release)
    fails while anyone, an ONNX Runtime session for one, holds a view of it."""
    return ir.Tensor(np.array(tensor.numpy()), name=tensor.name, dtype=tensor.dtype)


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
    ir.save(_weights_written(model, file.parent, data_name), file)


def _weights_written(model: ir.Model, folder: Path, data_name: str) -> ir.Model:
    """A copy of `model` whose tensors over INLINE_BYTES, wherever they are (initializers,
    attributes, subgraphs), are written to folder/data_name, and whose other tensors are in memory.
    (ir.save's own external data takes initializers only, and would leave an attribute pointing
    at the input's data file.)"""
    copy = model.clone()  # shares the tensors
    large: dict[int, tuple[ir.TensorProtocol, list[Put]]] = {}
    for tensor, put in list(tensor_slots(copy)):
        if tensor.nbytes > INLINE_BYTES:
            large.setdefault(id(tensor), (tensor, []))[1].append(put)  # a tensor used twice is written once
        elif isinstance(tensor, ir.ExternalTensor):
            put(_in_memory(tensor))
    written = ir.external_data.convert_tensors_to_external(
        [tensor for tensor, _ in large.values()], base_dir=folder, relative_path=data_name)
    for (_, puts), external in zip(large.values(), written):
        for put in puts:
            put(external)
    return copy


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


# ONNX Runtime reads the external data of a model given as bytes from this folder.
_DATA_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
# numpy dtypes that ONNX Runtime takes as they are (no ml_dtypes) for an OrtValue over the weights.
_SHAREABLE = frozenset({
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BOOL,
    ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
    ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
})
_IN_MEMORY = "attnfuse-in-memory"  # the location of a weight that ONNX Runtime is handed directly


def session(
    model: ir.Model,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    extra_outputs: Iterable[str] | None = None,
    optimize: bool = True,
    config: Mapping[str, str] | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session for `model`, which is left unchanged.

    `extra_outputs` names values of the main graph to return besides the outputs;
    `optimize=False` turns ONNX Runtime's own graph optimizations off; `config`: session config entries.

    A model with external data, or a large one, is never written anywhere: see `_session_in_place`.
    """
    if extra_outputs:
        model = _with_outputs(model, extra_outputs)
    options = ort.SessionOptions()
    # Threads that spin after a run take the cores the next session (or the next evaluation) needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 4  # what ONNX Runtime logs of a run attnfuse checks, it reports itself, in one line
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not needs_external_data(model):
        return ort.InferenceSession(to_proto(model).SerializeToString(), options, providers=list(providers))
    return _session_in_place(model, options, list(providers))


def _session_in_place(model: ir.Model, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """A session that reads the weights where they are, from a graph proto without them.

    - The main graph's weights in external data are handed to ONNX Runtime as OrtValues over
      onnx_ir's memory maps of the files (CPU sessions): every session of the model, and
      attnfuse's own reads, share one mapping, and nothing is copied; ONNX Runtime's
      pre-packing, which would copy each weight again per session, is off.
    - Weights in memory over INLINE_BYTES go as OrtValues too (ONNX Runtime copies them, once),
      so that the graph proto stays small whatever the passes made.
    - Every other external tensor (a Constant's value, a subgraph's weight, weights of a CUDA
      session) stays a reference that ONNX Runtime reads itself from the model's folder.
    """
    copy = model.clone()  # shares the tensors
    folder = _single_data_folder(copy)
    buffers: list[ort.OrtValue] = []
    if providers == ["CPUExecutionProvider"]:
        shared = _share_external_weights(copy, options)
        buffers.extend(shared)
        if shared:
            options.add_session_config_entry("session.disable_prepacking", "1")
    buffers.extend(_hand_over_weights_in_memory(copy, options))
    if folder is not None:
        options.add_session_config_entry(_DATA_FOLDER_KEY, str(folder))
    runner = ort.InferenceSession(ir.to_proto(copy).SerializeToString(), options, providers=providers)
    # ONNX Runtime reads these buffers for as long as the session lives, and does not keep them alive itself.
    runner._attnfuse_buffers = buffers
    return runner


def _single_data_folder(model: ir.Model) -> Path | None:
    """The folder of the model's external data. Tensors from another folder (a model put together
    from two) are read into memory: ONNX Runtime reads external data from one folder only."""
    folder = None
    for tensor, put in list(tensor_slots(model)):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        here = Path(os.path.abspath(tensor.base_dir or "."))
        folder = folder or here
        if here != folder:
            put(_in_memory(tensor))
    return folder


def _share_external_weights(model: ir.Model, options: ort.SessionOptions) -> list[ort.OrtValue]:
    """Hand the main graph's external weights to ONNX Runtime as OrtValues over their memory maps.
    The proto keeps their references (ONNX Runtime checks that the file is there, and reads nothing)."""
    shared = []
    for value in model.graph.initializers.values():
        array = _mapped_weight(value)
        if array is not None:
            shared.append(ort.OrtValue.ortvalue_from_numpy(array))
            options.add_initializer(value.name, shared[-1])
    return shared


def _mapped_weight(value: ir.Value) -> np.ndarray | None:
    """The memory-mapped array of an external weight that ONNX Runtime can take as it is, or None."""
    tensor = value.const_value
    if (not isinstance(tensor, ir.ExternalTensor) or tensor.nbytes <= INLINE_BYTES or tensor.dtype not in _SHAREABLE
            or value.is_graph_input()):  # a weight the caller may feed is not ONNX Runtime's to share
        return None
    array = tensor.numpy()
    return array if array.flags.aligned else None  # a file packed without alignment: ONNX Runtime reads it


def _hand_over_weights_in_memory(model: ir.Model, options: ort.SessionOptions) -> list[ort.OrtValue]:
    """The main graph's weights in memory over INLINE_BYTES, given to ONNX Runtime beside the proto."""
    names, ort_values = [], []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if (tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes <= INLINE_BYTES
                or tensor.dtype not in _SHAREABLE or value.is_graph_input()):
            continue
        names.append(value.name)
        ort_values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor.numpy())))
        # ONNX Runtime takes such a weight's data from the OrtValue; the proto only says its type and shape.
        value.const_value = ir.ExternalTensor(_IN_MEMORY, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                              name=value.name)
    if names:
        options.add_external_initializers(names, ort_values)
    return ort_values


def _with_outputs(model: ir.Model, names: Iterable[str]) -> ir.Model:
    copy = model.clone()  # shares the weights
    values = {v.name: v for node in copy.graph for v in node.outputs}
    present = {v.name for v in copy.graph.outputs}
    copy.graph.outputs.extend(values[n] for n in dict.fromkeys(names) if n in values and n not in present)
    return copy


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """A self-contained ModelProto (external tensors read in); only for models under 2 GB."""
    if is_large(model):
        raise ValueError("the model is over 2 GB and cannot be one ModelProto; save it to a file instead")
    copy = model.clone()  # shares the tensors
    for tensor, put in list(tensor_slots(copy)):
        if isinstance(tensor, ir.ExternalTensor):
            put(_in_memory(tensor))
    return ir.to_proto(copy)
