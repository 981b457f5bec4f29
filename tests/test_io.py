"""Loading, atomic saving and >2 GB models (attnfuse.optimizer.io).

Also home of `toy_attention_model`, the small graph the CLI and verify tests share.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from attnfuse.optimizer import io, optimize_onnx
from attnfuse.optimizer.errors import UserError
from attnfuse.optimizer.inputs import make_inputs

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
