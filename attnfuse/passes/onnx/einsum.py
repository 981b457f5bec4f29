"""Einsum as MatMul: tf2onnx writes projections and attention as Einsum ("abc,cde->abde",
"aecd,abcd->acbe"); the matchers know MatMul. Each two-operand Einsum becomes

    Transpose(A) -> [batch, left, contracted] @ Transpose(B) -> [batch, contracted, right]
    -> Transpose to the output's order

(with Reshapes where a group has several letters), which computes the same dot products.
This runs before the probe, so every value of the rewritten graph is observed.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from attnfuse.passes.onnx.graph import Builder, NoMatch, attr, constant, replace_node


def lower_einsums(model: ir.Model) -> int:
    """Replace every Einsum that fits by MatMul and layout ops; returns how many."""
    count = 0
    for graph in model.graphs():
        for node in list(graph):
            if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            try:
                builder, result = _as_matmul(node)
            except NoMatch:
                continue
            replace_node(graph, node, builder.nodes, [result])
            count += 1
    return count


def _as_matmul(node: ir.Node) -> tuple[Builder, ir.Value]:
    """A @ B, or B @ A when that leaves the result in the output's order (k @ q^T transposed
    is q @ k^T)."""
    spec = attr(node, "equation", "").replace(" ", "")
    inputs_spec, _, output = spec.partition("->")
    terms = inputs_spec.split(",")
    if "." in spec or not output or len(terms) != 2 or any(len(set(t)) != len(t) for t in (*terms, output)):
        raise NoMatch(f"Einsum {spec!r} is not a plain two-operand contraction")
    (a, b), (first, second) = node.inputs, terms
    orders = [(a, first, b, second), (b, second, a, first)]
    if not _in_output_order(first, second, output):
        orders.reverse()
    for order in orders:
        try:
            return _product(node.name or "einsum", *order, output)
        except NoMatch:
            continue
    raise NoMatch(f"Einsum {spec!r}: no MatMul form")


def _in_output_order(left_term: str, right_term: str, output: str) -> bool:
    """Whether the output lists `left_term`'s free letters before `right_term`'s."""
    left = [output.index(c) for c in left_term if c not in right_term]
    right = [output.index(c) for c in right_term if c not in left_term]
    return not left or not right or max(left) < min(right)


def _product(name: str, a: ir.Value, left_term: str, b: ir.Value, right_term: str, output: str
             ) -> tuple[Builder, ir.Value]:
    spec = f"{left_term},{right_term}->{output}"
    batch = [c for c in left_term if c in right_term and c in output]
    contracted = [c for c in left_term if c in right_term and c not in output]
    left = [c for c in left_term if c not in right_term]
    right = [c for c in right_term if c not in left_term]
    if any(c not in output for c in left + right) or not contracted:
        raise NoMatch(f"Einsum {spec!r} sums a letter of one operand only")
    weight = constant(b)
    sizes = dict(zip(right_term, weight.shape)) if weight is not None else {}
    simple = len(contracted) == 1 and len(left) <= 1 and len(right) <= 1
    flat = not batch and all(c in sizes for c in contracted + right)  # b is a weight: reshape it freely
    if not (simple or flat) or not left or not right:
        raise NoMatch(f"Einsum {spec!r}: no MatMul form")

    builder = Builder(name)
    a = _transpose(builder, a, left_term, batch + left + contracted)
    b = _transpose(builder, b, right_term, batch + contracted + right)
    if not simple:
        a = builder.op("Reshape", [a, builder.const([0] * len(left) + [-1], np.int64)])
        widths = [math.prod(sizes[c] for c in contracted), math.prod(sizes[c] for c in right)]
        b = builder.op("Reshape", [b, builder.const(widths, np.int64)])
    product = builder.op("MatMul", [a, b])
    if not simple:
        product = builder.op("Reshape", [product, builder.const([0] * len(left) + [sizes[c] for c in right], np.int64)])
    return builder, _transpose(builder, product, "".join(batch + left + right), list(output))


def _transpose(builder: Builder, value: ir.Value, letters: str, order: list[str]) -> ir.Value:
    perm = [letters.index(c) for c in order]
    if perm == sorted(perm):
        return value
    return builder.op("Transpose", [value], {"perm": perm})
