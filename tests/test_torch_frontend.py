"""attnfuse.optimize: the PyTorch front-end on the zoo's 8 families x eager/SDPA attention.

Each optimized module must replace every attention site, equal the original at real
tokens on batches of other sizes than it was captured with (batch 1 and left padding
included), and export to ONNX with com.microsoft fused ops that ONNX Runtime runs
to the same values.
"""
from __future__ import annotations

import collections

import numpy as np
import onnxruntime as ort
import pytest
import torch

import attnfuse
from attnfuse.models import minilm, zoo
from attnfuse.optimizer.errors import UserError

TOLERANCE = 1e-4
CASES = [(family, attention) for family in zoo.FAMILIES for attention in zoo.ATTENTIONS]


def relative_error(got: torch.Tensor, want: torch.Tensor, inputs: dict) -> float:
    real = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones(want.shape[:2], dtype=torch.bool)
    return float((got - want)[real].abs().max() / want[real].abs().max())


def left_padded(inputs: dict) -> dict:
    flipped = dict(inputs)
    for name in ("input_ids", "attention_mask"):
        flipped[name] = inputs[name].flip(1)
    return flipped


def optimized_zoo(family: str, attention: str, batch: int = 2, seqlen: int = 8):
    """A zoo model and attnfuse.optimize's module of it, captured from a batch of the given size."""
    model = zoo.build_torch(family, attention)
    return model, attnfuse.optimize(model, example_kwargs=zoo.example_inputs(family, batch=batch, seqlen=seqlen))


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{a}" for f, a in CASES])
def case(request):
    family, attention = request.param
    return (family, *optimized_zoo(family, attention))


def test_every_attention_site_is_fused(case):
    family, _, optimized = case
    report = optimized.report
    assert report.attention_total == 2, [s.summary() for s in report.sites]
    assert report.attention_fused == 2, [s.reason for s in report.sites]
    assert report.verify.ok and report.verify.max_rel_error <= TOLERANCE
    padding_free = next(f for f in report.fusions if f.name == "padding-free")
    assert padding_free.fused == (zoo.MODEL_KIND[family] != "vision"), padding_free.reason
    attention_ops = report.fused_ops.get("attention", 0) + report.fused_ops.get("packed_attention", 0)
    assert attention_ops == 2


@pytest.mark.parametrize("shape", [(5, 13), (1, 6), (3, 2)], ids=["5x13", "1x6", "3x2"])
def test_equals_the_original_on_other_shapes(case, shape):
    family, model, optimized = case
    batch, seqlen = shape
    inputs = zoo.example_inputs(family, batch=batch, seqlen=seqlen, seed=11)
    batches = [inputs] if family == "vit" else [inputs, left_padded(inputs)]
    with torch.no_grad():
        for x in batches:
            assert relative_error(optimized(**x), model(**x), x) <= TOLERANCE


# After optimize, eager and SDPA spellings are the same fused ops: one export per family covers them.
EXPORTED = [(family, attention) for family, attention in CASES if attention == zoo.ATTENTIONS[0]]


@pytest.mark.parametrize("case", EXPORTED, ids=[f"{f}-{a}" for f, a in EXPORTED], indirect=True)
def test_exports_to_onnx_with_fused_ops(case, tmp_path):
    family, model, optimized = case
    inputs = zoo.example_inputs(family, batch=3, seqlen=8, seed=3)
    dims = {name: ({0: "batch", 1: "sequence"} if value.dim() == 2 else {0: "batch"}) for name, value in inputs.items()}
    program = torch.onnx.export(optimized, (), kwargs=inputs, dynamo=True, dynamic_shapes=dims)
    ops = collections.Counter(n.op_type for n in program.model_proto.graph.node if n.domain == "com.microsoft")
    assert ops["MultiHeadAttention"] == 2
    assert ops["SkipLayerNormalization"] >= 1
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    other = zoo.example_inputs(family, batch=4, seqlen=11 if family != "vit" else 8, seed=4)
    got = torch.from_numpy(session.run(None, {i.name: other[i.name].numpy() for i in session.get_inputs()})[0])
    with torch.no_grad():
        assert relative_error(got, model(**other), other) <= TOLERANCE


def test_returns_the_original_output_structure():
    import transformers

    config = transformers.BertConfig(**zoo._BERT_LIKE)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    inputs = zoo.example_inputs("bert", batch=2, seqlen=8)
    optimized = attnfuse.optimize(model, example_kwargs=inputs)
    other = zoo.example_inputs("bert", batch=3, seqlen=10, seed=2)
    with torch.no_grad():
        want, got = model(**other), optimized(**other)
    assert type(got) is type(want)
    assert set(got.keys()) == set(want.keys())
    assert relative_error(got.last_hidden_state, want.last_hidden_state, other) <= TOLERANCE


