"""Run rules alone through the driver on tiny graphs: an ONNX model (probed on its own check
inputs) or a torch module (captured by torch.export and probed on the runs given)."""
from __future__ import annotations

import onnx
import onnx_ir as ir
import torch

from attnfuse.core import driver
from attnfuse.core.outcome import Outcome
from attnfuse.optimizer.probe import Probe
from attnfuse.passes.fx.adapter import FxGraph
from attnfuse.passes.fx.graph import FxProbe, remove_dead, remove_no_ops
from attnfuse.passes.fx.view import TorchView
from attnfuse.passes.onnx.adapter import OnnxGraph
from attnfuse.passes.onnx.graph import MS_DOMAIN, opset, remove_unused, speaking_opset
from attnfuse.passes.onnx.view import OrtView


def onnx_rewrite(model: onnx.ModelProto, rules) -> tuple[onnx.ModelProto, list[Outcome]]:
    """The model rewritten by `rules`, and the report's entries."""
    graph_model = ir.from_proto(model)
    probe = Probe.capture(graph_model)
    version = opset(graph_model.graph)
    with speaking_opset(version):
        view = OrtView(probe, version)
        applied = driver.rewrite(OnnxGraph(graph_model.graph, view), view, rules)
    remove_unused(graph_model)
    graph_model.graph.sort()
    if any(node.domain == MS_DOMAIN for node in graph_model.graph):
        graph_model.opset_imports[MS_DOMAIN] = 1
    return ir.to_proto(graph_model), [entry.outcome for entry in applied]


def fx_rewrite(module: torch.nn.Module, runs: list[tuple[torch.Tensor, ...]], rules
               ) -> tuple[torch.fx.GraphModule, list[Outcome]]:
    """The module captured (every dim dynamic), rewritten by `rules`, and the report's entries."""
    dims = tuple({axis: torch.export.Dim.AUTO for axis in range(x.dim())} for x in runs[0])
    captured = torch.export.export(module, runs[0], dynamic_shapes=dims, strict=False).module()
    remove_no_ops(captured.graph)
    view = TorchView(FxProbe(captured, [(args, {}) for args in runs]))
    applied = driver.rewrite(FxGraph(captured.graph, view), view, rules)
    remove_dead(captured.graph)
    captured.recompile()
    return captured, [entry.outcome for entry in applied]


def ops_of(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def targets_of(module: torch.fx.GraphModule) -> list:
    return [node.target for node in module.graph.nodes if node.op == "call_function"]
