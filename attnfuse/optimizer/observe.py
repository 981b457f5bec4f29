"""Every value a model computes on given inputs, as ONNX Runtime computes it.

ONNX Runtime types each node's outputs itself (contrib ops, custom domains and ops
outside the model's opset included), so every node output is asked for as a graph
output without a declared type. Values inside an `If` branch cannot be asked for;
so the branch each `If` takes on these inputs is inlined into the graph, and the
model runs again, until no `If` that runs is left. Loop bodies run many times with
different values and stay unobserved.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import RemoveUnusedNodesPass

from attnfuse.optimizer.errors import first_line
from attnfuse.optimizer.io import session

Choices = dict[str, bool]  # If node name -> the branch it takes (True: then_branch)
MAX_NESTING = 8


class CannotLoad(Exception):
    """ONNX Runtime refuses the model itself (not the inputs it was given)."""


class Observer:
    """Calls return {value name: array} for one set of feeds; sessions are reused per branch choice."""

    def __init__(self, model: ir.Model):
        self.model = model
        self._sessions: dict[frozenset, tuple[ort.InferenceSession, list[str], dict[str, str]]] = {}

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        choices: Choices = {}
        for _ in range(MAX_NESTING):
            runner, names, conditions = self._session(choices)
            values = {**feeds, **{name: value for name, value in zip(names, runner.run(names, feeds))
                                  if isinstance(value, np.ndarray)}}
            taken = {node: bool(values[cond].reshape(-1)[0]) for node, cond in conditions.items()
                     if node not in choices and cond in values and values[cond].size == 1}
            if not taken:
                break
            choices.update(taken)
        return values

    def _session(self, choices: Choices):
        key = frozenset(choices.items())
        if key not in self._sessions:
            flat = inline_branches(self.model, choices)
            names = [v.name for node in flat.graph for v in node.outputs if v.name]
            conditions = {node.name: node.inputs[0].name for node in flat.graph if node.op_type == "If"}
            try:
                runner = session(flat, extra_outputs=names, optimize=False)
            except Exception as e:
                raise CannotLoad(first_line(e)) from None
            self._sessions[key] = (runner, names, conditions)
        return self._sessions[key]


def inline_branches(model: ir.Model, choices: Choices) -> ir.Model:
    """A copy of `model` (weights shared) in which each If named in `choices` is replaced by the
    branch it takes; the branch's values keep their names."""
    copy = model.clone()
    for _ in range(MAX_NESTING):
        chosen = [node for node in copy.graph if node.op_type == "If" and node.name in choices]
        if not chosen:
            break
        for node in chosen:
            _inline(copy.graph, node, choices[node.name])
    if choices:  # weights only the branches not taken read (ONNX Runtime warns of them at load)
        RemoveUnusedNodesPass()(copy)
    return copy


def _inline(graph: ir.Graph, node: ir.Node, then: bool) -> None:
    branch: ir.Graph = node.attributes["then_branch" if then else "else_branch"].value
    for value in list(branch.initializers.values()):
        branch.initializers.pop(value.name)
        graph.register_initializer(value)
    nodes = list(branch)
    branch.remove(nodes)
    graph.insert_before(node, nodes)
    for out, result in zip(node.outputs, list(branch.outputs)):
        if out.is_graph_output():  # the graph's output keeps its name: pass the branch's result through
            graph.insert_before(node, identity := ir.Node("", "Identity", [result], name=f"{node.name}/{out.name}"))
            result = identity.outputs[0]
            result.name, out.name = out.name, f"{out.name}__if"
            graph.outputs[[o is out for o in graph.outputs].index(True)] = result
        out.replace_all_uses_with(result)
    graph.remove(node, safe=True)
