"""Rules run through the driver on tiny graphs of either front-end, as the pipelines run them."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

from attnfuse.core import driver
from attnfuse.optimizer import io
from attnfuse.optimizer.probe import Probe
from attnfuse.passes.fx.adapter import FxGraph
from attnfuse.passes.fx.graph import FxProbe, remove_dead, remove_no_ops
from attnfuse.passes.fx.view import TorchView
from attnfuse.passes.onnx.adapter import OnnxGraph
from attnfuse.passes.onnx.graph import MS_DOMAIN, opset, remove_unused, speaking_opset
from attnfuse.passes.onnx.view import OrtView


def onnx_rewrite(proto: onnx.ModelProto, rules: list) -> tuple[onnx.ModelProto, list]:
    """The model with `rules` applied, and the outcomes the driver reported."""
    model = io.load_model(proto)
    view = OrtView(Probe.capture(model), opset(model.graph))
    with speaking_opset(opset(model.graph)):
        applied = driver.rewrite(OnnxGraph(model.graph, view), view, rules)
    remove_unused(model)
    model.graph.sort()
    if any(node.domain == MS_DOMAIN for node in model.graph):
        model.opset_imports[MS_DOMAIN] = 1
    return ir.serde.serialize_model(model), [entry.outcome for entry in applied]


def onnx_run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in proto.graph.node]


def fx_rewrite(module: torch.nn.Module, runs: list[tuple], rules: list) -> tuple[torch.fx.GraphModule, list]:
    """`module` captured by torch.export on the first of `runs` (tuples of its arguments; every dim
    dynamic, as `optimize` captures), probed on all of them, with `rules` applied; and the outcomes."""
    dims = tuple({axis: torch.export.Dim.AUTO for axis in range(x.dim())} for x in runs[0])
    captured = torch.export.export(module.eval(), runs[0], dynamic_shapes=dims, strict=False).module()
    remove_no_ops(captured.graph)
    view = TorchView(FxProbe(captured, [(args, {}) for args in runs]))
    applied = driver.rewrite(FxGraph(captured.graph, view), view, rules)
    remove_dead(captured.graph)
    captured.recompile()
    return captured, [entry.outcome for entry in applied]


def fx_targets(module: torch.fx.GraphModule) -> list:
    return [node.target for node in module.graph.nodes if node.op == "call_function"]


def relative_error(expected, got) -> float:
    expected, got = (np.asarray(a, np.float64) for a in (expected, got))
    return float(np.abs(expected - got).max() / np.abs(expected).max())
