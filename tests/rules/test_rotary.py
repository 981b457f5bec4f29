"""The rotary rule on tiny graphs of both IRs: rotary embeddings on q and k in every form
(rotate-half or interleaved, full or partial as Phi's, heads first [B, H, S, D] or tokens first
[B, S, H, D] / [B, S, H*D], cos and sin computed per token from position ids or gathered from a
table) become the fused rotary op, equal to kernels/reference.py's rotary; a region that
multiplies by a cos/sin pair but is no rotary (a sign or a constant changed) is refused with the reason."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from attnfuse.core import tolerance
from attnfuse.kernels import ops, reference
from attnfuse.models import decoder_spellings as spellings
from attnfuse.passes.rules.rotary import Rotary
from run_rules import fx_rewrite, fx_targets, onnx_rewrite, op_types

REFUSED = "equals no rotary"


def rotated(x: np.ndarray | torch.Tensor, heads: int, positions, inv_freq: np.ndarray, interleaved: bool) -> torch.Tensor:
    """reference.rotary of the heads of x ([B, S, heads * D]) at `positions` ([B or 1, S]): the first
    2 * len(inv_freq) entries of each head turn, [B, S, H, D]."""
    x = torch.as_tensor(x)
    angles = torch.as_tensor(np.asarray(positions)[..., None] * inv_freq.astype(np.float64))
    cos, sin = (f(angles)[:, :, None, :] for f in (torch.cos, torch.sin))
    return reference.rotary(x.reshape(*x.shape[:2], heads, -1), cos, sin, interleaved)


def close(want: np.ndarray, got: np.ndarray) -> bool:
    return tolerance.relative_error(want, got) <= tolerance.FLOAT32


# --------------------------------------------------------------------------- ONNX (decoder_spellings' graphs)

ONNX_FORMS = spellings.ROTARY_SPELLINGS


def onnx_feeds(spec: spellings.RotarySpelling) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {"q": rng.standard_normal((2, 6, spec.heads * spec.head_size)).astype(np.float32),
             "k": rng.standard_normal((2, 6, spec.kv_heads * spec.head_size)).astype(np.float32)}
    if spec.angles != "arange":  # positions the probe did not use (the table holds 64)
        feeds["position_ids"] = np.array([[3, 4, 5, 6, 7, 8], [40, 41, 42, 43, 44, 45]], np.int64)
    return feeds


def onnx_expected(spec: spellings.RotarySpelling, feeds: dict[str, np.ndarray], name: str, heads: int) -> np.ndarray:
    x = feeds[name]
    positions = feeds.get("position_ids", np.broadcast_to(np.arange(x.shape[1]), x.shape[:2]))
    return spellings.rotary_reference(spec, x, heads, positions)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


@pytest.mark.parametrize("name", ONNX_FORMS)
def test_onnx_rotary_forms_become_rotary_embedding(name):
    spec = ONNX_FORMS[name]
    model, outcomes = onnx_rewrite(spellings.rotary_model(spec), [Rotary()])
    assert [(o.op, o.fused) for o in outcomes] == [("RotaryEmbedding", True)] * 2, outcomes
    assert op_types(model).count("RotaryEmbedding") == 2 and "Neg" not in op_types(model)
    feeds = onnx_feeds(spec)
    for got, (output, heads) in zip(run(model, feeds), (("q", spec.heads), ("k", spec.kv_heads))):
        assert close(onnx_expected(spec, feeds, output, heads), got), output


def test_onnx_rotary_reads_the_graph_table_and_position_ids():
    model, _ = onnx_rewrite(spellings.rotary_model(spellings.RotarySpelling(angles="table")), [Rotary()])
    first, second = (n for n in model.graph.node if n.op_type == "RotaryEmbedding")
    assert first.input[1] == "position_ids" and list(first.input[1:]) == list(second.input[1:])  # one cache
    assert "Gather" not in op_types(model)


def with_constant(model: onnx.ModelProto, old: float, new: float) -> onnx.ModelProto:
    """The model with each float initializer equal to `old` set to `new`."""
    for i, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size == 1 and float(array.reshape(())) == old:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.full_like(array, new), tensor.name))
    return model


@pytest.mark.parametrize("near_miss", ["sign", "constant"])
def test_onnx_near_misses_are_refused_with_the_reason(near_miss):
    if near_miss == "sign":  # x cos - rotate(x) sin
        original = spellings.rotary_model(spellings.RotarySpelling(defect="sign"))
    else:  # rotate-half negating by -0.5
        original = with_constant(spellings.rotary_model(spellings.RotarySpelling(negate="mul")), -1.0, -0.5)
    model, outcomes = onnx_rewrite(original, [Rotary()])
    assert outcomes and all(o.op == "RotaryEmbedding" and not o.fused and REFUSED in o.reason for o in outcomes)
    assert "RotaryEmbedding" not in op_types(model)
    feeds = onnx_feeds(spellings.RotarySpelling())
    for want, got in zip(run(original, feeds), run(model, feeds)):
        assert close(want, got)


# --------------------------------------------------------------------------- fx

@dataclasses.dataclass(frozen=True)
class Form:
    interleaved: bool = False
    rotary: int = 16  # rotated entries of each head (partial below the head size)
    heads_first: bool = True
    angles: str = "positions"  # "positions": from position ids; "table": rows of a table; "arange": shared
    negate: float = -1.0  # what rotate() multiplies the turned half by (-1 in a rotary)


HEADS, HEAD_SIZE, BASE = 4, 16, 10000.0


class Rotate(torch.nn.Module):
    """q ([B, S, H*D]) split into heads and rotated as the form says."""

    def __init__(self, form: Form):
        super().__init__()
        self.form = form
        self.register_buffer("inv_freq", BASE ** (-torch.arange(0, form.rotary, 2).float() / form.rotary))
        self.register_buffer("table", torch.arange(64)[:, None].float() * self.inv_freq)

    def forward(self, q: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        form, (batch, length, _) = self.form, q.shape
        x = q.view(batch, length, HEADS, HEAD_SIZE)
        x = x.transpose(1, 2) if form.heads_first else x
        if form.angles == "table":
            angles = torch.nn.functional.embedding(position_ids, self.table)
        else:
            positions = torch.arange(length)[None] if form.angles == "arange" else position_ids
            angles = positions[..., None].float() * self.inv_freq
        double = (lambda a: a.repeat_interleave(2, -1)) if form.interleaved else (lambda a: torch.cat((a, a), -1))
        cos, sin = (double(f(angles)).unsqueeze(1 if form.heads_first else 2) for f in (torch.cos, torch.sin))
        part, rest = x[..., : form.rotary], x[..., form.rotary:]
        if form.interleaved:
            turned = torch.stack((form.negate * part[..., 1::2], part[..., 0::2]), -1).flatten(-2)
        else:
            half = form.rotary // 2
            turned = torch.cat((form.negate * part[..., half:], part[..., :half]), -1)
        return torch.cat((part * cos + turned * sin, rest), -1)


def fx_runs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, length, HEADS * HEAD_SIZE, generator=generator),
             torch.randint(0, 60, (batch, length), generator=generator)) for batch, length in ((2, 5), (3, 7))]


def fx_expected(form: Form, q: torch.Tensor, position_ids: torch.Tensor) -> np.ndarray:
    positions = np.arange(q.shape[1])[None] if form.angles == "arange" else position_ids.numpy()
    inv_freq = BASE ** (-np.arange(0, form.rotary, 2) / form.rotary)
    out = rotated(q, HEADS, positions, inv_freq, form.interleaved)
    return (out.transpose(1, 2) if form.heads_first else out).numpy()


FX_FORMS = {
    "rotate-half, heads first": Form(),
    "interleaved": Form(interleaved=True),
    "partial (phi)": Form(rotary=8),
    "tokens first": Form(heads_first=False),
    "table by position ids": Form(angles="table"),
    "positions shared by the batch": Form(angles="arange", interleaved=True, rotary=8),
}


@pytest.mark.parametrize("name", FX_FORMS)
def test_fx_rotary_forms_become_the_rotary_op_on_merged_heads(name):
    form = FX_FORMS[name]
    fused, outcomes = fx_rewrite(Rotate(form).eval(), fx_runs(), [Rotary()])
    assert [(o.op, o.fused) for o in outcomes] == [("rotary", True)], outcomes
    (op,) = [node for node in fused.graph.nodes if node.target is ops.rotary]
    assert op.args[0].op == "placeholder"  # q itself: the heads merged, as they were split from
    assert op.args[3:] == (HEADS, form.interleaved)
    q, position_ids = torch.randn(3, 9, HEADS * HEAD_SIZE), torch.randint(0, 60, (3, 9))
    with torch.no_grad():
        assert close(fx_expected(form, q, position_ids), fused(q, position_ids).numpy())


@pytest.mark.parametrize("negate", [1.0, -0.5], ids=["sign", "constant"])
def test_fx_near_misses_are_refused_with_the_reason(negate):
    module = Rotate(Form(negate=negate)).eval()
    fused, outcomes = fx_rewrite(module, fx_runs(), [Rotary()])
    assert outcomes and all(o.op == "rotary" and not o.fused and REFUSED in o.reason for o in outcomes)
    assert ops.rotary not in fx_targets(fused)
    q, position_ids = fx_runs()[1]
    with torch.no_grad():
        assert close(module(q, position_ids).numpy(), fused(q, position_ids).numpy())