class NotQuiteAttention(torch.nn.Module):
    """Scores that are not softmax(scale * q.k + bias): soft-capped by tanh (Gemma-2 style),
    or scaled per key by a gate computed from the input."""

    def __init__(self, spelling: str, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.spelling, self.heads = spelling, heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.gate = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2)
        if self.spelling == "softcap":
            scores = 5.0 * torch.tanh(scores / 5.0)
        else:
            scores = scores * (1 + torch.sigmoid(self.gate(x))).transpose(1, 2)[:, None]
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("spelling, reason", [
    ("softcap", "soft-capped"), ("gated", "not scale * q.k + bias"),
])
def test_scores_that_are_not_scaled_dot_products_are_not_fused(spelling, reason):
    torch.manual_seed(0)
    model = NotQuiteAttention(spelling).eval()
    optimized = attnfuse.optimize(model, (torch.randn(2, 6, 32),))
    assert optimized.report.attention_total == 1 and optimized.report.attention_fused == 0
    assert reason in optimized.report.sites[0].reason
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x))


def test_real_minilm_padding_free():
    model = minilm.load_torch("sdpa")
    example = {name: torch.from_numpy(a) for name, a in minilm.padded_batch(2, 16, seed=1).items()}
    optimized = attnfuse.optimize(model, example_kwargs=example)
    assert optimized.report.attention_fused == 6
    assert optimized.report.fused_ops.get("packed_attention") == 6
    batch = {name: torch.from_numpy(a) for name, a in minilm.padded_batch(8, 64, seed=3).items()}
    with torch.no_grad():
        assert relative_error(optimized(**batch), model(**batch), batch) <= TOLERANCE


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "give example_inputs or example_kwargs"),
    (dict(example_inputs=(torch.zeros(2, 3),), target="tpu"), "unknown target 'tpu'"),
    (dict(example_inputs=(torch.zeros(2, 3),), attention="window=8"), "exact attention only"),
    (dict(example_kwargs={"nope": torch.zeros(2, 3)}), "do not fit the model's forward"),
])
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        attnfuse.optimize(torch.nn.Linear(3, 3), **kwargs)


class BandedSDPA(torch.nn.Module):
    """Embeddings as the input, and SDPA with a boolean band-and-padding mask: a window site, lowered
    with SDPA's own mask."""

    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        positions = torch.arange(x.shape[1])
        band = (positions[:, None] - positions[None, :]).abs() <= 2
        seen = band[None, None] & attention_mask.bool()[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=seen)
        return out.transpose(1, 2).flatten(2)


def test_boolean_sdpa_mask_on_a_packed_input():
    torch.manual_seed(0)
    model = BandedSDPA().eval()
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    optimized = attnfuse.optimize(model, example_kwargs=dict(x=torch.randn(2, 7, 32), attention_mask=mask))
    assert [(s.fused, s.mask, s.window) for s in optimized.report.sites] == [(True, "window", (2, 2))]
    assert optimized.report.fused_ops == {"packed_attention": 1}
    inputs = dict(x=torch.randn(3, 9, 32), attention_mask=torch.tensor([[1] * 4 + [0] * 5, [1] * 9, [0] * 2 + [1] * 7]))
    with torch.no_grad():
        assert relative_error(optimized(**inputs), model(**inputs), inputs) <= TOLERANCE


def test_an_example_of_one_row_still_gives_a_module_for_any_batch():
    model, optimized = optimized_zoo("gpt2", "eager", batch=1)
    inputs = zoo.example_inputs("gpt2", batch=4, seqlen=6, seed=8)
    with torch.no_grad():
        assert relative_error(optimized(**inputs), model(**inputs), inputs) <= TOLERANCE


def test_rows_with_no_real_token_give_zeros_and_no_error():
    model, optimized = optimized_zoo("bert", "sdpa")
    inputs = zoo.example_inputs("bert", batch=3, seqlen=6, seed=5)
    inputs["attention_mask"][1] = 0
    with torch.no_grad():
        got, want = optimized(**inputs), model(**inputs)
    assert torch.all(got[1] == 0)
    assert relative_error(got, want, inputs) <= TOLERANCE
    assert np.isfinite(got.numpy()).all()
