"""How an fx graph spells each fused op: a builder whose methods take the op's canonical arguments
(the same as the ONNX builder's) and call core/registry.py's torch function for it.

fx nodes live in a graph: a builder puts its nodes in at once, before the output, and takes
them out again (`discard`) when its rewrite is not committed.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from attnfuse.core import registry
from attnfuse.core.measure.rotary import RotaryForm
from attnfuse.core.rule import NoMatch, Replacement

aten = torch.ops.aten


class FxBuilder:
    def __init__(self, graph: fx.Graph, view, label: str):
        self.graph, self.view, self.label = graph, view, label
        self.nodes: list[fx.Node] = []
        self.committed = False

    def call(self, target, *args, **kwargs) -> fx.Node:
        output = next(node for node in reversed(self.graph.nodes) if node.op == "output")
        with self.graph.inserting_before(output):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["attnfuse"] = self.label
        self.nodes.append(node)
        return node

    def copy(self, node: fx.Node, replaced: dict) -> fx.Node:
        """A copy of `node` that reads replaced[x] instead of each x that `replaced` holds."""
        output = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        with self.graph.inserting_before(output):
            made = self.graph.node_copy(node, lambda x: replaced.get(x, x))
        made.meta["attnfuse"] = self.label
        self.nodes.append(made)
        return made

    def items(self, node: fx.Node, count: int) -> list[fx.Node]:
        return [self.call(operator.getitem, node, i) for i in range(count)]

    def replacement(self, label: str, claims: list[tuple[Any, Any]], **facts) -> Replacement:
        return Replacement(label, self.nodes, claims, self, facts)

    def discard(self) -> None:
        for node in reversed(self.nodes):
            if not node._erased:
                self.graph.erase_node(node)
        self.nodes.clear()

    # ---- the fused ops, by their canonical arguments -----------------------------------------

    def skip_layer_norm(self, x, skip, gamma, beta, bias, eps: float) -> tuple[fx.Node, fx.Node]:
        """(layernorm(x + skip + bias), x + skip + bias)."""
        y, total = self.items(self.call(registry.SKIP_LAYER_NORM.torch, x, skip, bias, gamma, beta, float(eps)), 2)
        return y, total

    def layer_norm(self, x, gamma, beta, eps: float) -> fx.Node:
        width = self.view.value(x).shape[-1]
        return self.call(aten.layer_norm.default, x, [width], gamma, beta, float(eps))

    def rms_norm(self, x, gamma, eps: float) -> fx.Node:
        return self.call(registry.RMS_NORM.torch, x, gamma, float(eps))

    def skip_rms_norm(self, x, skip, gamma, bias, eps: float) -> tuple[fx.Node, fx.Node]:
        """(rms_norm(x + skip + bias), x + skip + bias)."""
        if bias is not None:
            x = self.call(aten.add.Tensor, x, bias)
        y, total = self.items(self.call(registry.SKIP_RMS_NORM.torch, x, skip, gamma, float(eps)), 2)
        return y, total

    def embed_layer_norm(self, *arguments) -> tuple[fx.Node, fx.Node]:
        raise NoMatch(f"{registry.EMBED_LAYER_NORMALIZATION.op_type} has no torch form")

    def bias_gelu(self, x, bias, approximate: str) -> fx.Node:
        return self.call(registry.BIAS_GELU.torch, x, bias, str(approximate))

    def rotary_caches(self, cos, sin, batch_axis: int | None, form: RotaryForm, tables=None
                      ) -> tuple[fx.Node, fx.Node]:
        """attnfuse::rotary's cos and sin for the tensors a rotary multiplies by (one row per token;
        `batch_axis` counts the batch's rows, None where the batch shares them): each token's rd / 2
        angles, [B, S, rd / 2] ([S, rd / 2] when the batch shares them)."""
        width = self.view.value(cos).shape[-1]
        pick = form.rows.pick(width)
        shape = [-1, width] if batch_axis is None else [self.call(aten.sym_size.int, cos, batch_axis), -1, width]

        def rows(value) -> fx.Node:
            flat = self.call(aten.reshape.default, value, shape)
            if pick == slice(0, width, 1):
                return flat
            return self.call(aten.slice.Tensor, flat, -1, pick.start, pick.stop, pick.step)

        return rows(cos), rows(sin)

    def rotary(self, x, tokens, caches: tuple[fx.Node, fx.Node], form: RotaryForm) -> fx.Node:
        """x rotated by attnfuse::rotary on its heads tokens first, merged ([B, S, H*D], from `tokens`, or
        from x itself), viewed back to x's layout."""
        layout = form.layout
        if tokens is None:  # heads first, split from nothing tokens first
            merged = self.call(aten.flatten.using_ints, self.call(aten.transpose.int, x, 1, 2), 2)
        elif self.view.value(tokens).ndim == 4:
            merged = self.call(aten.flatten.using_ints, tokens, 2)
        else:
            merged = tokens
        out = self.call(registry.ROTARY.torch, merged, *caches, layout.heads, form.interleaved)
        if layout.rank == 3:
            return out
        out = self.call(aten.unflatten.int, out, -1, (layout.heads, layout.head_size))
        return self.call(aten.transpose.int, out, 1, 2) if layout.heads_first else out

    def linear(self, x, weight) -> fx.Node:
        """x @ weight^T, weight [out, in] (a linear without its bias)."""
        return self.call(aten.linear.default, x, weight)
