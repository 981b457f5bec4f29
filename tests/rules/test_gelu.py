"""The gelu rule on tiny graphs of both IRs: gelu however it is spelled (Erf or Tanh written out,
ONNX's Gelu op, aten.gelu) becomes the fused bias + gelu with its bias folded in (an Add's
constant vector, or in fx a linear's own bias), equal to kernels/reference.py's bias_gelu; a
region that is almost a gelu (a wrong constant) is left alone."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from attnfuse.core import tolerance
from attnfuse.kernels import ops, reference
from attnfuse.passes.rules.gelu import Gelu
from run_rules import fx_rewrite, fx_targets, onnx_rewrite, op_types

HIDDEN = 8
TANH_CONSTANT = 0.044715
rng = np.random.default_rng(0)
WEIGHT = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)  # [in, out]
BIAS = rng.standard_normal(HIDDEN).astype(np.float32)
X = rng.standard_normal((3, 5, HIDDEN)).astype(np.float32)


def expected(x: np.ndarray, approximate: str, bias: np.ndarray | None = BIAS) -> np.ndarray:
    h = torch.from_numpy(x @ WEIGHT)
    return reference.bias_gelu(h, None if bias is None else torch.from_numpy(bias), approximate).numpy()


def close(want: np.ndarray, got: np.ndarray) -> bool:
    return tolerance.relative_error(want, got) <= tolerance.FLOAT32


# --------------------------------------------------------------------------- ONNX


class OnnxGelu:
    """y = gelu(x @ W (+ b)), the gelu spelled as asked."""

    def __init__(self):
        self.nodes, self.initializers = [], []

    def const(self, value) -> str:
        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        out = f"{op_type.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attributes))
        return out

    def model(self, spelling: str, bias: bool = True, constant: float = TANH_CONSTANT) -> onnx.ModelProto:
        h = self.op("MatMul", "x", self.const(WEIGHT))
        h = self.op("Add", h, self.const(BIAS)) if bias else h
        if spelling == "erf":
            y = self.op("Mul", self.op("Mul", h, self.const(0.5)),
                        self.op("Add", self.op("Erf", self.op("Div", h, self.const(math.sqrt(2)))), self.const(1.0)))
        elif spelling == "tanh":
            inner = self.op("Add", h, self.op("Mul", self.op("Pow", h, self.const(3.0)), self.const(constant)))
            turned = self.op("Tanh", self.op("Mul", inner, self.const(math.sqrt(2 / math.pi))))
            y = self.op("Mul", self.op("Mul", h, self.const(0.5)), self.op("Add", turned, self.const(1.0)))
        else:  # ONNX's Gelu op: "op" or "op-tanh"
            y = self.op("Gelu", h, approximate="tanh" if spelling == "op-tanh" else "none")
        graph = helper.make_graph(
            self.nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], initializer=self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("spelling, approximate, op", [
    ("erf", "none", "BiasGelu"), ("tanh", "tanh", "FastGelu"), ("op", "none", "BiasGelu"), ("op-tanh", "tanh", "FastGelu"),
])
def test_onnx_gelu_spellings_fuse_with_their_bias(spelling, approximate, op):
    model, outcomes = onnx_rewrite(OnnxGelu().model(spelling), [Gelu()])
    assert [(o.op, o.fused) for o in outcomes] == [(op, True)]
    assert op in op_types(model) and not {"Erf", "Tanh", "Gelu", "Add"} & set(op_types(model))
    assert close(expected(X, approximate), run(model, X))


def test_onnx_gelu_without_bias_is_the_gelu_op_of_onnx_runtime():
    model, outcomes = onnx_rewrite(OnnxGelu().model("erf", bias=False), [Gelu()])
    assert [(o.op, o.fused) for o in outcomes] == [("Gelu", True)]
    (node,) = [n for n in model.graph.node if n.op_type == "Gelu"]
    assert node.domain == "com.microsoft"
    assert close(expected(X, "none", bias=None), run(model, X))


def test_onnx_tanh_gelu_with_a_wrong_constant_is_left_alone():
    original = OnnxGelu().model("tanh", constant=0.05)
    model, outcomes = onnx_rewrite(original, [Gelu()])
    assert not any(o.fused for o in outcomes)
    assert "Tanh" in op_types(model) and "FastGelu" not in op_types(model)
    assert close(run(original, X), run(model, X))
    assert not close(expected(X, "tanh"), run(model, X))


# --------------------------------------------------------------------------- fx


class LinearGelu(torch.nn.Module):
    def __init__(self, approximate: str):
        super().__init__()
        self.linear, self.approximate = torch.nn.Linear(HIDDEN, HIDDEN), approximate

    def forward(self, x):
        return torch.nn.functional.gelu(self.linear(x), approximate=self.approximate)


class WrittenOutGelu(torch.nn.Module):
    """gelu(x @ W + b) spelled out with erf or tanh."""

    def __init__(self, spelling: str, constant: float = TANH_CONSTANT):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.from_numpy(WEIGHT)), torch.nn.Parameter(torch.from_numpy(BIAS))
        self.spelling, self.constant = spelling, constant

    def forward(self, x):
        h = x @ self.weight + self.bias
        if self.spelling == "erf":
            return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        return h * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + self.constant * torch.pow(h, 3))))


RUNS = [(torch.randn(2, 5, HIDDEN),), (torch.randn(3, 7, HIDDEN),)]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fx_aten_gelu_takes_the_linear_bias(approximate):
    torch.manual_seed(0)
    module = LinearGelu(approximate).eval()
    fused, outcomes = fx_rewrite(module, RUNS, [Gelu()])
    assert [(o.op, o.fused) for o in outcomes] == [("bias_gelu", True)]
    assert ops.bias_gelu in fx_targets(fused) and torch.ops.aten.gelu.default not in fx_targets(fused)
    (linear,) = [n for n in fused.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linear.args) == 2  # its bias moved into the fused op
    x = torch.randn(4, 6, HIDDEN)
    want = reference.bias_gelu(torch.nn.functional.linear(x, module.linear.weight), module.linear.bias, approximate)
    with torch.no_grad():
        assert close(want.numpy(), fused(x).numpy())


@pytest.mark.parametrize("spelling, approximate", [("erf", "none"), ("tanh", "tanh")])
def test_fx_written_out_gelu_fuses_with_its_bias(spelling, approximate):
    fused, outcomes = fx_rewrite(WrittenOutGelu(spelling).eval(), RUNS, [Gelu()])
    assert [(o.op, o.fused) for o in outcomes] == [("bias_gelu", True)]
    assert ops.bias_gelu in fx_targets(fused)
    assert not {torch.ops.aten.erf.default, torch.ops.aten.tanh.default} & set(fx_targets(fused))
    with torch.no_grad():
        assert close(expected(X, approximate), fused(torch.from_numpy(X)).numpy())


def test_fx_tanh_gelu_with_a_wrong_constant_is_left_alone():
    module = WrittenOutGelu("tanh", constant=0.05).eval()
    fused, outcomes = fx_rewrite(module, RUNS, [Gelu()])
    assert not any(o.fused for o in outcomes) and ops.bias_gelu not in fx_targets(fused)
    with torch.no_grad():
        assert close(module(torch.from_numpy(X)).numpy(), fused(torch.from_numpy(X)).numpy())
