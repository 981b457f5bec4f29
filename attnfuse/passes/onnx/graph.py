"""Small helpers over onnx_ir graphs: reading constants, following uses, building nodes."""
from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Iterator
from typing import Sequence

import numpy as np
import onnx_ir as ir

from attnfuse.core.rule import NoMatch  # noqa: F401  (one NoMatch for every pass)

MS_DOMAIN = "com.microsoft"




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


def named_inputs(node: ir.Node, form) -> dict[str, ir.Value]:
    """A fused node's inputs by the slot names of its form (core/registry.py's OnnxForm); absent ones left out."""
    return {name: x for name, x in zip(form.inputs, node.inputs) if x is not None}


def scalar(value: ir.Value | None, probe=None) -> float | None:
    array = constant(value, probe)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def observed(value: ir.Value, probe, run: int | None = None) -> np.ndarray:
    """The value in probe run `run`, or in the first run that computed it."""
    array = probe.get(value.name, run) if value.name else None
    if array is None:
        raise NoMatch(f"no value was observed for {value.name!r}")
    return array


# The ONNX opset of the graph being rewritten: builders spell ops as it defines them.
_OPSET = contextvars.ContextVar("attnfuse_onnx_opset", default=20)
# Ops whose axes (or split sizes) were attributes before they became inputs, and the opset of the change.
_AXES_BECAME_INPUT = {"Squeeze": 13, "Unsqueeze": 13, "ReduceSum": 13, "Split": 13, "ReduceMin": 18,
                      "ReduceMax": 18, "ReduceProd": 18, "ReduceMean": 18}


@contextlib.contextmanager
def speaking_opset(version: int) -> Iterator[None]:
    """Within the block, Builders write nodes valid in `version` of the default ONNX domain."""
    token = _OPSET.set(version)
    try:
        yield
    finally:
        _OPSET.reset(token)


