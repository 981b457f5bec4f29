"""Every attention site of 32 exports (8 families x 2 exporters x eager/SDPA) and of the
real MiniLM is fused, and the optimized model computes what the original computes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import attnfuse
from attnfuse.models import minilm, zoo

TOLERANCE = 1e-4


def run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def relative_error(expected: np.ndarray, got: np.ndarray, real: np.ndarray | None) -> float:
    if real is not None:
        expected, got = expected[real], got[real]
    return float(np.abs(expected - got).max() / np.abs(expected).max())


def softmax_count(path: str) -> int:
    return sum(node.op_type == "Softmax" for node in onnx.load(path, load_external_data=False).graph.node)


def padded_feeds(case: zoo.ZooCase) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """A batch the verifier did not generate: 4 rows of lengths 11, 6, 1 and 9."""
    inputs = zoo.example_inputs(case.family, batch=4, seqlen=11, seed=7, lengths=[11, 6, 1, 9])
    feeds = {name: tensor.numpy() for name, tensor in inputs.items()}
    real = feeds["attention_mask"].astype(bool) if "attention_mask" in feeds else None
    return feeds, real


@pytest.mark.parametrize("case", zoo.ZOO, ids=lambda case: case.id)
def test_zoo_attention_fused_and_equal(case):
    path = str(zoo.exported(case))
    result = attnfuse.optimize_onnx(path)
    report = result.report

    sites = softmax_count(path)
    assert sites >= 2
    assert report.attention_total == sites
    assert report.attention_fused == sites, [s.reason for s in report.sites if not s.fused]
    assert report.fused_ops.get("MultiHeadAttention") == sites
    assert not any(node.op_type == "Softmax" for node in result.model.graph.all_nodes())
    assert report.verify.ok

    feeds, real = padded_feeds(case)
    error = relative_error(run(path, feeds), run(result.proto, feeds), real)
    assert error <= TOLERANCE
    assert_nothing_left_unfused(result.model.graph)


def assert_nothing_left_unfused(graph) -> None:
    """No layernorm still reads a residual sum (each layer's second one reads the first's fused
    output), no attention input is still a separate bias add, and no node computes for nothing."""
    def is_residual_sum(value) -> bool:
        node = value.producer()
        return node is not None and node.op_type == "Add" and all(x.const_value is None and op_of(x) != "Constant"
                                                                   for x in node.inputs)

    def is_bias_add(value) -> bool:
        node = value.producer()
        return node is not None and node.op_type == "Add" and any(x.const_value is not None for x in node.inputs)

    def op_of(value):
        return value.producer().op_type if value.producer() is not None else None

    for node in graph.all_nodes():
        if node.op_type == "LayerNormalization":
            assert not is_residual_sum(node.inputs[0]), node.name
        if node.op_type == "MultiHeadAttention":
            assert not any(is_bias_add(x) for x in node.inputs[:3] if x is not None), node.name
        assert any(out.uses() or out.is_graph_output() for out in node.outputs), f"dead {node.op_type} {node.name}"


@pytest.mark.parametrize("case", zoo.ZOO, ids=lambda case: case.id)
def test_zoo_masks_are_recognised(case):
    """What the report says of each site is what the family's attention is."""
    report = attnfuse.inspect_onnx(str(zoo.exported(case)))
    expected_mask = {"encoder": "key_padding", "decoder": "causal+key_padding", "vision": "none"}[case.kind]
    expected_bias = "alibi" if case.family == "bloom" else "none"
    for site in report.sites:
        assert (site.mask, site.bias, site.num_heads, site.head_size) == (expected_mask, expected_bias, 4, 16)
        assert site.causal == (case.kind == "decoder")
        assert site.scale == pytest.approx(16 ** -0.5)


@pytest.fixture(scope="module")
def minilm_path() -> str:
    return str(minilm.exported())


def test_minilm_fused_and_equal(minilm_path):
    result = attnfuse.optimize_onnx(minilm_path)
    assert result.report.attention_total == result.report.attention_fused == 6
    assert all((s.num_heads, s.head_size, s.mask) == (12, 32, "key_padding") for s in result.report.sites)
    feeds = minilm.tokenize(minilm.SENTENCES[:8])
    real = feeds["attention_mask"].astype(bool)
    assert not real.all()  # the batch is padded
    error = relative_error(run(minilm_path, feeds), run(result.proto, feeds), real)
    assert error <= TOLERANCE
    assert_nothing_left_unfused(result.model.graph)
    assert result.report.fused_ops.get("SkipLayerNormalization") == 12  # both layernorms of every layer
