"""The attention rule alone, on tiny graphs of both IRs: what it measures (heads, layouts, scale,
soft-cap, mask kind, window, ALiBi slopes, cache) against the numbers each graph was built with,
why it refuses the near misses, and that what it writes computes what numpy does.

One layer, hidden 16, two heads of 8 (k and v with one head when grouped), written in ONNX by
onnx.helper (through the spellings builder) and in torch as a module torch.export captures:

    softmax(cap * tanh(q k^T * scale / cap) + alibi + mask) v, merged, projected
"""
from __future__ import annotations

import copy
import re
import functools
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from spellings import GraphBuilder, make_model

from attnfuse.core import driver
from attnfuse.core.measure.heads import Layout
from attnfuse.core.outcome import BiasKind, CacheKind, MaskKind
from attnfuse.core.rule import NoMatch
from attnfuse.optimizer.probe import Probe
from attnfuse.passes.fx.adapter import FxGraph
from attnfuse.passes.fx.graph import FxProbe, find_tokens, placeholders, remove_dead, remove_no_ops
from attnfuse.passes.fx.view import TorchView
from attnfuse.passes.onnx import padding_mask
from attnfuse.passes.onnx.adapter import OnnxGraph
from attnfuse.passes.onnx.graph import MS_DOMAIN, opset, remove_unused, speaking_opset
from attnfuse.passes.onnx.view import OrtView
from attnfuse.passes.rules.attention import Attention

HIDDEN, HEADS, SIZE = 16, 2, 8
SLOPES = (0.5, 0.25)
FILL = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class Tiny:
    mask: str = "padding"  # none | padding | causal | window (causal) | band | alibi; all but none with padding
    window: int = 2  # keys within this distance of the query are seen
    kv_heads: int = HEADS
    softcap: float = 0.0
    cache: bool = False
    sdpa: bool = False  # torch only: SDPA with a boolean mask
    defect: str = "none"  # gated | probabilities_read | values_scaled | fill_changed

    @property
    def scale(self) -> float:
        return SIZE ** -0.5


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    shapes = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, HIDDEN), "v": (HIDDEN, HIDDEN), "o": (HIDDEN, HIDDEN),
              "gate": (HIDDEN, 1)}
    return {name: rng.normal(0, HIDDEN ** -0.5, shape).astype(np.float32) for name, shape in shapes.items()}


W = weights()


