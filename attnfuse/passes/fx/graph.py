"""What every fx pass shares: the probe (each node's value on the check inputs) and node helpers.

The fx passes recognise what a graph computes the way the ONNX passes do: by the
values its nodes take on real inputs, not by which aten ops spell it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx._pytree import tree_flatten_spec

from attnfuse.core.rule import NoMatch  # noqa: F401  (one NoMatch for every pass)

aten = torch.ops.aten




@dataclass
class Rewrite:
    """What a fusion rule found: function(*args) replaces `replaces` (its outputs, in order;
    by default the node the rule looked at). `name` overrides the rule's op name."""

    function: Callable
    args: tuple
    replaces: list[fx.Node] = field(default_factory=list)
    name: str = ""


# Ops that only move or view data: walking through them keeps "the same tensor".
LAYOUT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, aten.clone.default, aten.select.int,
    aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.t.default,
}
# Ops that leave values alone at inference.
PASS_THROUGH = {aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default, aten.alias.default}


class FxProbe:
    """Every node's value on each check input, from one run of the original graph per input."""

    def __init__(self, module: fx.GraphModule, runs: list[tuple[tuple, dict]]):
        self.values: list[dict[fx.Node, Any]] = []
        for args, kwargs in runs:
            recorder = _Recorder(module)
            with torch.no_grad():
                recorder.run(*tree_flatten_spec((args, kwargs), module._in_spec))
            self.values.append(recorder.env)

    @property
    def runs(self) -> int:
        return len(self.values)

    def get(self, node: Any, run: int) -> Any:
        """The node's value on run `run`; a non-node argument is its own value."""
        if isinstance(node, fx.Node):
            return self.values[run].get(node)
        return node

    def alias(self, new: fx.Node, old: fx.Node) -> None:
        """`new` replaces `old` and was proven to compute the same values."""
        for values in self.values:
            values[new] = values[old]

    def tensor(self, node: Any, run: int) -> torch.Tensor | None:
        value = self.get(node, run)
        return value if isinstance(value, torch.Tensor) else None

    def record(self, *nodes: fx.Node) -> None:
        """Evaluate nodes a rewrite just added (in order) on every run, so later passes see their values."""
        for run, values in enumerate(self.values):
            for node in nodes:
                with torch.no_grad():
                    values[node] = evaluate(node, {}, self, run)


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule):
        super().__init__(module, garbage_collect_values=False)


def evaluate(node: fx.Node, env: dict[fx.Node, Any], probe: FxProbe, run: int) -> Any:
    """`node`'s op on its arguments' values: from `env` where given, else from the probe."""

    def value(a):
        if isinstance(a, fx.Node):
            return env[a] if a in env else probe.get(a, run)
        if isinstance(a, (list, tuple)):
            return type(a)(value(x) for x in a)
        return a

    return node.target(*value(node.args), **{k: value(v) for k, v in node.kwargs.items()})


def between(source: fx.Node, output: fx.Node, limit: int = 64) -> list[fx.Node] | None:
    """The nodes on the paths from `source` to `output` (output included, source not), in
    graph order; None if `output` does not depend on `source` within `limit` nodes."""
    ancestors, frontier = set(), [output]
    while frontier and len(ancestors) <= limit:
        node = frontier.pop()
        if node in ancestors or node is source:
            continue
        ancestors.add(node)
        frontier.extend(node.all_input_nodes)
    region = {node for node in ancestors if _depends_on(node, source, ancestors)}
    if output not in region:
        return None
    return [node for node in output.graph.nodes if node in region]


def _depends_on(node: fx.Node, source: fx.Node, within: set[fx.Node]) -> bool:
    seen, frontier = set(), [node]
    while frontier:
        current = frontier.pop()
        if current is source:
            return True
        if current in seen or current not in within:
            continue
        seen.add(current)
        frontier.extend(current.all_input_nodes)
    return False


def region_inputs(region: list[fx.Node], source: fx.Node) -> list[fx.Node]:
    """What the region reads besides `source` and its own nodes, in first-read order."""
    inside, found = set(region) | {source}, []
    for node in region:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in found:
                found.append(arg)
    return found


def rewrite_unless_excluded(item, exclude: frozenset[str], rewrite: Callable[[], None]) -> None:
    """Run `rewrite` for a site or fusion and mark it fused; a NoMatch (or the item's name in
    `exclude`, as a roll-back asks) leaves the graph alone and becomes the item's reason."""
    try:
        if item.name in exclude:
            raise NoMatch("excluded (rolled back)")
        rewrite()
        item.fused = True
    except NoMatch as e:
        item.reason = str(e)


def is_op(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [node for node in graph.nodes if node.op == "placeholder"]


def find_tokens(graph: fx.Graph, probe: FxProbe, mask: fx.Node | None) -> fx.Node | None:
    """The input of this step's tokens: [B, S] integer ids, or [B, S, hidden] embeddings, other than the mask."""
    for node in placeholders(graph):
        value = probe.tensor(node, 0)
        if node is mask or value is None:
            continue
        if value.dim() == 2 and not value.dtype.is_floating_point or value.dim() == 3 and value.dtype.is_floating_point:
            return node
    return None


def remove_no_ops(graph: fx.Graph) -> None:
    """Drop the dtype asserts torch.export leaves on intermediate values, and dropout at
    inference: fx counts both as side effects, so they would keep the nodes a rewrite
    replaced alive."""
    for node in list(graph.nodes):
        if is_op(node, aten._assert_tensor_metadata.default):
            graph.erase_node(node)
        elif is_op(node, aten.dropout.default) and not (node.args[2] if len(node.args) > 2 else node.kwargs.get("train")):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def remove_dead(graph: fx.Graph) -> None:
    """Dead-code elimination that also drops unused SDPA and dropout (fx keeps them as random ops)."""

    def impure(node: fx.Node) -> bool:
        if node.op != "call_function":
            return node.op in ("placeholder", "output", "call_module")
        return "assert" in str(node.target) or "constrain" in str(node.target)

    graph.eliminate_dead_code(is_impure_node=impure)


def close_enough(got: torch.Tensor | None, want: torch.Tensor, tolerance: float) -> bool:
    """Equal within `tolerance` relative to `want`'s scale (a missing value is not equal)."""
    if got is None or got.shape != want.shape:
        return False
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1e-6)
    return bool(((got.float() - want.float()).abs().max() / scale <= tolerance).item()) if want.numel() else True
