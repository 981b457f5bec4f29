"""Exact sparse substitutions: a banded mask becomes windowed attention, a causal window
(Mistral's) too, ALiBi is read as slopes; all equal the original."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import attnfuse
from attnfuse.kernels.reference import alibi_slopes
from attnfuse.models import sparse

TOLERANCE = 1e-4


def run(model, feeds):
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def padded(batch_lengths, seqlen, seed=5):
    inputs = sparse.example_inputs(len(batch_lengths), seqlen, seed=seed, lengths=batch_lengths)
    return {name: tensor.numpy() for name, tensor in inputs.items()}


@pytest.mark.parametrize("name, window, causal", [("banded_encoder", (4, 4), False),
                                                  ("causal_window_decoder", (4, 0), True)])
def test_band_becomes_windowed_attention(name, window, causal):
    path = str(sparse.exported(name))
    result = attnfuse.optimize_onnx(path)
    assert result.report.attention_fused == result.report.attention_total == 2
    for site in result.report.sites:
        assert (site.mask, tuple(site.window), site.causal) == ("window", window, causal)
    for node in result.model.graph.all_nodes():
        if node.op_type == "MultiHeadAttention":  # over blocks: keys are each block's neighbours, never all keys
            keys = node.inputs[1].producer()
            assert keys.op_type == "Reshape" and keys.inputs[0].producer().op_type == "Gather"
    for lengths in ([30, 17, 1], [30, 30]):  # longer than anything the verifier saw; padded and not
        feeds = padded(lengths, 30)
        real = feeds["attention_mask"].astype(bool)
        expected, got = run(path, feeds), run(result.proto, feeds)
        assert np.abs(expected - got)[real].max() / np.abs(expected[real]).max() <= TOLERANCE


def test_band_matters():
    """The banded model really is banded: with the band gone, outputs differ."""
    feeds = padded([20, 20], 20)
    banded = sparse.banded_encoder()
    dense = sparse.banded_encoder()
    dense.window = 0
    import torch
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        assert not torch.allclose(banded(**inputs), dense(**inputs), atol=1e-3)


def test_alibi_read_as_slopes_and_equal():
    path = str(sparse.exported("alibi_encoder"))
    result = attnfuse.optimize_onnx(path)
    for site in result.report.sites:
        assert site.fused and site.bias == "alibi"
        np.testing.assert_allclose(site.alibi_slopes, alibi_slopes(4).numpy(), rtol=1e-4)
    feeds = padded([25, 9, 1], 25)
    real = feeds["attention_mask"].astype(bool)
    expected, got = run(path, feeds), run(result.proto, feeds)
    assert np.abs(expected - got)[real].max() / np.abs(expected[real]).max() <= TOLERANCE


def test_long_encoder_approximations_at_length():
    """window=256 and performer run on 2048 tokens and stay near exact attention."""
    path = str(sparse.exported("long_encoder"))
    ids = np.random.default_rng(0).integers(1, 256, (1, 2048))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    exact = run(path, feeds)
    for mode, limit in (("window=256", 0.5), ("performer=128", 0.5)):
        got = run(attnfuse.optimize_onnx(path, attention=mode).proto, feeds)
        cosine = (exact * got).sum(-1) / (np.linalg.norm(exact, axis=-1) * np.linalg.norm(got, axis=-1))
        assert np.isfinite(got).all() and cosine.mean() > limit