def reference(spec: Tiny, x: np.ndarray, mask: np.ndarray | None, past: tuple | None = None) -> np.ndarray:
    """What the layer computes, in float64 from the spec."""
    x = x.astype(np.float64)
    batch, new, _ = x.shape
    kv = spec.kv_heads

    def heads(name, count):
        return (x @ W[name][:, :count * SIZE]).reshape(batch, new, count, SIZE).transpose(0, 2, 1, 3)

    q, k, v = heads("q", HEADS), heads("k", kv), heads("v", kv)
    if past is not None:
        k, v = np.concatenate([past[0], k], 2), np.concatenate([past[1], v], 2)
    k, v = (np.repeat(t, HEADS // kv, axis=1) for t in (k, v))
    scores = q @ k.transpose(0, 1, 3, 2) * spec.scale
    if spec.softcap:
        scores = spec.softcap * np.tanh(scores / spec.softcap)
    total = k.shape[2]
    i, j = np.arange(new)[:, None] + total - new, np.arange(total)[None, :]
    if spec.mask == "alibi":
        scores = scores + np.asarray(SLOPES)[None, :, None, None] * (j - i)
    allowed = np.ones((batch, 1, new, total), bool)
    if spec.mask != "none":
        allowed = allowed & mask.astype(bool)[:, None, None, :]
    if spec.mask == "causal":
        allowed = allowed & (j <= i)
    if spec.mask == "window":
        allowed = allowed & (j <= i) & (i - j <= spec.window)
    if spec.mask == "band":
        allowed = allowed & (np.abs(i - j) <= spec.window)
    scores = np.where(allowed, scores, -np.inf)
    with np.errstate(invalid="ignore"):  # a padded query that sees no key: NaN, never compared
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(batch, new, HIDDEN) @ W["o"]


def batches(spec: Tiny, seed: int) -> list[dict[str, np.ndarray]]:
    """Right- and left-padded batches of other sizes (a full row, a row of one token); with a cache of
    3 and 2 positions, left-padded (as generation pads)."""
    rng = np.random.default_rng(seed)
    found = []
    for batch, new, past, side in ((3, 5, 3, "left" if spec.cache else "right"), (2, 4, 2, "left")):
        lengths = np.array([past + new, past + 1, past + new - 2][:batch])
        total = past + new if spec.cache else new
        real = np.arange(total)[None, :] < (lengths if spec.cache else lengths - past)[:, None]
        real = real[:, ::-1].copy() if side == "left" else real
        feeds = {"x": rng.normal(size=(batch, new, HIDDEN)).astype(np.float32)}
        if spec.mask != "none":
            feeds["attention_mask"] = real.astype(np.int64)
        if spec.cache:
            for name in ("key", "value"):
                cache = rng.normal(size=(batch, spec.kv_heads, past, SIZE))
                feeds[f"past_key_values.0.{name}"] = cache.astype(np.float32)
        found.append(feeds)
    return found


def expected(spec: Tiny, feeds: dict) -> np.ndarray:
    past = (feeds["past_key_values.0.key"], feeds["past_key_values.0.value"]) if spec.cache else None
    return reference(spec, feeds["x"], feeds.get("attention_mask"), past)


def assert_equal_at_real_tokens(spec: Tiny, feeds: dict, got: np.ndarray) -> None:
    want = expected(spec, feeds)
    real = feeds["attention_mask"][:, -want.shape[1]:].astype(bool) if "attention_mask" in feeds \
        else np.ones(want.shape[:2], bool)
    assert float(np.abs(got - want)[real].max() / np.abs(want[real]).max()) < 1e-4


# ---- ONNX: built by onnx.helper -------------------------------------------------------------------------


def onnx_model(spec: Tiny) -> onnx.ModelProto:
    g = GraphBuilder()
    kv = spec.kv_heads

    def heads(name, count):
        projected = g.op("MatMul", "x", g.weight(W[name][:, :count * SIZE], f"w{name}"))
        return g.op("Transpose", g.op("Reshape", projected, g.i64([0, 0, count, SIZE])), perm=[0, 2, 1, 3])

    q, k, v = heads("q", HEADS), heads("k", kv), heads("v", kv)
    if spec.cache:
        k, v = (g.op("Concat", f"past_key_values.0.{name}", t, axis=2) for name, t in (("key", k), ("value", v)))
    if kv < HEADS:
        k, v = (g.op("Expand", t, g.i64([1, HEADS, 1, 1])) for t in (k, v))
    if spec.defect == "values_scaled":
        v = g.op("Mul", v, g.f32(2.0))
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.f32(spec.scale))
    if spec.softcap:
        scores = g.op("Mul", g.op("Tanh", g.op("Div", scores, g.f32(spec.softcap))), g.f32(spec.softcap))
    if spec.defect == "gated":
        gate = g.op("Sigmoid", g.op("MatMul", "x", g.weight(W["gate"], "wgate")))
        scores = g.op("Mul", scores, g.unsqueeze(gate, [1]))
    scores = onnx_masked(g, spec, scores, k)
    probs = g.op("Softmax", scores, axis=-1)
    out = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])
    g.rename(g.op("MatMul", g.op("Reshape", out, g.i64([0, 0, HIDDEN])), g.weight(W["o"], "wo")), "y")
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", "sequence_length", HIDDEN])]
    if spec.defect == "probabilities_read":
        g.rename(g.op("ReduceSum", probs, g.i64([-1]), keepdims=0), "total")
        outputs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, None))
    return make_model(g, "tiny", onnx_inputs(spec), outputs)


