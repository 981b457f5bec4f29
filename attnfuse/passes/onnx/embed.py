"""Embeddings + LayerNorm -> EmbedLayerNormalization (com.microsoft), where exactly equal.

layernorm(word[ids] + position[pos] (+ segment[seg])) with constant tables. The
position indices are passed to the fused op as they are computed (RoBERTa's
padding-aware positions included), so nothing is assumed about them.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attnfuse.passes.onnx.graph import MS_DOMAIN, Builder, NoMatch, attr, constant, consumers, opset
from attnfuse.core.outcome import Fusion
from attnfuse.passes.onnx.proof import prove, substitute

OP = "EmbedLayerNormalization"


def fuse(graph: ir.Graph, probe, exclude) -> list:
    fusions = []
    for node in list(graph):
        if node.op_type != "LayerNormalization" or not _is_embedding_sum(node.inputs[0], probe):
            continue
        if node.name in exclude:
            fusions.append(Fusion(node.name, OP, False, "excluded (rolled back)"))
            continue
        try:
            fuse_one(graph, node, probe)
            fusions.append(Fusion(node.name, OP, True))
        except NoMatch as why:
            fusions.append(Fusion(node.name, OP, False, str(why)))
    return fusions


def _lookups(value: ir.Value, probe) -> list[ir.Node] | None:
    """The Gathers from constant tables that `value` sums, or None."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Gather" and attr(node, "axis", 0) == 0 and constant(node.inputs[0], probe) is not None:
        return [node]
    if node.op_type == "Add":
        parts = [_lookups(x, probe) for x in node.inputs]
        return None if None in parts else parts[0] + parts[1]
    return None


def _is_embedding_sum(value: ir.Value, probe) -> bool:
    found = _lookups(value, probe)
    return found is not None and len(found) in (2, 3)


def fuse_one(graph: ir.Graph, layernorm: ir.Node, probe) -> None:
    total = layernorm.inputs[0]
    lookups = _lookups(total, probe)
    word = next((g for g in lookups if _from_graph_input(g.inputs[1])), None)
    if word is None:
        raise NoMatch("no lookup reads the token ids input")
    rest = [g for g in lookups if g is not word]
    position = min(rest, key=lambda g: _distance_from_arange(g.inputs[1], probe))
    segment = next((g for g in rest if g is not position), None)
    if attr(layernorm, "axis", -1) != -1 or len(layernorm.inputs) < 3 or layernorm.inputs[2] is None:
        raise NoMatch("layernorm is not over the last axis with a bias")

    builder = Builder(layernorm.name)
    as_int32 = lambda v: builder.op("Cast", [v], {"to": ir.DataType.INT32})  # noqa: E731
    ids = as_int32(word.inputs[1])
    positions = builder.op("Expand", [as_int32(position.inputs[1]), builder.op("Shape", [word.inputs[1]])])
    outputs = builder.op(
        OP,
        [ids, as_int32(segment.inputs[1]) if segment else None,
         word.inputs[0], position.inputs[0], segment.inputs[0] if segment else None,
         layernorm.inputs[1], layernorm.inputs[2], None, positions],
        {"epsilon": attr(layernorm, "epsilon", 1e-5)},
        domain=MS_DOMAIN,
        num_outputs=3,
        name=f"{layernorm.name}/{OP}",
    )
    claims = [(layernorm.outputs[0], outputs[0])]
    if any(user is not layernorm for user in consumers(total)) or total.is_graph_output():
        claims.append((total, outputs[2]))
    prove(builder.nodes, claims, probe, opset=opset(graph))
    builder.commit(graph, after=layernorm)
    substitute(claims, probe)


def _from_graph_input(value: ir.Value) -> bool:
    """The ids input itself, or a view of it."""
    while (node := value.producer()) is not None and node.op_type in ("Reshape", "Unsqueeze", "Squeeze", "Cast"):
        value = node.inputs[0]
    return value.is_graph_input()


def _distance_from_arange(indices: ir.Value, probe) -> int:
    """0 when the indices are 0..S-1 along the last axis, more the further they are."""
    values = probe.get(indices.name) if indices.name else None
    if values is None or values.ndim == 0:
        return 1 << 30
    arange = np.arange(values.shape[-1])
    return int(np.abs(values - arange).sum())
