"""Every value a model computes on given inputs, as ONNX Runtime computes it.

ONNX Runtime types each node's outputs itself (contrib ops, custom domains and ops
outside the model's opset included), so every node output is asked for as a graph
output without a declared type. Values inside an `If` branch cannot be asked for;
so the branch each `If` takes on these inputs is inlined into the graph, and the
model runs again, until no `If` that runs is left. A Loop body's values come out as
scan outputs, stacked over the iterations; the first iteration's are kept (a body
whose values change shape between iterations stays unobserved).
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class _Session:
    runner: ort.InferenceSession
    names: list[str]  # every node output of the main graph (Ifs inlined)
    bodies: dict[str, tuple[str | None, str | None]]  # see expose_loop_bodies
    conditions: dict[str, str]  # If node name -> its condition's name


class Observer:
    """Calls return {value name: array} for one set of feeds; sessions are reused per branch choice."""

    def __init__(self, model: ir.Model):
        self.model = model
        self._sessions: dict[tuple[frozenset, bool], _Session] = {}

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        choices: Choices = {}
        for _ in range(MAX_NESTING):
            compiled, values = self._run(feeds, choices)
            taken = {node: bool(values[cond].reshape(-1)[0]) for node, cond in compiled.conditions.items()
                     if node not in choices and cond in values and values[cond].size == 1}
            if not taken:
                break
            choices.update(taken)
        return values

    def _run(self, feeds: dict[str, np.ndarray], choices: Choices) -> tuple[_Session, dict[str, np.ndarray]]:
        compiled = None
        try:
            compiled = self._session(choices, loops=True)
            outputs = compiled.runner.run(compiled.names, feeds)
        except CannotLoad:
            raise
        except Exception:  # a Loop body whose values change shape between iterations: leave it unobserved
            if compiled is not None and not compiled.bodies:
                raise  # no Loop body exposed: the model itself does not take these feeds
            compiled = self._session(choices, loops=False)
            outputs = compiled.runner.run(compiled.names, feeds)
        values = {**feeds, **{name: v for name, v in zip(compiled.names, outputs) if isinstance(v, np.ndarray)}}
        for inner, (stacked, start) in compiled.bodies.items():  # a Loop body's first iteration
            if stacked is not None and stacked in values and len(values[stacked]):
                values[inner] = values[stacked][0]
            elif start is not None and start in values:
                values[inner] = values[start]
        return compiled, values

    def _session(self, choices: Choices, loops: bool) -> _Session:
        key = (frozenset(choices.items()), loops)
        if key not in self._sessions:
            flat = inline_branches(self.model, choices)
            bodies = expose_loop_bodies(flat) if loops else {}
            names = [v.name for node in flat.graph for v in node.outputs if v.name]
            conditions = {node.name: node.inputs[0].name for node in flat.graph if node.op_type == "If"}
            try:
                runner = session(flat, extra_outputs=names, optimize=False)
            except Exception as e:
                if bodies:
                    raise RuntimeError("the Loop bodies' values cannot come out") from None
                raise CannotLoad(first_line(e)) from None
            self._sessions[key] = _Session(runner, names, bodies, conditions)
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


def expose_loop_bodies(model: ir.Model) -> dict[str, tuple[str | None, str | None]]:
    """Make every value the body of each of the graph's Loops computes a scan output of the Loop.
    Returns {body value: (the Loop output stacking it over iterations, or None; the value it starts
    from, for the body's inputs)}."""
    bodies: dict[str, tuple[str | None, str | None]] = {}
    for node in model.graph:
        if node.op_type != "Loop":
            continue
        body: ir.Graph = node.attributes["body"].value
        starts = [None, None, *(x.name if x is not None else None for x in node.inputs[2:])]
        for inner, start in zip(body.inputs, starts):  # iteration number, condition, carried values
            bodies[inner.name] = (None, start)
        exposed = [v for inner in body for v in inner.outputs if v.name and not v.is_graph_output()]
        body.outputs.extend(exposed)
        first = len(node.outputs)
        node.resize_outputs(first + len(exposed))
        for out, value in zip(node.outputs[first:], exposed):
            out.name = f"{value.name}__iterations"
            bodies[value.name] = (out.name, None)
    return bodies


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