def onnx_masked(g: GraphBuilder, spec: Tiny, scores: str, k: str) -> str:
    """The padding as (1 - m) * -10000, causal and window as Where(allowed, scores, finfo.min), ALiBi
    as slope * (j - i) from Range, the queries the last of the keys' positions."""
    if spec.mask == "none":
        return scores
    total, new = g.size(k, 2), g.size("x", 1)
    i = g.unsqueeze(g.op("Add", g.op("Range", g.i64(0), new, g.i64(1)), g.op("Sub", total, new)), [1])
    j = g.unsqueeze(g.op("Range", g.i64(0), total, g.i64(1)), [0])
    if spec.mask == "alibi":
        distance = g.op("Cast", g.op("Sub", j, i), to=TensorProto.FLOAT)
        scores = g.op("Add", scores, g.op("Mul", g.f32(np.reshape(SLOPES, (1, HEADS, 1, 1))), distance))
    padding = g.op("Cast", g.unsqueeze("attention_mask", [1, 2]), to=TensorProto.FLOAT)
    scores = g.op("Add", scores, g.op("Mul", g.op("Sub", g.f32(1.0), padding), g.f32(-10000.0)))
    allowed = None
    if spec.mask == "causal":
        allowed = g.op("LessOrEqual", j, i)
    if spec.mask == "window":
        allowed = g.op("And", g.op("LessOrEqual", j, i), g.op("LessOrEqual", g.op("Sub", i, j), g.i64(spec.window)))
    if spec.mask == "band":
        allowed = g.op("LessOrEqual", g.op("Abs", g.op("Sub", i, j)), g.i64(spec.window))
    if allowed is None:
        return scores
    return g.op("Where", allowed, scores, g.f32(-1.0 if spec.defect == "fill_changed" else FILL))


def onnx_inputs(spec: Tiny) -> list:
    new, total = "sequence_length", "past_sequence_length + sequence_length" if spec.cache else "sequence_length"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", new, HIDDEN])]
    if spec.mask != "none":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", total]))
    if spec.cache:
        inputs += [helper.make_tensor_value_info(f"past_key_values.0.{name}", TensorProto.FLOAT,
                                                 ["batch_size", spec.kv_heads, "past_sequence_length", SIZE])
                   for name in ("key", "value")]
    return inputs


@dataclass
class OnnxSite:
    model: ir.Model
    graph: OnnxGraph
    view: OrtView
    anchor: ir.Node

    def match(self):
        return Attention().match(self.anchor, self.graph, self.view)

    def rewritten(self) -> tuple[onnx.ModelProto, object]:
        """The model with the rule applied through the driver, and the site's report."""
        with speaking_opset(opset(self.model.graph)):
            (applied,) = driver.rewrite(self.graph, self.view, [Attention()])
        remove_unused(self.model)
        self.model.graph.sort()
        self.model.opset_imports[MS_DOMAIN] = 1
        return ir.to_proto(self.model), applied.outcome


def onnx_site(spec: Tiny) -> OnnxSite:
    model = ir.from_proto(onnx_model(spec))
    probe = Probe.capture(model)
    view = OrtView(probe, opset(model.graph))
    mask = padding_mask(model.graph, probe)
    graph = OnnxGraph(model.graph, view, mask.value if mask else None)
    (anchor,) = Attention().anchors(graph, view)
    return OnnxSite(model, graph, view, anchor)


def run_onnx(proto: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feeds)[0]


# ---- torch: a module captured by torch.export ------------------------------------------------------