class Builder:
    """Makes the nodes of one rewrite. Nothing touches the graph until `commit`.

    New values get names under a prefix so that a rewrite can be evaluated on its
    own (see `proof.py`) and read in the output graph. Ops are written in their newest
    form (axes as inputs, Shape with start/end) and spelled for the graph's opset.
    """

    _counter = itertools.count()

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[ir.Node] = []
        self._constants: dict[tuple, ir.Value] = {}
        self._values: dict[int, np.ndarray] = {}  # the arrays of this builder's constants

    def _name(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(self._counter)}"

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: dict | None = None,
           *, domain: str = "", num_outputs: int = 1, name: str | None = None):
        inputs, attributes = list(inputs), dict(attributes or {})
        if domain == "":
            respelled = self._for_opset(op_type, inputs, attributes, _OPSET.get())
            if respelled is not None:
                return respelled
        outputs = [ir.Value(name=self._name(f"{op_type}_out{i}" if num_outputs > 1 else op_type))
                   for i in range(num_outputs)]
        node = ir.Node(domain, op_type, inputs, _attributes(attributes),
                       outputs=outputs, name=name or self._name(op_type))
        self.nodes.append(node)
        return outputs[0] if num_outputs == 1 else outputs

    def ops(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: dict | None = None,
            *, domain: str = "", num_outputs: int = 1, name: str | None = None) -> list[ir.Value]:
        """`op`'s outputs as a list, however many there are."""
        made = self.op(op_type, inputs, attributes, domain=domain, num_outputs=num_outputs, name=name)
        return made if isinstance(made, list) else [made]

    def _for_opset(self, op_type: str, inputs: list, attributes: dict, version: int):
        """Rewrite the op's arguments in place for an older opset; or build it another way and
        return its output (None: build it as it is)."""
        since = _AXES_BECAME_INPUT.get(op_type)
        if since is not None and version < since and len(inputs) > 1 and inputs[1] is not None:
            attributes["split" if op_type == "Split" else "axes"] = [int(a) for a in self._known(inputs[1]).reshape(-1)]
            del inputs[1:]
        if op_type == "Shape" and version < 15 and ("start" in attributes or "end" in attributes):
            start, end = attributes.pop("start", 0), attributes.pop("end", None)
            shape = self.op("Shape", inputs)
            ends = [end if end is not None else np.iinfo(np.int64).max]
            return self.op("Slice", [shape, self.const([start], np.int64), self.const(ends, np.int64)])
        if op_type == "CastLike" and version < 15:
            if inputs[1].dtype is None:
                raise NoMatch(f"opset {version} has no CastLike, and the type to cast to is not known")
            return self.op("Cast", inputs[:1], {"to": inputs[1].dtype})
        if op_type in ("GreaterOrEqual", "LessOrEqual") and version < 12:
            return self.op("Not", [self.op("Less" if op_type == "GreaterOrEqual" else "Greater", inputs)])
        return None

    def _known(self, value: ir.Value) -> np.ndarray:
        array = self._values.get(id(value))
        if array is None:
            array = constant(value)
        if array is None:
            raise NoMatch(f"opset {_OPSET.get()} needs constant axes")
        return array

    def const(self, array, dtype=None) -> ir.Value:
        array = np.asarray(array, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.op("Constant", [], {"value": ir.tensor(array)})
            self._values[id(self._constants[key])] = array
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


def replace_uses(old: ir.Value, new: ir.Value, take_name: bool = False) -> None:
    """Point every reader of `old`, graph outputs included, at `new`; a graph output's (or with
    `take_name`, any) name, type and shape go to `new`."""
    if old.is_graph_output() or take_name:
        new.name, old.name = old.name, f"{old.name}__replaced"
        new.shape, new.type = old.shape, old.type
    if old.is_graph_output():
        graph = old.graph
        for i, output in enumerate(graph.outputs):
            if output is old:
                graph.outputs[i] = new
    old.replace_all_uses_with(new)


def replace_node(graph: ir.Graph, node: ir.Node, nodes: Sequence[ir.Node], outputs: Sequence[ir.Value],
                 take_name: bool = True) -> None:
    """`node` replaced by `nodes` (inserted before it), `outputs[i]` read wherever its output i was (with
    `take_name`, under its name: replace_uses)."""
    graph.insert_before(node, list(nodes))
    for old, new in zip(node.outputs, outputs):
        replace_uses(old, new, take_name=take_name)
    graph.remove(node, safe=True)


def remove_unused(model: ir.Model) -> None:
    """Drop the nodes and weights nothing reads (the subgraphs' own weights too: onnx_ir's pass keeps them)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    for graph in model.graphs():
        _forget_abandoned_readers(graph)
    RemoveUnusedNodesPass()(model)
    for graph in model.graphs():
        for name, value in list(graph.initializers.items()):
            if graph is not model.graph and not value.uses() and not value.is_graph_output():
                del graph.initializers[name]


def _forget_abandoned_readers(graph: ir.Graph) -> None:
    """Nodes a rewrite built and then dropped (its proof failed, or another lowering won) still
    count as readers of the values they took in; detach them, so what only they read can go."""
    values = [*graph.inputs, *graph.initializers.values(), *(out for node in graph for out in node.outputs)]
    for value in values:
        for node, index in value.uses():
            if node.graph is None:
                node.replace_input_with(index, None)


LOOPS = frozenset({"Loop", "Scan"})


def nodes_on_one_path(graph: ir.Graph) -> list[ir.Node]:
    """The nodes one run takes: an If's else branch only (padding-free's packed graph, what a
    padded batch runs), a Loop's body once."""
    nodes = []
    for node in graph:
        nodes.append(node)
        for name, attribute in node.attributes.items():
            if attribute.type == ir.AttributeType.GRAPH and (node.op_type != "If" or name == "else_branch"):
                nodes.extend(nodes_on_one_path(attribute.value))
    return nodes


def graphs_in_order(graph: ir.Graph, in_loop: bool = False) -> list[tuple[ir.Graph, bool]]:
    """`graph` and every graph nested in it, outer first, each with whether it runs in a loop body."""
    found = [(graph, in_loop)]
    for node in graph:
        for attribute in node.attributes.values():
            inner = in_loop or node.op_type in LOOPS
            if attribute.type == ir.AttributeType.GRAPH:
                found.extend(graphs_in_order(attribute.value, inner))
            elif attribute.type == ir.AttributeType.GRAPHS:
                for subgraph in attribute.value:
                    found.extend(graphs_in_order(subgraph, inner))
    return found


def opset(graph: ir.Graph) -> int:
    return graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 20))
