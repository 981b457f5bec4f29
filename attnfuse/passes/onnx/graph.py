"""Small helpers over onnx_ir graphs: reading constants, following uses, building nodes."""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"


class NoMatch(Exception):
    """The first thing that did not fit; its message is the reason in the report."""


def op_of(value: ir.Value | None) -> str | None:
    """The op type that produces `value`, or None for graph inputs and initializers."""
    node = value.producer() if value is not None else None
    return node.op_type if node is not None else None


def consumers(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def only_consumer(value: ir.Value) -> ir.Node | None:
    users = consumers(value)
    if len(users) == 1 and not value.is_graph_output():
        return users[0]
    return None


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def constant(value: ir.Value | None, probe=None) -> np.ndarray | None:
    """The value of a tensor that does not depend on the inputs, or None.

    Initializers and Constant nodes are read directly; anything else counts as a
    constant when the probe saw it equal on two different sets of inputs (shape
    arithmetic such as sqrt(head_size) folds that way).
    """
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].value.numpy()
    if probe is not None and value.name and probe.is_constant(value.name):
        return probe.get(value.name)
    return None


def scalar(value: ir.Value | None, probe=None) -> float | None:
    array = constant(value, probe)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def observed(value: ir.Value, probe, run: int = 0) -> np.ndarray:
    array = probe.get(value.name, run) if value.name else None
    if array is None:
        raise NoMatch(f"no value was observed for {value.name!r}")
    return array


class Builder:
    """Makes the nodes of one rewrite. Nothing touches the graph until `commit`.

    New values get names under a prefix so that a rewrite can be evaluated on its
    own (see `proof.py`) and read in the output graph.
    """

    _counter = itertools.count()

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[ir.Node] = []
        self._constants: dict[tuple, ir.Value] = {}

    def _name(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(self._counter)}"

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: dict | None = None,
           *, domain: str = "", num_outputs: int = 1, name: str | None = None):
        outputs = [ir.Value(name=self._name(f"{op_type}_out{i}" if num_outputs > 1 else op_type))
                   for i in range(num_outputs)]
        node = ir.Node(domain, op_type, list(inputs), _attributes(attributes or {}),
                       outputs=outputs, name=name or self._name(op_type))
        self.nodes.append(node)
        return outputs[0] if num_outputs == 1 else outputs

    def const(self, array, dtype=None) -> ir.Value:
        array = np.asarray(array, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.op("Constant", [], {"value": ir.tensor(array)})
        return self._constants[key]

    def commit(self, graph: ir.Graph, after: ir.Node) -> None:
        """Insert the nodes after `after`, which follows every value they read."""
        graph.insert_after(after, self.nodes)


def _attributes(attributes: dict) -> list[ir.Attr]:
    out = []
    for key, value in attributes.items():
        if isinstance(value, ir.Attr):
            out.append(value)
        elif isinstance(value, bool) or isinstance(value, (int, np.integer)):
            out.append(ir.AttrInt64(key, int(value)))
        elif isinstance(value, (float, np.floating)):
            out.append(ir.AttrFloat32(key, float(value)))
        elif isinstance(value, str):
            out.append(ir.AttrString(key, value))
        elif isinstance(value, (list, tuple)):
            out.append(ir.AttrInt64s(key, [int(v) for v in value]))
        else:  # a tensor
            out.append(ir.AttrTensor(key, value))
    return out


def replace_uses(old: ir.Value, new: ir.Value) -> None:
    """Point every reader of `old`, graph outputs included, at `new`."""
    if old.is_graph_output():
        graph = old.graph
        new.name, old.name = old.name, f"{old.name}__replaced"
        for i, output in enumerate(graph.outputs):
            if output is old:
                graph.outputs[i] = new
        new.shape, new.type = old.shape, old.type
    old.replace_all_uses_with(new)


def remove_unused(model: ir.Model) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    _forget_abandoned_readers(model.graph)
    RemoveUnusedNodesPass()(model)


def _forget_abandoned_readers(graph: ir.Graph) -> None:
    """Nodes a rewrite built and then dropped (its proof failed, or another lowering won) still
    count as readers of the values they took in; detach them, so what only they read can go."""
    values = [*graph.inputs, *graph.initializers.values(), *(out for node in graph for out in node.outputs)]
    for value in values:
        for node, index in value.uses():
            if node.graph is None:
                node.replace_input_with(index, None)


def opset(graph: ir.Graph) -> int:
    return graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 20))
