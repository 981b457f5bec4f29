"""The skip-layernorm rule on tiny graphs of both front-ends: layernorm(h + bias + skip) becomes one
skip layernorm whose sum output replaces the residual sum where something else reads it; near
misses (a norm not over the last axis, a sum with a constant, a broadcast operand) are refused or
left alone, with their reasons."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from run_rules import fx_rewrite, fx_targets, onnx_rewrite, onnx_run, op_types, relative_error

from attnfuse.core import registry
from attnfuse.kernels import reference
from attnfuse.passes.rules.skip_layer_norm import SkipLayerNorm

HIDDEN, TOLERANCE = 16, 1e-4
SKIP = registry.SKIP_LAYER_NORMALIZATION.op_type
RNG = np.random.default_rng(0)
GAMMA, BETA, BIAS = (RNG.standard_normal(HIDDEN).astype(np.float32) for _ in range(3))


def activations(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 5, HIDDEN)).astype(np.float32)


def expected(h, skip, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    h, skip = torch.from_numpy(h), torch.from_numpy(skip)
    bias_t = torch.from_numpy(BIAS) if bias is not None else None
    total = h + skip + (bias_t if bias_t is not None else 0)
    return reference.skip_layernorm(h, skip, bias_t, torch.from_numpy(GAMMA), torch.from_numpy(BETA), 1e-5), total


def onnx_model(bias: bool, sum_is_output: bool, axis: int = -1):
    """layernorm(h (+ bias) + skip) over `axis`; the sum a graph output too when asked."""
    nodes = [helper.make_node("Add", ["h", "b"], ["hb"])] if bias else []
    nodes += [helper.make_node("Add", ["hb" if bias else "h", "skip"], ["total"]),
              helper.make_node("LayerNormalization", ["total", "gamma", "beta"], ["y"], axis=axis, epsilon=1e-5)]
    tensor = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "S", HIDDEN])  # noqa: E731
    outputs = [tensor("y")] + ([tensor("total")] if sum_is_output else [])
    weights = [numpy_helper.from_array(GAMMA, "gamma"), numpy_helper.from_array(BETA, "beta")]
    weights += [numpy_helper.from_array(BIAS, "b")] if bias else []
    graph = helper.make_graph(nodes, "g", [tensor("h"), tensor("skip")], outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
@pytest.mark.parametrize("sum_is_output", [False, True], ids=["sum inside", "sum read later"])
def test_onnx_residual_layernorm_becomes_one_skip_layernorm(bias, sum_is_output):
    fused, outcomes = onnx_rewrite(onnx_model(bias, sum_is_output), [SkipLayerNorm()])
    assert [(o.op, o.fused) for o in outcomes] == [(SKIP, True)]
    assert op_types(fused) == [SKIP]
    h, skip = activations(1), activations(2)
    got = onnx_run(fused, {"h": h, "skip": skip})
    y, total = expected(h, skip, BIAS if bias else None)
    assert relative_error(y, got[0]) <= TOLERANCE
    if sum_is_output:
        assert relative_error(total, got[1]) <= TOLERANCE


def test_onnx_a_layernorm_not_over_the_last_axis_is_refused():
    _, outcomes = onnx_rewrite(onnx_model(False, False, axis=1), [SkipLayerNorm()])
    assert [(o.fused, o.reason) for o in outcomes] == [(False, "layernorm is not over the last axis")]


def test_onnx_a_sum_with_a_constant_is_not_a_residual():
    model = onnx_model(False, False)
    model.graph.input.pop()  # skip becomes a weight: h + constant is a bias, not a residual
    model.graph.initializer.append(numpy_helper.from_array(BIAS.reshape(1, 1, HIDDEN), "skip"))
    _, outcomes = onnx_rewrite(model, [SkipLayerNorm()])
    assert [(o.fused, o.reason) for o in outcomes] == [(False, "the input is not a residual sum")]


class Residual(torch.nn.Module):
    def __init__(self, broadcast: bool = False):
        super().__init__()
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.norm.weight.data, self.norm.bias.data = torch.from_numpy(GAMMA), torch.from_numpy(BETA)
        self.broadcast = broadcast

    def forward(self, h, skip):
        total = h + (skip[:1] if self.broadcast else skip)
        return self.norm(total), total * 2  # the sum is read again, as the next residual reads it


def test_fx_residual_layernorm_becomes_one_skip_layernorm_and_gives_the_sum_back():
    runs = [(torch.from_numpy(activations(1)), torch.from_numpy(activations(2))),
            (torch.from_numpy(activations(3)), torch.from_numpy(activations(4)))]
    module, outcomes = fx_rewrite(Residual(), runs, [SkipLayerNorm()])
    assert [(o.op, o.fused) for o in outcomes] == [(registry.SKIP_LAYER_NORM.name, True)]
    assert registry.SKIP_LAYER_NORM.torch in fx_targets(module)
    y, doubled = module(*runs[0])
    want_y, want_total = expected(*(x.numpy() for x in runs[0]))
    assert relative_error(want_y, y.detach()) <= TOLERANCE
    assert relative_error(want_total * 2, doubled.detach()) <= TOLERANCE


def test_fx_a_broadcast_operand_is_not_a_residual():
    runs = [(torch.from_numpy(activations(1)), torch.from_numpy(activations(2)))]
    _, outcomes = fx_rewrite(Residual(broadcast=True), runs, [SkipLayerNorm()])
    assert [(o.fused, o.reason) for o in outcomes] == [(False, "the input is not a residual sum")]
