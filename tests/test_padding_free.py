"""Padding-free execution: the packed model equals the padded original on real tokens,
for every text family and every shape of mask, and padded positions come out zero."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import attnfuse
from attnfuse.models import zoo
from attnfuse.passes.onnx.padding_free import PER_SEQUENCE_WIDTH

TOLERANCE = 1e-4
TEXT_CASES = [c for c in zoo.ZOO if c.kind != "vision" and not (c.family == "bloom" and c.attention == "sdpa")]


def masks(seqlen: int = 10) -> dict[str, np.ndarray]:
    right = np.array([[1] * n + [0] * (seqlen - n) for n in (10, 6, 1, 8)])
    holes = np.ones((3, seqlen), np.int64)
    holes[0, [2, 5, 6]] = 0
    holes[1, 1::2] = 0
    holes[2, 9] = 0
    return {
        "right": right,
        "left": right[:, ::-1],
        "holes": holes,
        "batch-1": np.array([[1] * 7 + [0] * 3]),
        "length-1": np.array([[1] + [0] * 9, [0] * 9 + [1]]),
        "empty-row": np.array([[1] * 10, [0] * 10, [1] * 4 + [0] * 6]),
        "no-padding": np.ones((2, 10)),
        # PER_SEQUENCE_WIDTH tokens and more: attention runs one sequence at a time
        "wide": np.array([[1] * n + [0] * (40 - n) for n in (40, 17, 1, 0)]),
        "wide-left-holes": np.array([[0] * 5 + [1, 0] * 16 + [1] * 3, [0] * 38 + [1] * 2]),
    }


@pytest.fixture(scope="module", params=TEXT_CASES, ids=lambda c: c.id)
def optimized(request):
    case = request.param
    path = str(zoo.exported(case))
    result = attnfuse.optimize_onnx(path)
    padding_free = [f for f in result.report.fusions if f.op == "PaddingFree"]
    assert [f.fused for f in padding_free] == [True], padding_free
    proto = result.proto
    onnx.checker.check_model(proto)
    return case, ort.InferenceSession(path), ort.InferenceSession(proto.SerializeToString())


@pytest.mark.parametrize("kind", list(masks()))
def test_padding_free_equals_padded_original(optimized, kind):
    case, original, packed = optimized
    mask = masks()[kind].astype(np.int64)
    ids = np.random.default_rng(3).integers(2, zoo.VOCAB, mask.shape)
    feeds = {"input_ids": ids, "attention_mask": mask}
    expected, got = original.run(None, feeds)[0], packed.run(None, feeds)[0]
    real = mask.astype(bool)
    assert np.isfinite(got).all()
    error = np.abs(expected[real] - got[real]).max() / np.abs(expected[real]).max()
    assert error <= TOLERANCE
    assert not got[~real].any()  # padded positions are zero


def test_no_padding_free_flag_keeps_padded_layout():
    path = str(zoo.exported(zoo.ZooCase("bert", "dynamo", "sdpa")))
    on = attnfuse.optimize_onnx(path)
    off = attnfuse.optimize_onnx(path, padding_free=False)
    nonzeros = lambda r: sum(n.op_type == "NonZero" for n in r.model.graph.all_nodes())  # noqa: E731
    assert nonzeros(on) == 2 and nonzeros(off) == 0  # the real tokens, once; the rows that have any
    assert not any(f.op == "PaddingFree" for f in off.report.fusions)


@pytest.fixture(scope="module")
def bert():
    path = str(zoo.exported(zoo.ZooCase("bert", "dynamo", "sdpa")))
    return path, attnfuse.optimize_onnx(path)


def test_batches_without_padding_take_the_fused_graph(bert):
    """If(no padding) the fused graph, its key-padding masks dropped, else the padding-free one;
    both read the same weights."""
    path, result = bert
    (branch,) = [node for node in result.model.graph if node.op_type == "If"]
    unpadded, packed = (branch.attributes[name].as_graph() for name in ("then_branch", "else_branch"))
    ops = lambda graph: collections.Counter(node.op_type for node in graph)  # noqa: E731
    assert ops(unpadded)["NonZero"] == 0 and ops(packed)["NonZero"] == 2
    # packed: each attention one sequence at a time (a Loop), or on the padded layout when rows are short
    assert ops(unpadded)["MultiHeadAttention"] == ops(packed)["If"] == 2
    assert collections.Counter(node.op_type for node in packed.all_nodes())["Loop"] == 2
    attention = lambda nodes: [n for n in nodes if n.op_type == "MultiHeadAttention"]  # noqa: E731
    has_mask = lambda node: len(node.inputs) > 4 and node.inputs[4] is not None  # noqa: E731
    assert not any(has_mask(node) for node in attention(unpadded))
    assert [has_mask(node) for node in attention(packed.all_nodes())] == \
        [node.graph.name.endswith("padded_layout") for node in attention(packed.all_nodes())] == [False, True] * 2
    assert all(has_mask(node) for node in attention(attnfuse.optimize_onnx(path, padding_free=False).model.graph))
    weight_bytes = lambda r: sum(v.const_value.nbytes for v in r.model.graph.initializers.values())  # noqa: E731
    assert weight_bytes(result) <= weight_bytes(attnfuse.optimize_onnx(path, padding_free=False))  # none copied
    assert result.report.fused_ops["MultiHeadAttention"] == 2  # the ops a padded batch runs


def test_the_branch_follows_the_padding(bert):
    """With the unpadded branch's output zeroed, a full batch comes out zero and a padded one does not."""
    path, result = bert
    proto = result.proto
    (branch,) = [node for node in proto.graph.node if node.op_type == "If"]
    unpadded = next(a.g for a in branch.attribute if a.name == "then_branch")
    out = unpadded.output[0].name
    unpadded.node.extend([helper.make_node("Constant", [], ["zero"], value_float=0.0),
                          helper.make_node("Mul", [out, "zero"], ["zeroed"])])
    unpadded.output[0].name = "zeroed"
    session = ort.InferenceSession(proto.SerializeToString())
    for mask, zeroed in ((np.ones((2, 10)), True), (masks()["right"], False)):
        feeds = {"input_ids": np.full(mask.shape, 5), "attention_mask": mask.astype(np.int64)}
        got = session.run(None, feeds)[0][mask.astype(bool)]
        assert (not got.any()) == zeroed


