"""The projections and SiLU rules on tiny graphs of both IRs.

Projections: q, k and v of one activation (with and without biases, or some with), and gate and
up, become one product by the concatenated weights, split back, equal to the numpy projections;
projections of different activations, or by a weight the graph does not store (an input), are
left alone. SiLU: x * sigmoid(x) however it is spelled becomes one op (QuickGelu in ONNX, aten.silu
in fx), equal to kernels/reference.py's silu; x * sigmoid(2 x) is read with its alpha (QuickGelu
takes it; fx has no one op for it and says so); x * sigmoid(x + 1) is no SiLU and is left alone.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from attnfuse.core import tolerance
from attnfuse.kernels import reference
from attnfuse.passes.rules.projections import Projections
from attnfuse.passes.rules.silu import Silu
from run_rules import OnnxNodes, fx_rewrite, fx_targets, onnx_rewrite, op_types

aten = torch.ops.aten
HIDDEN = 8
WIDTHS = {"q": 8, "k": 4, "v": 4}
rng = np.random.default_rng(0)
WEIGHTS = {name: rng.standard_normal((HIDDEN, width)).astype(np.float32) for name, width in WIDTHS.items()}  # [in, out]
BIASES = {name: rng.standard_normal(width).astype(np.float32) for name, width in WIDTHS.items()}
X = rng.standard_normal((3, 5, HIDDEN)).astype(np.float32)
RUNS = [(torch.randn(2, 5, HIDDEN),), (torch.randn(3, 7, HIDDEN),)]


def projected(x: np.ndarray, name: str, bias: bool) -> np.ndarray:
    return x @ WEIGHTS[name] + (BIASES[name] if bias else 0)


def silu(x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    return reference.silu(torch.from_numpy(x), alpha).numpy()


def close(want: np.ndarray, got: np.ndarray) -> bool:
    return tolerance.relative_error(want, got) <= tolerance.FLOAT32


def fused_entries(outcomes) -> list[tuple[str, bool]]:
    return [(o.op, o.fused) for o in outcomes]


# --------------------------------------------------------------------------- ONNX


class OnnxGraph(OnnxNodes):
    """A graph with input x [batch, seq, HIDDEN] (and `inputs`), built node by node."""

    def __init__(self, inputs: tuple[str, ...] = ("x",)):
        super().__init__()
        self.inputs = inputs

    def projection(self, x: str, name: str, bias: bool) -> str:
        y = self.op("MatMul", x, self.const(WEIGHTS[name]))
        return self.op("Add", y, self.const(BIASES[name])) if bias else y

    def model(self, *outputs: str) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "sequence", HIDDEN])
                  for name in self.inputs]
        graph = helper.make_graph(self.nodes, "projections", inputs,
                                  [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in outputs],
                                  initializer=self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def run(model: onnx.ModelProto, **feeds: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("biased", [("q", "k", "v"), (), ("q", "v")], ids=["biases", "no-bias", "some-biases"])
def test_onnx_qkv_become_one_matmul_and_split(biased):
    g = OnnxGraph()
    outputs = [g.projection("x", name, name in biased) for name in WIDTHS]
    model, outcomes = onnx_rewrite(g.model(*outputs), [Projections()])
    assert fused_entries(outcomes) == [("MatMul + Split", True)]
    assert op_types(model).count("MatMul") == 1 and "Split" in op_types(model)
    assert op_types(model).count("Add") == (1 if biased else 0)
    (matmul,) = [node for node in model.graph.node if node.op_type == "MatMul"]
    weights = {t.name: t for t in model.graph.initializer}  # an initializer: ONNX Runtime's quantizers find it
    assert tuple(weights[matmul.input[1]].dims) == (HIDDEN, sum(WIDTHS.values()))
    for name, got in zip(WIDTHS, run(model, x=X)):
        assert close(projected(X, name, name in biased), got)


def test_onnx_gate_and_up_with_silu_become_one_matmul_and_quick_gelu():
    g = OnnxGraph()
    gate, up = g.projection("x", "q", False), g.projection("x", "k", False)
    gated = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), g.op("Concat", up, up, axis=-1))
    model, outcomes = onnx_rewrite(g.model(gated), [Projections(), Silu()])
    assert fused_entries(outcomes) == [("MatMul + Split", True), ("QuickGelu", True)]
    assert op_types(model).count("MatMul") == 1 and "Sigmoid" not in op_types(model)
    want = silu(projected(X, "q", False)) * np.concatenate([projected(X, "k", False)] * 2, -1)
    assert close(want, run(model, x=X)[0])


def test_onnx_projections_of_different_activations_are_left_alone():
    g = OnnxGraph(("x", "y"))
    model, outcomes = onnx_rewrite(g.model(g.projection("x", "q", True), g.projection("y", "k", True)),
                                   [Projections()])
    assert outcomes == [] and op_types(model).count("MatMul") == 2


def test_onnx_a_weight_given_as_an_input_is_not_fused():
    g = OnnxGraph(("x",))
    q = g.projection("x", "q", False)
    k = g.op("MatMul", "x", "w")
    original = g.model(q, k)
    original.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [HIDDEN, HIDDEN]))
    model, outcomes = onnx_rewrite(original, [Projections()])
    assert outcomes == [] and op_types(model).count("MatMul") == 2


@pytest.mark.parametrize("spelling", ["x*sigmoid", "sigmoid*x", "x/(1+exp(-x))"])
def test_onnx_silu_spellings_become_quick_gelu(spelling):
    g = OnnxGraph()
    if spelling == "x*sigmoid":
        y = g.op("Mul", "x", g.op("Sigmoid", "x"))
    elif spelling == "sigmoid*x":
        y = g.op("Mul", g.op("Sigmoid", "x"), "x")
    else:
        y = g.op("Div", "x", g.op("Add", g.const(1.0), g.op("Exp", g.op("Neg", "x"))))
    model, outcomes = onnx_rewrite(g.model(y), [Silu()])
    assert fused_entries(outcomes) == [("QuickGelu", True)]
    (node,) = model.graph.node
    assert (node.op_type, node.domain, helper.get_attribute_value(node.attribute[0])) == \
        ("QuickGelu", "com.microsoft", 1.0)
    assert close(silu(X), run(model, x=X)[0])


def test_onnx_silu_reads_its_alpha():
    """x * sigmoid(2x) is QuickGelu with alpha 2 (the graph's own constant), not SiLU."""
    g = OnnxGraph()
    y = g.op("Mul", "x", g.op("Sigmoid", g.op("Mul", "x", g.const(2.0))))
    model, outcomes = onnx_rewrite(g.model(y), [Silu()])
    assert fused_entries(outcomes) == [("QuickGelu", True)]
    (node,) = model.graph.node
    assert helper.get_attribute_value(node.attribute[0]) == 2.0
    assert close(silu(X, 2.0), run(model, x=X)[0]) and not close(silu(X), run(model, x=X)[0])


def test_onnx_a_shifted_sigmoid_is_no_silu():
    g = OnnxGraph()
    y = g.op("Mul", "x", g.op("Sigmoid", g.op("Add", "x", g.const(1.0))))
    model, outcomes = onnx_rewrite(g.model(y), [Silu()])
    assert outcomes == [] and "QuickGelu" not in op_types(model)


# --------------------------------------------------------------------------- fx


class Attention(torch.nn.Module):
    """q, k and v linears of one x (biases as asked)."""

    def __init__(self, biased: tuple[str, ...]):
        super().__init__()
        for name, width in WIDTHS.items():
            linear = torch.nn.Linear(HIDDEN, width, bias=name in biased)
            linear.weight.data = torch.from_numpy(WEIGHTS[name].T.copy())
            if name in biased:
                linear.bias.data = torch.from_numpy(BIASES[name])
            setattr(self, name, linear)

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


class GatedMlp(torch.nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)), the SiLU written out."""

    def __init__(self):
        super().__init__()
        self.gate, self.up = (torch.nn.Linear(HIDDEN, 16, bias=False) for _ in range(2))
        self.down = torch.nn.Linear(16, HIDDEN, bias=False)

    def forward(self, x):
        gate = self.gate(x)
        return self.down(gate * torch.sigmoid(gate) * self.up(x))


class TwoActivations(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(HIDDEN, 8), torch.nn.Linear(HIDDEN, 4)

    def forward(self, x, y):
        return self.q(x), self.k(y)


class WeightAsInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(HIDDEN, 8)

    def forward(self, x, w):
        return self.q(x), torch.nn.functional.linear(x, w)


class Swish(torch.nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, x):
        if self.spelling == "x*sigmoid":
            return x * torch.sigmoid(x)
        if self.spelling == "x/(1+exp(-x))":
            return x / (1 + torch.exp(-x))
        if self.spelling == "x*sigmoid(2x)":
            return x * torch.sigmoid(2 * x)
        return x * torch.sigmoid(x + 1)  # "shifted"


@pytest.mark.parametrize("biased", [("q", "k", "v"), (), ("q", "v")], ids=["biases", "no-bias", "some-biases"])
def test_fx_qkv_become_one_linear_and_split(biased):
    fused, outcomes = fx_rewrite(Attention(biased).eval(), RUNS, [Projections()])
    assert fused_entries(outcomes) == [("MatMul + Split", True)]
    assert fx_targets(fused).count(aten.linear.default) == 1 and aten.split_with_sizes.default in fx_targets(fused)
    with torch.no_grad():
        got = fused(torch.from_numpy(X))
    for name, piece in zip(WIDTHS, got):
        assert close(projected(X, name, name in biased), piece.numpy())


def test_fx_gate_and_up_become_one_linear_and_silu_one_op():
    module = GatedMlp().eval()
    fused, outcomes = fx_rewrite(module, RUNS, [Projections(), Silu()])
    assert fused_entries(outcomes) == [("MatMul + Split", True), ("silu", True)]
    assert fx_targets(fused).count(aten.linear.default) == 2  # gate and up as one, down
    assert aten.silu.default in fx_targets(fused) and aten.sigmoid.default not in fx_targets(fused)
    x = torch.from_numpy(X)
    want = module.down(reference.silu(module.gate(x)) * module.up(x))
    with torch.no_grad():
        assert close(want.detach().numpy(), fused(x).numpy())


def test_fx_projections_of_different_activations_are_left_alone():
    runs = [(a, a + 1) for (a,) in RUNS]
    fused, outcomes = fx_rewrite(TwoActivations().eval(), runs, [Projections()])
    assert outcomes == [] and fx_targets(fused).count(aten.linear.default) == 2


def test_fx_a_weight_given_as_an_input_is_not_fused():
    runs = [(a, torch.randn(4, HIDDEN)) for (a,) in RUNS]
    fused, outcomes = fx_rewrite(WeightAsInput().eval(), runs, [Projections()])
    assert outcomes == [] and fx_targets(fused).count(aten.linear.default) == 2


@pytest.mark.parametrize("spelling", ["x*sigmoid", "x/(1+exp(-x))"])
def test_fx_silu_spellings_become_aten_silu(spelling):
    fused, outcomes = fx_rewrite(Swish(spelling).eval(), RUNS, [Silu()])
    assert fused_entries(outcomes) == [("silu", True)]
    assert fx_targets(fused) == [aten.silu.default]
    with torch.no_grad():
        assert close(silu(X), fused(torch.from_numpy(X)).numpy())


def test_fx_silu_with_another_alpha_has_no_torch_form():
    module = Swish("x*sigmoid(2x)").eval()
    fused, outcomes = fx_rewrite(module, RUNS, [Silu()])
    assert fused_entries(outcomes) == [("silu", False)] and "no torch form" in outcomes[0].reason
    with torch.no_grad():
        assert close(silu(X, 2.0), fused(torch.from_numpy(X)).numpy())


def test_fx_a_shifted_sigmoid_is_no_silu():
    fused, outcomes = fx_rewrite(Swish("shifted").eval(), RUNS, [Silu()])
    assert outcomes == [] and aten.silu.default not in fx_targets(fused)


def test_onnx_weights_in_external_data_are_not_joined(tmp_path, monkeypatch):
    """A large model's weights stay in its data file: joined, they would be held twice in memory."""
    g = OnnxGraph()
    original = g.model(*[g.projection("x", name, False) for name in WIDTHS])
    onnx.save(original, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx_data",
              size_threshold=0)
    monkeypatch.chdir(tmp_path)  # a ModelProto's external data is read from the current directory
    model, outcomes = onnx_rewrite(onnx.load(tmp_path / "model.onnx", load_external_data=False), [Projections()])
    assert [(o.fused, o.reason) for o in outcomes] == [
        (False, "the weights are in external data: joining them would copy them into memory")]
    assert op_types(model).count("MatMul") == len(WIDTHS)
