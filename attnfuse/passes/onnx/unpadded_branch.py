"""A batch with no padding skips packing: If(every token is real) the fused graph, else the padding-free one.

When nothing is padded, packing saves nothing and still costs its gathers, the
per-sequence attention loops, and the copies around attention that stays on the
padded layout; and ONNX Runtime's CPU MultiHeadAttention takes a slower path
whenever it is given a key_padding_mask, even one of all ones. So the model
carries both graphs and picks one per run:

    full = ReduceMin(mask != 0)
    If(full) then: the fused graph, its key-padding masks dropped (all ones here)
             else: the padding-free graph

A graph that reads sequence positions by index (a pooler or classifier on the first token)
reads zeros from the padding-free graph where such a position is padded (the first token
under left padding), not what the original computed there. Such a batch takes the fused
graph too, its masks kept:

    If(full or any(mask[:, positions] == 0)) then: the fused graph, else: the padding-free graph

Both branches share every weight (outer-scope initializers). Both are verified: the
verifier's check sets include batches with padding (left and right) and a batch without.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attnfuse.core import registry
from attnfuse.core.facts import attention_facts
from attnfuse.passes.onnx.graph import Builder
from attnfuse.passes.onnx.padding_free import real_tokens
from attnfuse.passes.onnx import quantized

NAME = "unpadded-branch"
UNPADDED, PADDED = "unpadded", "padding_free"  # the branches' graph names


def add(graph: ir.Graph, fused: ir.Graph, mask: ir.Value, read_positions: list[int] = ()) -> None:
    """Turn `graph` (padding-free by now) into If(no padding) `fused` else `graph`.

    `fused` is a clone of `graph` taken before padding-free; its nodes are moved, not copied.
    `read_positions`: the positions the graph reads by index; a batch with one of them padded
    takes `fused` too (its masks kept)."""
    _share_outer_values(graph, fused)
    if not read_positions:
        _drop_padding_masks(fused)
    names = [(out.name, out.type, out.shape) for out in graph.outputs]
    then_branch = _branch(fused, UNPADDED)
    else_branch = _branch(graph, PADDED)
    graph.outputs.clear()

    b = Builder(NAME)
    real = real_tokens(b, mask)  # no KV cache here (see _why_no_unpadded_branch): the mask covers the tokens
    fused_runs = _all(b, real)
    if read_positions:
        read = b.op("Gather", [real, b.const(list(read_positions), np.int64)], {"axis": 1})
        fused_runs = b.op("Or", [fused_runs, b.op("Not", [_all(b, read)])])
    outputs = b.ops("If", [fused_runs], {"then_branch": ir.AttrGraph("then_branch", then_branch),
                                   "else_branch": ir.AttrGraph("else_branch", else_branch)},
                    num_outputs=len(names), name=f"{NAME}/If")
    for out, (name, dtype, shape) in zip(outputs, names):
        out.name, out.type, out.shape = name, dtype, shape
        graph.outputs.append(out)
    graph.extend(b.nodes)


def _drop_padding_masks(fused: ir.Graph) -> None:
    """Fused attention whose only mask is the padding mask, in a slot of its own: without padding,
    that mask is all ones; drop it."""
    for node in fused.all_nodes():
        facts = attention_facts(node)
        found = registry.of_onnx(node.domain, node.op_type)
        if facts is not None and facts.key_padding_only and facts.mask_slot is not None and found is not None:
            node.replace_input_with(found[1].slot(facts.mask_slot), None)


def _all(b: Builder, flags: ir.Value) -> ir.Value:
    """A bool scalar: every entry of `flags` is true."""
    every = b.op("ReduceMin", [b.op("Cast", [flags], {"to": ir.DataType.INT32})], {"keepdims": 0})
    return b.op("Cast", [every], {"to": ir.DataType.BOOL})


def _share_outer_values(graph: ir.Graph, fused: ir.Graph) -> None:
    """Point `fused`'s readers of inputs and weights at `graph`'s own, so that both branches
    read the same ones; a weight that padding-free left unused in `graph` moves there."""
    outer = {value.name: value for value in [*graph.inputs, *graph.initializers.values()]}
    own = {id(value) for value in [*fused.inputs, *fused.initializers.values()]}
    for node in fused.all_nodes():
        for i, x in enumerate(node.inputs):
            if x is None or id(x) not in own:
                continue
            if x.name not in outer:
                fused.initializers.pop(x.name)
                graph.register_initializer(x)
                outer[x.name] = x
            node.replace_input_with(i, outer[x.name])


def _branch(graph: ir.Graph, name: str) -> ir.Graph:
    """`graph`'s nodes as a subgraph without inputs: it reads the outer graph's values."""
    nodes = list(graph)
    graph.remove(nodes)
    outputs = []
    for out in graph.outputs:
        if out.producer() not in nodes:  # a graph input or weight passed through: a subgraph must make its outputs
            b = Builder(f"{NAME}/{name}")
            out = b.op("Identity", [out])
            nodes.extend(b.nodes)
        out.name = f"{out.name}/{name}"
        outputs.append(out)
    graph.outputs.clear()
    branch = ir.Graph([], outputs, nodes=nodes, name=name)
    _own_quantized_weights(branch)
    return branch


def _own_quantized_weights(branch: ir.Graph) -> None:
    """The branch's DequantizeLinear of an outer weight reads copies of them (the same tensors) held by the
    branch: ONNX Runtime fuses DequantizeLinear into the int8 MatMul that reads it only when its weight is
    an initializer of its own graph, and fails to load the model otherwise."""
    own: dict[ir.Value, ir.Value] = {}
    for node in branch:
        if node.op_type != quantized.DEQUANTIZE_LINEAR.op_type or quantized.quantized(node) is None \
                or node.inputs[0] is None or not node.inputs[0].is_initializer():
            continue
        for i, x in enumerate(node.inputs):
            if x is None or not x.is_initializer() or x.graph is branch:
                continue
            if x not in own:
                own[x] = ir.Value(name=f"{x.name}/{branch.name}", type=x.type, shape=x.shape, const_value=x.const_value)
                branch.register_initializer(own[x])
            node.replace_input_with(i, own[x])

