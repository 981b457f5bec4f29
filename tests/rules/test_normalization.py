"""The normalization rule on tiny graphs of both front-ends: RMSNorm and LayerNorm written out in
elementwise ops become one fused norm with the graph's own eps, weight and bias, and compute
what kernels/reference.py (or numpy) says; near misses are refused with their reasons."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from run_rules import fx_rewrite, fx_targets, onnx_rewrite, onnx_run, op_types, relative_error

from attnfuse.core import registry
from attnfuse.kernels import reference
from attnfuse.models import decoder_spellings as spellings
from attnfuse.passes.rules.normalization import Normalization
from attnfuse.passes.rules.skip_layer_norm import SkipLayerNorm

HIDDEN = 64
TOLERANCE = 1e-4
RMS, SKIP_RMS = (registry.SIMPLIFIED_LAYER_NORMALIZATION.op_type,
                 registry.SKIP_SIMPLIFIED_LAYER_NORMALIZATION.op_type)
LAYER, SKIP_LAYER = registry.LAYER_NORMALIZATION.op_type, registry.SKIP_LAYER_NORMALIZATION.op_type


def activations(seed: int, dtype=np.float32) -> np.ndarray:
    """[2, 5, HIDDEN] rows, two of them so small that eps weighs more than their mean square."""
    rows = np.random.default_rng(seed).standard_normal((2, 5, HIDDEN))
    rows[0, :2] *= 1e-4
    return rows.astype(dtype)


def epsilon(node: onnx.NodeProto) -> float:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon")


# --------------------------------------------------------------------------- ONNX

ONNX_RMS = {
    "pow, reciprocal": spellings.NormSpelling(),
    "x*x, divided": spellings.NormSpelling(square="mul", inverse="div"),
    "1/sqrt, Gemma's 1+w": spellings.NormSpelling(inverse="one_over", weight="one_plus_w"),
    "no weight, eps 1e-12": spellings.NormSpelling(weight="none", eps=1e-12),
    "casts": spellings.NormSpelling(cast=True, eps=1e-5),
}


@pytest.mark.parametrize("name", ONNX_RMS)
def test_onnx_rms_norm(name):
    spec = ONNX_RMS[name]
    fused, outcomes = onnx_rewrite(spellings.norm_model(spec), [Normalization()])
    assert [(o.op, o.fused) for o in outcomes] == [(RMS, True)]
    assert op_types(fused).count(RMS) == 1 and not {"ReduceMean", "Sqrt"} & set(op_types(fused))
    assert epsilon(fused.graph.node[-1]) == np.float32(spec.eps)  # the graph's own constant
    h = activations(1)
    assert relative_error(spellings.norm_reference(spec, h), onnx_run(fused, {"h": h})[0]) <= TOLERANCE


@pytest.mark.parametrize("cast", [False, True], ids=["sum", "sum, cast"])
def test_onnx_residual_before_an_rms_norm_is_claimed(cast):
    """x = h + r with the sum read later (a graph output here): the skip form, whose sum replaces it."""
    spec = spellings.NormSpelling(residual=True, cast=cast)
    fused, outcomes = onnx_rewrite(spellings.norm_model(spec), [Normalization()])
    assert [(o.op, o.fused) for o in outcomes] == [(SKIP_RMS, True)]
    assert op_types(fused) == [SKIP_RMS]
    h, r = activations(1), activations(2)
    y, total = onnx_run(fused, {"h": h, "r": r})
    expected, expected_total = reference.skip_rms_norm(torch.from_numpy(h), torch.from_numpy(r),
                                                       torch.from_numpy(spellings.norm_weight(spec)), spec.eps)
    assert relative_error(expected, y) <= TOLERANCE and relative_error(expected_total, total) <= TOLERANCE


def test_onnx_rms_norm_computed_in_float32_of_a_float16_input():
    """Casts inside: float16 in, the statistic in float32, back to float16 before the weight."""
    weight = spellings.norm_weight(spellings.NormSpelling()).astype(np.float16)
    nodes = [
        helper.make_node("Cast", ["h"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "x"], ["square"]),
        helper.make_node("ReduceMean", ["square", "axes"], ["mean"]),
        helper.make_node("Add", ["mean", "eps"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["root"]),
        helper.make_node("Div", ["x", "root"], ["normed"]),
        helper.make_node("Cast", ["normed"], ["half"], to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["half", "w"], ["y"]),
    ]
    constants = [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                 numpy_helper.from_array(np.array(1e-6, np.float32), "eps"), numpy_helper.from_array(weight, "w")]
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["b", "s", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    fused, outcomes = onnx_rewrite(model, [Normalization()])
    assert [(o.op, o.fused) for o in outcomes] == [(RMS, True)] and op_types(fused) == [RMS]
    assert epsilon(fused.graph.node[0]) == np.float32(1e-6)
    h = activations(1, np.float16)
    expected = reference.rms_norm(torch.from_numpy(h), torch.from_numpy(weight), 1e-6)
    assert relative_error(expected, onnx_run(fused, {"h": h})[0]) <= 1e-2


ONNX_LAYER = {
    "centred": spellings.NormSpelling(layer="centred", eps=1e-5),
    "centred, x*x, divided, eps 1e-12": spellings.NormSpelling(layer="centred", square="mul", inverse="div", eps=1e-12),
    "tf2onnx x*s + (b - mean*s)": spellings.NormSpelling(layer="tf", eps=1e-3),
}


@pytest.mark.parametrize("name", ONNX_LAYER)
def test_onnx_layer_norm_written_out(name):
    spec = ONNX_LAYER[name]
    fused, outcomes = onnx_rewrite(spellings.norm_model(spec), [Normalization()])
    assert [(o.op, o.fused) for o in outcomes] == [(LAYER, True)]
    assert op_types(fused) == [LAYER] and epsilon(fused.graph.node[0]) == np.float32(spec.eps)
    assert all(name.startswith("c_") for name in fused.graph.node[0].input[1:])  # the graph's own w and b
    h = activations(1)
    assert relative_error(spellings.norm_reference(spec, h), onnx_run(fused, {"h": h})[0]) <= TOLERANCE


def test_onnx_layer_norm_after_a_residual_becomes_a_skip_layer_norm():
    spec = spellings.NormSpelling(layer="centred", residual=True)
    fused, outcomes = onnx_rewrite(spellings.norm_model(spec), [Normalization(), SkipLayerNorm()])
    assert [(o.op, o.fused) for o in outcomes] == [(LAYER, True), (SKIP_LAYER, True)]
    assert op_types(fused) == [SKIP_LAYER]
    h, r = activations(1), activations(2)
    y, total = onnx_run(fused, {"h": h, "r": r})
    assert relative_error(spellings.norm_reference(spec, h, r), y) <= TOLERANCE
    assert relative_error(h + r, total) <= TOLERANCE


NEAR_MISSES = {
    "no_eps": "no epsilon",
    "mean_over_tokens": "over the tokens",
    "scaled_mean": "scale is not one vector of the graph",
}


@pytest.mark.parametrize("layer", ["", "centred"], ids=["rms", "layer"])
@pytest.mark.parametrize("defect", NEAR_MISSES)
def test_onnx_near_misses_are_refused_with_their_reason(defect, layer):
    model = spellings.norm_model(spellings.NormSpelling(layer=layer, defect=defect))
    fused, outcomes = onnx_rewrite(model, [Normalization()])
    (outcome,) = outcomes  # one entry for the whole region, not one per reduction
    assert not outcome.fused and NEAR_MISSES[defect] in outcome.reason
    assert op_types(fused) == op_types(model)
    h = activations(1)
    assert relative_error(onnx_run(model, {"h": h})[0], onnx_run(fused, {"h": h})[0]) == 0.0


# --------------------------------------------------------------------------- fx

EPS = 1e-6


def rsqrt(x, w, b):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def divided(x, w, b):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS))


def gemma(x, w, b):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * (1.0 + w)


def casts(x, w, b):
    inner = x.to(torch.float32)
    return w * (inner * torch.rsqrt(inner.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def centred(x, w, b):
    c = x - x.mean(-1, keepdim=True)
    return c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + EPS) * w + b


def tf2onnx(x, w, b):
    mean = x.mean(-1, keepdim=True)
    s = w * torch.rsqrt(((x - mean) * (x - mean)).mean(-1, keepdim=True) + EPS)
    return x * s + (b - mean * s)


def no_eps(x, w, b):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * w


def over_tokens(x, w, b):
    return x * torch.rsqrt(x.pow(2).mean(-2, keepdim=True) + EPS) * w


def scaled_mean(x, w, b):
    return x * torch.rsqrt(2.0 * x.pow(2).mean(-1, keepdim=True) + EPS) * w


class Norm(torch.nn.Module):
    """One normalization of h (or of h + r, the sum returned too), spelled by `spelling`."""

    def __init__(self, spelling, residual: bool = False, dtype=torch.float32):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.spelling, self.residual = spelling, residual
        self.weight = torch.nn.Parameter((0.5 + torch.rand(HIDDEN, generator=generator)).to(dtype))
        self.bias = torch.nn.Parameter((torch.rand(HIDDEN, generator=generator) - 0.5).to(dtype))

    def forward(self, h, r):
        if not self.residual:
            return self.spelling(h, self.weight, self.bias)
        total = h + r
        return self.spelling(total, self.weight, self.bias), total


def fx_norm(spelling, residual=False, dtype=torch.float32, rules=None):
    module = Norm(spelling, residual, dtype)
    runs = [tuple(torch.from_numpy(activations(seed)).to(dtype) for seed in (s, s + 1)) for s in (10, 20)]
    fused, outcomes = fx_rewrite(module, runs, rules or [Normalization()])
    h, r = (torch.from_numpy(activations(seed)).to(dtype) for seed in (1, 2))
    return module, fused, outcomes, (h, r)


def fused_eps(module: torch.fx.GraphModule, op: registry.FusedOp) -> float:
    return next(node.args[-1] for node in module.graph.nodes if node.target is op.torch)


@pytest.mark.parametrize("spelling, weight", [(rsqrt, lambda w: w), (divided, lambda w: w),
                                              (gemma, lambda w: 1.0 + w)], ids=["x*rsqrt", "x/sqrt", "gemma 1+w"])
def test_fx_rms_norm(spelling, weight):
    module, fused, outcomes, (h, r) = fx_norm(spelling)
    assert [(o.op, o.fused) for o in outcomes] == [(registry.RMS_NORM.name, True)]
    assert registry.RMS_NORM.torch in fx_targets(fused) and fused_eps(fused, registry.RMS_NORM) == EPS
    with torch.no_grad():
        expected = reference.rms_norm(h, weight(module.weight), EPS)
        assert relative_error(expected, fused(h, r)) <= TOLERANCE


def test_fx_rms_norm_computed_in_float32_of_a_bfloat16_input():
    module, fused, outcomes, (h, r) = fx_norm(casts, dtype=torch.bfloat16)
    assert [(o.op, o.fused) for o in outcomes] == [(registry.RMS_NORM.name, True)]
    assert fused_eps(fused, registry.RMS_NORM) == EPS
    with torch.no_grad():
        got = fused(h, r)
        assert got.dtype == torch.bfloat16
        assert relative_error(reference.rms_norm(h, module.weight, EPS).float(), got.float()) <= 5e-2


def test_fx_residual_before_an_rms_norm_is_claimed():
    module, fused, outcomes, (h, r) = fx_norm(rsqrt, residual=True)
    assert [(o.op, o.fused) for o in outcomes] == [(registry.SKIP_RMS_NORM.name, True)]
    assert torch.ops.aten.add.Tensor not in fx_targets(fused)  # the sum is the fused op's
    with torch.no_grad():
        y, total = fused(h, r)
        expected, expected_total = reference.skip_rms_norm(h, r, module.weight, EPS)
        assert relative_error(expected, y) <= TOLERANCE and relative_error(expected_total, total) <= TOLERANCE


@pytest.mark.parametrize("spelling", [centred, tf2onnx], ids=["centred", "tf2onnx"])
def test_fx_layer_norm_written_out(spelling):
    module, fused, outcomes, (h, r) = fx_norm(spelling)
    assert [(o.op, o.fused) for o in outcomes] == [(registry.LAYER_NORM.name, True)]
    (norm,) = [node for node in fused.graph.nodes if node.target is torch.ops.aten.layer_norm.default]
    assert norm.args[4] == EPS and [node.target for node in norm.args[2:4]] == ["weight", "bias"]  # the graph's own
    with torch.no_grad():
        expected = torch.nn.functional.layer_norm(h, (HIDDEN,), module.weight, module.bias, EPS)
        assert relative_error(expected, fused(h, r)) <= TOLERANCE


def test_fx_layer_norm_after_a_residual_becomes_a_skip_layer_norm():
    module, fused, outcomes, (h, r) = fx_norm(centred, residual=True, rules=[Normalization(), SkipLayerNorm()])
    assert [(o.op, o.fused) for o in outcomes] == [(registry.LAYER_NORM.name, True),
                                                   (registry.SKIP_LAYER_NORM.name, True)]
    assert torch.ops.aten.layer_norm.default not in fx_targets(fused)
    with torch.no_grad():
        y, total = fused(h, r)
        expected = torch.nn.functional.layer_norm(h + r, (HIDDEN,), module.weight, module.bias, EPS)
        assert relative_error(expected, y) <= TOLERANCE and relative_error(h + r, total) <= TOLERANCE


@pytest.mark.parametrize("spelling, reason", [(no_eps, "no epsilon"), (over_tokens, "over the tokens"),
                                              (scaled_mean, "scale is not one vector of the graph")],
                         ids=["no eps", "mean over tokens", "scaled mean"])
def test_fx_near_misses_are_refused_with_their_reason(spelling, reason):
    module, fused, outcomes, (h, r) = fx_norm(spelling)
    (outcome,) = outcomes
    assert (outcome.op, outcome.fused) == (registry.RMS_NORM.name, False) and reason in outcome.reason
    assert not any(op.torch in fx_targets(fused) for op in (registry.RMS_NORM, registry.SKIP_RMS_NORM))
    with torch.no_grad():
        assert relative_error(module(h, r), fused(h, r)) == 0.0