class TinyTorch(torch.nn.Module):
    def __init__(self, spec: Tiny):
        super().__init__()
        self.spec = spec
        for name, array in W.items():
            self.register_buffer(f"w{name}", torch.from_numpy(array))

    def forward(self, x, attention_mask=None, past_key=None, past_value=None):
        spec, kv = self.spec, self.spec.kv_heads
        batch, new, _ = x.shape

        def heads(weight, count):
            return (x @ weight[:, :count * SIZE]).view(batch, new, count, SIZE).transpose(1, 2)

        q, k, v = heads(self.wq, HEADS), heads(self.wk, kv), heads(self.wv, kv)
        if spec.cache:
            k, v = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
        if spec.defect == "values_scaled":
            v = v * 2.0
        total = k.shape[2]
        i = torch.arange(new)[:, None] + total - new
        j = torch.arange(total)[None, :]
        seen = torch.ones(1, 1, new, total, dtype=torch.bool)
        if spec.mask != "none":
            seen = seen & attention_mask.bool()[:, None, None, :]
        if spec.mask == "causal":
            seen = seen & (j <= i)
        if spec.mask == "window":
            seen = seen & (j <= i) & (i - j <= spec.window)
        if spec.mask == "band":
            seen = seen & ((i - j).abs() <= spec.window)
        if spec.sdpa:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=seen, enable_gqa=kv < HEADS)
            return out.transpose(1, 2).flatten(2) @ self.wo
        k, v = (t.repeat_interleave(HEADS // kv, dim=1) for t in (k, v))
        scores = q @ k.transpose(-1, -2) * spec.scale
        if spec.softcap:
            scores = torch.tanh(scores / spec.softcap) * spec.softcap
        if spec.defect == "gated":
            scores = scores * torch.sigmoid(x @ self.wgate)[:, None]
        if spec.mask == "alibi":
            scores = scores + torch.tensor(SLOPES)[:, None, None] * (j - i)
        scores = scores.masked_fill(~seen, -1.0 if spec.defect == "fill_changed" else FILL)
        probs = scores.softmax(-1)
        out = (probs @ v).transpose(1, 2).flatten(2) @ self.wo
        return (out, probs.sum(-1)) if spec.defect == "probabilities_read" else out


def torch_args(spec: Tiny, feeds: dict) -> tuple:
    names = ["x", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"]
    return tuple(torch.from_numpy(feeds[name]) if name in feeds else None for name in names)


@dataclass
class FxSite:
    module: torch.fx.GraphModule
    graph: FxGraph
    view: TorchView
    anchor: torch.fx.Node

    def match(self):
        return Attention().match(self.anchor, self.graph, self.view)

    def rewritten(self):
        (applied,) = driver.rewrite(self.graph, self.view, [Attention()])
        remove_dead(self.module.graph)
        self.module.recompile()
        return self.module, applied.outcome


@functools.cache
def fx_captured(spec: Tiny) -> torch.fx.GraphModule:
    args = [a for a in torch_args(spec, batches(spec, 0)[0]) if a is not None]
    dims = tuple({axis: torch.export.Dim.AUTO for axis in range(a.dim())} for a in args)
    return torch.export.export(TinyTorch(spec).eval(), tuple(args), dynamic_shapes=dims, strict=False).module()


def fx_site(spec: Tiny) -> FxSite:
    module = copy.deepcopy(fx_captured(spec))  # each test rewrites its own
    remove_no_ops(module.graph)
    runs = [(tuple(a for a in torch_args(spec, feeds) if a is not None), {}) for feeds in batches(spec, 0)]
    probe = FxProbe(module, runs)
    mask = next((node for node in placeholders(module.graph) if node.name == "attention_mask"), None)
    view = TorchView(probe, mask, find_tokens(module.graph, probe, mask))
    graph = FxGraph(module.graph, view)
    (anchor,) = Attention().anchors(graph, view)
    return FxSite(module, graph, view, anchor)


def run_fx(module, spec: Tiny, feeds: dict) -> np.ndarray:
    with torch.no_grad():
        out = module(*(a for a in torch_args(spec, feeds) if a is not None))
    return (out[0] if isinstance(out, tuple) else out).numpy()


# ---- what is measured ---------------------------------------------------------------------------------

MEASURED = {
    "eager": (Tiny(), dict(mask=MaskKind.KEY_PADDING)),
    "causal": (Tiny(mask="causal"), dict(mask=MaskKind.CAUSAL_PADDING, causal=True, window=(-1, 0))),
    "alibi": (Tiny(mask="alibi"), dict(mask=MaskKind.KEY_PADDING, bias=BiasKind.ALIBI, slopes=SLOPES)),
    "grouped": (Tiny(kv_heads=1), dict(mask=MaskKind.KEY_PADDING, kv_heads=1)),
    "cache": (Tiny(mask="causal", cache=True, kv_heads=1),
              dict(mask=MaskKind.CAUSAL_PADDING, causal=True, window=(-1, 0), cache=CacheKind.PAST, kv_heads=1)),
    "softcap": (Tiny(mask="none", softcap=5.0), dict(mask=MaskKind.NONE, softcap=5.0)),
}


def assert_measured(match, spec: Tiny, wanted: dict) -> None:
    assert (match.num_heads, match.head_size, match.value_size) == (HEADS, SIZE, SIZE)
    assert match.kv_heads == wanted.get("kv_heads", HEADS)
    assert match.scale == pytest.approx(spec.scale, rel=1e-5)
    assert match.softcap == wanted.get("softcap", 0.0)
    mask = match.mask
    assert (mask.kind, mask.causal, mask.window) == (wanted["mask"], wanted.get("causal", False),
                                                     wanted.get("window", (-1, -1)))
    assert mask.bias is wanted.get("bias", BiasKind.NONE)
    if "slopes" in wanted:
        np.testing.assert_allclose(mask.alibi_slopes, wanted["slopes"], rtol=1e-5)
    assert match.cache is wanted.get("cache", CacheKind.NONE)
    assert mask.masks_padded_keys == (spec.mask != "none")
    for heads, count in ((match.q, HEADS), (match.k, match.kv_heads), (match.v, match.kv_heads)):
        assert heads.heads == count and heads.factor == 1.0


@pytest.mark.parametrize("case", list(MEASURED))
def test_onnx_measures(case):
    spec, wanted = MEASURED[case]
    match = onnx_site(spec).match()
    assert_measured(match, spec, wanted)
    # q, k and v are read where the projection wrote them, before the head split (the cache: its Concat)
    assert match.q.layout is Layout.TOKENS
    assert match.k.layout is (Layout.HEADS_FIRST if spec.cache else Layout.TOKENS)
    if spec.cache:
        assert match.kv_cache.past[0].name == "past_key_values.0.key"


@pytest.mark.parametrize("case", list(MEASURED))
def test_fx_measures(case):
    spec, wanted = MEASURED[case]
    match = fx_site(spec).match()
    assert_measured(match, spec, wanted)
    assert match.q.layout is Layout.TOKENS


@pytest.mark.parametrize("mask, window, causal", [("window", (2, 0), True), ("band", (2, 2), False)])
def test_windows_are_read_on_both(mask, window, causal):
    for site in (onnx_site(Tiny(mask=mask)), fx_site(Tiny(mask=mask))):
        reading = site.match().mask
        assert (reading.kind, reading.window, reading.causal, reading.bias) == (MaskKind.WINDOW, window, causal,
                                                                                BiasKind.NONE)


def test_fx_sdpa_with_grouped_heads():
    spec = Tiny(sdpa=True, kv_heads=1, mask="causal")
    match = fx_site(spec).match()
    assert (match.kv_heads, match.k.layout, match.mask.kind) == (1, Layout.TOKENS, MaskKind.CAUSAL_PADDING)
    assert match.scale == pytest.approx(spec.scale)


# ---- what is written ------------------------------------------------------------------------------------

ONNX_OPS = {"eager": "MultiHeadAttention", "causal": "MultiHeadAttention", "alibi": "MultiHeadAttention",
            "grouped": "GroupQueryAttention", "cache": "GroupQueryAttention", "softcap": "GroupQueryAttention"}


@pytest.mark.parametrize("case", list(ONNX_OPS))
def test_onnx_rewrite_equals_numpy(case):
    spec = MEASURED[case][0]
    proto, site = onnx_site(spec).rewritten()
    assert site.fused, site.reason
    assert [n.op_type for n in proto.graph.node if n.domain == MS_DOMAIN] == [ONNX_OPS[case]]
    assert not any(n.op_type == "Softmax" for n in proto.graph.node)
    for feeds in batches(spec, seed=7):
        assert_equal_at_real_tokens(spec, feeds, run_onnx(proto, feeds))


@pytest.mark.parametrize("case", ["eager", "causal", "alibi", "grouped", "cache"])
def test_fx_rewrite_equals_numpy(case):
    spec = MEASURED[case][0]
    module, site = fx_site(spec).rewritten()
    assert site.fused, site.reason
    assert torch.ops.aten._softmax.default not in [n.target for n in module.graph.nodes]
    for feeds in batches(spec, seed=7):
        assert_equal_at_real_tokens(spec, feeds, run_fx(module, spec, feeds))


def test_fx_soft_cap_is_measured_and_refused():
    """No torch op here soft-caps: the site is reported with its cap and the reason."""
    _, site = fx_site(Tiny(mask="none", softcap=5.0)).rewritten()
    assert not site.fused and "soft-capped" in site.reason and site.softcap == 5.0


# ---- near misses -----------------------------------------------------------------------------------------

NEAR_MISSES = {
    "gated": "the scores are not scale * q.k + bias",  # scores times a tensor
    "probabilities_read": "the attention probabilities are used elsewhere",
    "values_scaled": "the values are scaled",
    "fill_changed": "the scores are not scale * q.k + bias",  # a mask's fill of -1 is no mask
}


@pytest.mark.parametrize("defect", list(NEAR_MISSES))
def test_onnx_near_misses_are_refused(defect):
    spec = Tiny(mask="causal", defect=defect)
    with pytest.raises(NoMatch, match=re.escape(NEAR_MISSES[defect])):
        onnx_site(spec).match()


@pytest.mark.parametrize("defect", list(NEAR_MISSES))
def test_fx_near_misses_are_refused(defect):
    spec = Tiny(mask="causal", defect=defect)
    with pytest.raises(NoMatch, match=re.escape(NEAR_MISSES[defect])):
        fx_site(spec).match()


def test_the_tiny_graphs_are_what_they_claim():
    """The builders compute the reference (else the tests above prove nothing), and the near misses
    do not."""
    for spec in [spec for spec, _ in MEASURED.values()] + [Tiny(mask="window"), Tiny(mask="band")]:
        feeds = batches(spec, seed=5)[0]
        assert_equal_at_real_tokens(spec, feeds, run_onnx(onnx_model(spec), feeds))
        assert_equal_at_real_tokens(spec, feeds, run_fx(TinyTorch(spec).eval(), spec, feeds))
    for defect in ("gated", "values_scaled", "fill_changed"):
        spec = Tiny(mask="causal", defect=defect)
        feeds = batches(spec, seed=5)[0]
        with pytest.raises(AssertionError):
            assert_equal_at_real_tokens(replace(spec, defect="none"), feeds, run_onnx(onnx_model(spec), feeds))


# ---- the measurements alone, over arrays -------------------------------------------------------------


def test_heads_are_read_in_their_layout_with_repeats_and_a_factor():
    from attnfuse.core.measure.heads import read_heads

    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 5, 1 * SIZE)).astype(np.float32)  # one k head, [B, L, G*D]
    wanted = np.repeat(tokens.reshape(2, 5, 1, SIZE).transpose(0, 2, 1, 3), HEADS, axis=1) * 0.5
    found = read_heads([tokens], [wanted])
    assert (found.layout, found.heads, found.factor) == (Layout.TOKENS, 1, pytest.approx(0.5))
    transposed = wanted[:, :1].transpose(0, 1, 3, 2) / 0.5  # [B, G, D, L], as BLOOM keeps its keys
    assert read_heads([transposed], [wanted]).layout is Layout.HEADS_FIRST_T
    assert read_heads([tokens[:, ::-1].copy()], [wanted]) is None  # other values: no layout holds them


def test_masks_are_read_bottom_right_against_the_real_tokens():
    from attnfuse.core.measure.masks import Run, read_mask

    queries, keys = 2, 5  # the last 2 of 5 positions (a cache of 3)
    i, j = np.arange(queries)[:, None] + keys - queries, np.arange(keys)[None, :]
    real = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], bool)  # left padding
    hidden = (j > i) | ~real[:, None, None, :]
    causal = read_mask([Run(np.where(hidden, FILL, 0.0), real[:, -queries:], real)])
    assert (causal.kind, causal.causal, causal.masks_padded_keys) == (MaskKind.CAUSAL_PADDING, True, True)
    window = read_mask([Run(np.where(hidden | (i - j > 1), FILL, 0.0), real[:, -queries:], real)])
    assert (window.kind, window.window) == (MaskKind.WINDOW, (1, 0))
    alibi = read_mask([Run(np.where(hidden, FILL, np.array(SLOPES)[:, None, None] * (j - i)), None, real)])
    assert alibi.bias is BiasKind.ALIBI and alibi.alibi_slopes == pytest.approx(SLOPES)
    boosting = read_mask([Run(np.where(real, 0.0, 10000.0)[:, None, None, :], None, real)])
    assert (boosting.kind, boosting.bias) == (MaskKind.NONE, BiasKind.ADDITIVE)  # favours padding: no mask


def test_scores_give_their_scale_and_cap():
    from attnfuse.core.measure.scores import SATURATING, Points, fit

    x = np.random.default_rng(1).normal(size=200) * 4
    plain = fit([Points(x, 0.125 * x, 1.0)], capped=False, dtype=np.float32)
    assert plain.scale == pytest.approx(0.125) and plain.softcap == 0.0
    capped = [Points(x, 5.0 * np.tanh(0.125 * t * x / 5.0), 5.0, t) for t in (1.0, SATURATING)]
    found = fit(capped, capped=True, dtype=np.float32)
    assert (found.scale, found.softcap) == (pytest.approx(0.125), 5.0)
    assert fit([Points(x, 0.125 * x * (1 + (x > 0)), 1.0)], capped=False, dtype=np.float32) is None  # gated
