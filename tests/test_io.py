"""Loading, atomic saving, external data and >2 GB models (attnfuse.optimizer.io).

Also home of `toy_attention_model`, the small graph the CLI and verify tests share.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from attnfuse.optimizer import io, optimize_onnx
from attnfuse.optimizer.errors import UserError
from attnfuse.optimizer.inputs import make_inputs
from attnfuse.optimizer.verify import compare
from attnfuse.tools.cli import main

HIDDEN, VOCAB = 8, 50


def toy_attention_model(batch: int | str = "batch", seq: int | str = "seq") -> onnx.ModelProto:
    """One head of BERT-style self-attention over an embedding, with a (1 - mask) * -10000 mask."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def node(op, inputs, output, **attrs):
        return helper.make_node(op, inputs, [output], **attrs)

    nodes = [
        node("Gather", ["embeddings", "input_ids"], "h"),
        node("MatMul", ["h", "wq"], "q"),
        node("MatMul", ["h", "wk"], "k"),
        node("MatMul", ["h", "wv"], "v"),
        node("Transpose", ["k"], "kt", perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], "scores"),
        node("Mul", ["scores", "scale"], "scaled"),
        node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT),
        node("Sub", ["one", "mask_f"], "inverted"),
        node("Mul", ["inverted", "minus_big"], "mask_bias"),
        node("Unsqueeze", ["mask_bias", "axis1"], "mask_b1s"),
        node("Add", ["scaled", "mask_b1s"], "masked"),
        node("Softmax", ["masked"], "probs", axis=-1),
        node("MatMul", ["probs", "v"], "last_hidden_state"),
    ]
    initializers = [
        weight("embeddings", VOCAB, HIDDEN),
        weight("wq", HIDDEN, HIDDEN),
        weight("wk", HIDDEN, HIDDEN),
        weight("wv", HIDDEN, HIDDEN),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [HIDDEN**-0.5]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("minus_big", TensorProto.FLOAT, [], [-10000.0]),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy_attention",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, seq]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [batch, seq, HIDDEN])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_with_external_data(proto: onnx.ModelProto, path: Path) -> Path:
    """Save with every weight in PATH.data; returns the data file."""
    onnx.save_model(proto, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path.with_name(path.name + ".data")


def run_ort(model: str | os.PathLike | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


# --- loading ---------------------------------------------------------------


def test_load_model_from_proto_and_path_agree(tmp_path):
    proto = toy_attention_model()
    onnx.save(proto, tmp_path / "m.onnx")
    from_path, from_proto = io.load_model(tmp_path / "m.onnx"), io.load_model(proto)
    assert [n.op_type for n in from_path.graph] == [n.op_type for n in from_proto.graph]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is a text file\n", "not an ONNX model or truncated"),
        (np.random.default_rng(1).bytes(4096), "not an ONNX model or truncated"),
        (b"", "not an ONNX model or truncated"),
    ],
    ids=["text", "random", "empty"],
)
def test_load_model_rejects_non_onnx(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        io.load_model(path)
    assert "bad.onnx" in str(error.value) and "\n" not in str(error.value)


def test_load_model_checks_external_data_length(tmp_path):
    data = save_with_external_data(toy_attention_model(), tmp_path / "m.onnx")
    data.write_bytes(data.read_bytes()[:-8])
    with pytest.raises(UserError, match="m.onnx.data is truncated"):
        io.load_model(tmp_path / "m.onnx")


# --- saving ----------------------------------------------------------------


def test_save_leaves_nothing_when_writing_fails(tmp_path, monkeypatch):
    model = io.load_model(toy_attention_model())

    def write_half_then_fail(model, path, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.ir, "save", write_half_then_fail)
    with pytest.raises(OSError):
        io.save_model(model, tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = io.load_model(toy_attention_model())
    io.save_model(model, tmp_path / "out.onnx")
    before = (tmp_path / "out.onnx").read_bytes()
    monkeypatch.setattr(io.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        io.save_model(model, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == before
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_save_keeps_external_data_external(tmp_path):
    save_with_external_data(toy_attention_model(), tmp_path / "in.onnx")
    (tmp_path / "out").mkdir()
    io.save_model(io.load_model(tmp_path / "in.onnx"), tmp_path / "out" / "m.onnx")
    assert sorted(os.listdir(tmp_path / "out")) == ["m.onnx", "m.onnx.data"]
    feeds = make_inputs(io.load_model(tmp_path / "in.onnx"), 2, 5, seed=0).feeds
    np.testing.assert_array_equal(run_ort(tmp_path / "out" / "m.onnx", feeds)[0], run_ort(toy_attention_model(), feeds)[0])


@pytest.mark.parametrize("target", ["missing-dir/out.onnx", "."], ids=["missing directory", "directory"])
def test_check_writable_rejects(tmp_path, target):
    with pytest.raises(UserError):
        io.check_writable(tmp_path / target)
    assert os.listdir(tmp_path) == []


# --- external data wherever ONNX allows it -----------------------------------


def optimum_style_model(path: Path) -> Path:
    """The toy model as Optimum writes a large export: wq and wk as Constant nodes, and every
    tensor, the Constants' values included, in PATH's folder/model.onnx_data. Returns that file."""
    proto = toy_attention_model()
    for name in ("wq", "wk"):
        tensor = next(t for t in proto.graph.initializer if t.name == name)
        proto.graph.initializer.remove(tensor)
        proto.graph.node.insert(0, helper.make_node("Constant", [], [name], value=tensor))
    onnx.save_model(proto, path, save_as_external_data=True, location="model.onnx_data", size_threshold=0,
                    convert_attribute=True)
    return path.with_name("model.onnx_data")


def if_branch_model(width: int = 32) -> onnx.ModelProto:
    """y = If(sum(x) > 0, then: x @ w_then + c_then, else: x @ w_else): w_then is an initializer of
    the then branch, c_then and w_else are Constant nodes inside the branches."""
    rng = np.random.default_rng(2)

    def array(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def constant(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))

    def output(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

    then_branch = helper.make_graph(
        [constant("c_then", array(width)), helper.make_node("MatMul", ["x", "w_then"], ["t"]),
         helper.make_node("Add", ["t", "c_then"], ["y_then"])],
        "then", [], [output("y_then")], [numpy_helper.from_array(array(width, width), "w_then")])
    else_branch = helper.make_graph(
        [constant("w_else", array(width, width)), helper.make_node("MatMul", ["x", "w_else"], ["y_else"])],
        "else", [], [output("y_else")])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes, "if_branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", width])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def external_locations(path: Path) -> dict[str, set[str]]:
    """{"initializer" / "attribute": the files the model's external tensors are in}, subgraphs included."""
    proto = onnx.load(path, load_external_data=False)
    found: dict[str, set[str]] = {"initializer": set(), "attribute": set()}

    def visit(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            found["initializer"] |= {e.value for e in tensor.external_data if e.key == "location"}
        for node in graph.node:
            for attribute in node.attribute:
                for tensor in [attribute.t] if attribute.HasField("t") else list(attribute.tensors):
                    found["attribute"] |= {e.value for e in tensor.external_data if e.key == "location"}
                for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    visit(subgraph)

    visit(proto.graph)
    return found


def assert_same_outputs(original: Path, optimized: Path, feeds: dict[str, np.ndarray], real=None) -> None:
    expected, got = run_ort(original, feeds), run_ort(optimized, feeds)
    _, max_rel = compare(dict(enumerate(expected)), dict(enumerate(got)), real)
    assert max_rel <= 1e-5


def test_optimum_style_external_constants_optimize_end_to_end(tmp_path, capsys):
    optimum_style_model(tmp_path / "model.onnx")
    assert external_locations(tmp_path / "model.onnx") == {"initializer": {"model.onnx_data"},
                                                           "attribute": {"model.onnx_data"}}
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "out.onnx"
    assert main(["optimize", str(tmp_path / "model.onnx"), "-o", str(out)]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == ["out.onnx", "out.onnx.data"]
    assert set().union(*external_locations(out).values()) <= {"out.onnx.data"}  # nothing points at the input's data
    for seed in range(3):
        inputs = make_inputs(io.load_model(tmp_path / "model.onnx"), batch=3, seqlen=7, seed=seed)
        assert_same_outputs(tmp_path / "model.onnx", out, inputs.feeds, inputs.real)


def test_constants_in_if_branches_with_external_data(tmp_path, capsys):
    onnx.save_model(if_branch_model(), tmp_path / "model.onnx", save_as_external_data=True,
                    location="model.onnx_data", size_threshold=0, convert_attribute=True)
    assert external_locations(tmp_path / "model.onnx")["attribute"] == {"model.onnx_data"}
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "out.onnx"
    assert main(["optimize", str(tmp_path / "model.onnx"), "-o", str(out)]) == 0, capsys.readouterr().err
    # the branches' 4 KB weights (an initializer and a Constant) went to the output's data file
    assert external_locations(out) == {"initializer": {"out.onnx.data"}, "attribute": {"out.onnx.data"}}
    x = np.random.default_rng(3).standard_normal((2, 5, 32)).astype(np.float32)
    for feeds in ({"x": np.abs(x)}, {"x": -np.abs(x)}):  # then, else
        assert_same_outputs(tmp_path / "model.onnx", out, feeds)


def test_several_data_files_of_any_name(tmp_path, capsys):
    proto = if_branch_model()
    # One file per tensor, named after it (w_then, c_then, w_else, ...), as onnx writes them.
    onnx.external_data_helper.convert_model_to_external_data(proto, all_tensors_to_one_file=False, size_threshold=0,
                                                             convert_attribute=True)
    onnx.save_model(proto, tmp_path / "model.onnx")
    assert len(set().union(*external_locations(tmp_path / "model.onnx").values())) >= 3
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(tmp_path / "model.onnx"), "-o", str(out)]) == 0, capsys.readouterr().err
    x = np.random.default_rng(4).standard_normal((3, 4, 32)).astype(np.float32)
    for feeds in ({"x": np.abs(x)}, {"x": -np.abs(x)}):
        assert_same_outputs(tmp_path / "model.onnx", out, feeds)


def _missing_data(folder: Path) -> str:
    optimum_style_model(folder / "model.onnx").unlink()
    return "external data file model.onnx_data not found"


def _truncated_data(folder: Path) -> str:
    data = optimum_style_model(folder / "model.onnx")
    data.write_bytes(data.read_bytes()[:100])
    return "external data file model.onnx_data is truncated"


def _data_outside_the_folder(folder: Path) -> str:
    proto = toy_attention_model()
    onnx.save_model(proto, folder / "model.onnx", save_as_external_data=True, location="model.onnx_data",
                    size_threshold=0)
    proto = onnx.load(folder / "model.onnx", load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../model.onnx_data"
    onnx.save(proto, folder / "model.onnx")
    return "external data location '../model.onnx_data' is outside the model's folder"


def _data_linked_from_outside(folder: Path) -> str:
    """As in a Hugging Face cache: the data file is a link to a blob in another folder."""
    data = optimum_style_model(folder / "model.onnx")
    data.rename(folder.parent / "blob")
    data.symlink_to(folder.parent / "blob")
    return "external data file model.onnx_data is a link to a file outside the model's folder"


def _data_hard_linked(folder: Path) -> str:
    os.link(optimum_style_model(folder / "model.onnx"), folder.parent / "backup")
    return "external data file model.onnx_data has 2 hard links"


@pytest.mark.parametrize(
    "make", [_missing_data, _truncated_data, _data_outside_the_folder, _data_linked_from_outside, _data_hard_linked],
    ids=["missing", "truncated", "outside the folder", "linked from outside", "hard linked"])
def test_bad_external_data_is_exit_1_naming_the_file(tmp_path, capsys, make):
    (tmp_path / "in").mkdir()
    message = make(tmp_path / "in")
    assert main(["optimize", str(tmp_path / "in" / "model.onnx"), "-o", str(tmp_path / "out.onnx")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "model.onnx" in err and message in err
    assert not (tmp_path / "out.onnx").exists()


def test_sessions_read_external_data_in_place(tmp_path, monkeypatch):
    """No temporary copy of the model: ONNX Runtime reads the original files."""
    optimum_style_model(tmp_path / "model.onnx")
    model = io.load_model(tmp_path / "model.onnx")

    def refuse(*args, **kwargs):
        raise AssertionError("a session wrote a temporary copy of the model")

    for name in ("mkdtemp", "mkstemp", "TemporaryDirectory", "NamedTemporaryFile"):
        monkeypatch.setattr(tempfile, name, refuse)
    inputs = make_inputs(model, batch=2, seqlen=5, seed=0)
    got = io.session(model, extra_outputs=["q"], optimize=False).run(None, inputs.feeds)
    expected = run_ort(toy_attention_model(), inputs.feeds)[0]
    np.testing.assert_allclose(got[0], expected, rtol=1e-6, atol=1e-6)


def test_weights_made_in_memory_reach_the_session(tmp_path):
    """A weight a pass made (in memory) next to weights in external data."""
    optimum_style_model(tmp_path / "model.onnx")
    model = io.load_model(tmp_path / "model.onnx")
    embeddings = model.graph.initializers["embeddings"]
    embeddings.const_value = ir.Tensor(embeddings.const_value.numpy() * 2, name="embeddings")
    inputs = make_inputs(model, batch=2, seqlen=5, seed=0)
    doubled = toy_attention_model()
    table = next(t for t in doubled.graph.initializer if t.name == "embeddings")
    table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table) * 2, "embeddings"))
    np.testing.assert_allclose(io.session(model).run(None, inputs.feeds)[0], run_ort(doubled, inputs.feeds)[0],
                               rtol=1e-6, atol=1e-6)


# Loads a model whose weights (WEIGHTS_MB of float32 MatMuls) are in external data, makes two sessions
# and runs each: prints the resident peak before the sessions and at the end, in MB.
_TWO_SESSIONS = """
import sys, numpy as np
from attnfuse.optimizer import io
def peak(): return int([l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]) / 1024
model = io.load_model(sys.argv[1])
before = peak()
x = np.ones((1, {width}), np.float32)
sessions = [io.session(model, optimize=optimize) for optimize in (False, True)]
for s in sessions:
    s.run(None, {{'x': x}})
print(before, peak())
"""


def test_sessions_share_the_weights(tmp_path):
    """Two sessions over 256 MB of external weights hold them once: the peak grows by about the
    weights, not twice them (ONNX Runtime's pre-packed copies, or a copy per session)."""
    width, layers = 4096, 4
    weights = np.random.default_rng(0).standard_normal((layers, width, width), dtype=np.float32) / 64
    weights.tofile(tmp_path / "weights.bin")
    initializers, nodes, x = [], [], "x"
    for i in range(layers):
        tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[width, width])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "weights.bin"), ("offset", str(i * weights[i].nbytes)),
                           ("length", str(weights[i].nbytes))):
            tensor.external_data.add(key=key, value=value)
        initializers.append(tensor)
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        x = f"h{i}"
    graph = helper.make_graph(nodes, "matmuls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    done = subprocess.run([sys.executable, "-c", _TWO_SESSIONS.format(width=width), str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, check=True)
    before, after = map(float, done.stdout.split())
    weights_mb = weights.nbytes / 2**20
    assert after - before < 1.3 * weights_mb, f"{after - before:.0f} MB for {weights_mb:.0f} MB of weights"


# --- over 2 GB -------------------------------------------------------------

BIG_ROWS, BIG_WIDTH = 4_500_000, 64  # 1.07 GiB of float32 per table, two tables


def big_model_on_disk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two 1.07 GiB embedding tables in a sparse PATH.data (zeros, written instantly) with a
    marked first and last row; returns (first row of table a, last row of table b)."""
    table_bytes = BIG_ROWS * BIG_WIDTH * 4
    first, last = np.arange(1, BIG_WIDTH + 1, dtype=np.float32), -np.arange(1, BIG_WIDTH + 1, dtype=np.float32)
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as f:
        f.truncate(2 * table_bytes)
        f.write(first.tobytes())
        f.seek(2 * table_bytes - last.nbytes)
        f.write(last.tobytes())

    def table(name, offset):
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[BIG_ROWS, BIG_WIDTH])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(table_bytes))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    bias = helper.make_tensor("bias", TensorProto.FLOAT, [BIG_WIDTH], np.linspace(-1, 1, BIG_WIDTH, dtype=np.float32))
    nodes = [
        helper.make_node("Gather", ["a", "input_ids"], ["ga"]),
        helper.make_node("Gather", ["b", "input_ids"], ["gb"]),
        helper.make_node("Add", ["ga", "gb"], ["sum"]),
        helper.make_node("Add", ["sum", "bias"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", BIG_WIDTH])],
        [table("a", 0), table("b", table_bytes), bias],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return first, last


def test_model_over_2gb_round_trips(tmp_path):
    first, last = big_model_on_disk(tmp_path / "big.onnx")
    model = io.load_model(tmp_path / "big.onnx")
    assert io.weight_bytes(model) > 2**31

    result = optimize_onnx(tmp_path / "big.onnx", verify=True)
    assert result.report.verify.ok
    (tmp_path / "out").mkdir()
    result.save(tmp_path / "out" / "big.onnx")

    assert sorted(os.listdir(tmp_path / "out")) == ["big.onnx", "big.onnx.data"]
    saved = io.load_model(tmp_path / "out" / "big.onnx")
    np.testing.assert_array_equal(saved.graph.initializers["a"].const_value.numpy()[0], first)
    np.testing.assert_array_equal(saved.graph.initializers["b"].const_value.numpy()[-1], last)
    feeds = {"input_ids": np.array([[0, 1, BIG_ROWS - 1]], dtype=np.int64)}
    out = run_ort(tmp_path / "out" / "big.onnx", feeds)[0]
    bias = np.linspace(-1, 1, BIG_WIDTH, dtype=np.float32)
    np.testing.assert_allclose(out[0], [first + bias, bias, last + bias])