def test_a_batch_with_no_real_token_comes_out_zero(optimized):
    """No sequence to attend to: the per-sequence attention runs zero times, and nothing fails."""
    case, _, packed = optimized
    mask = np.zeros((2, 6), np.int64)
    got = packed.run(None, {"input_ids": np.full(mask.shape, 5), "attention_mask": mask})[0]
    assert got.shape[:2] == mask.shape and not got.any()


def test_runs_without_warnings(bert, capfd):
    """Packed values must not keep the padded shapes the exporter annotated: ONNX Runtime plans
    buffer reuse by them and warns at every run when they do not fit."""
    _, result = bert
    session = ort.InferenceSession(result.proto.SerializeToString())  # default logging: warnings shown
    for mask in (masks()["right"], masks()["holes"]):
        session.run(None, {"input_ids": np.full(mask.shape, 5), "attention_mask": mask.astype(np.int64)})
    assert "W:onnxruntime" not in capfd.readouterr().err


def test_wide_batches_attend_one_sequence_at_a_time(bert):
    """With the per-sequence alternative's output zeroed, a batch PER_SEQUENCE_WIDTH tokens wide
    changes and a narrower one does not."""
    path, result = bert
    proto = result.proto
    (branch,) = [node for node in proto.graph.node if node.op_type == "If"]
    packed = next(a.g for a in branch.attribute if a.name == "else_branch")
    for node in (n for n in packed.node if n.op_type == "If"):
        per_sequence = next(a.g for a in node.attribute if a.name == "then_branch")
        out = per_sequence.output[0].name
        per_sequence.node.extend([helper.make_node("Constant", [], [f"{out}/zero"], value_float=0.0),
                                  helper.make_node("Mul", [out, f"{out}/zero"], [f"{out}/zeroed"])])
        per_sequence.output[0].name = f"{out}/zeroed"
    original, zeroed = ort.InferenceSession(path), ort.InferenceSession(proto.SerializeToString())
    for width, changed in ((PER_SEQUENCE_WIDTH, True), (PER_SEQUENCE_WIDTH - 1, False)):
        mask = np.array([[1] * width, [1] * (width // 2) + [0] * (width - width // 2)])
        feeds = {"input_ids": np.full(mask.shape, 5), "attention_mask": mask}
        real = mask.astype(bool)
        error = np.abs(original.run(None, feeds)[0][real] - zeroed.run(None, feeds)[0][real]).max()
        assert (error > 1e-3) == changed
