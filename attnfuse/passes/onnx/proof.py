"""Prove a rewrite before it is applied.

The nodes of a rewrite are run on their own in ONNX Runtime, fed with the values
the probe observed in the original graph, and their result is compared with the
value the original graph computed for the tensor they replace. A rewrite that
does not reproduce it on the check inputs is never applied.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from attnfuse.core import tolerance as precision
from attnfuse.passes.onnx.graph import MS_DOMAIN, NoMatch, constant, observed, replace_uses, runs_seeing


def evaluate(nodes: list[ir.Node], outputs: list[ir.Value], source, opset: int = 20) -> list[np.ndarray]:
    """Run `nodes` alone in ONNX Runtime. `source(value)` gives each tensor they read
    from outside; constants travel as initializers."""
    produced = {id(out) for node in nodes for out in node.outputs}
    feeds: dict[str, np.ndarray] = {}
    initializers: dict[str, onnx.TensorProto] = {}
    for node in nodes:
        for value in node.inputs:
            if value is None or id(value) in produced or value.name in feeds or value.name in initializers:
                continue
            fixed = constant(value)
            if fixed is not None:
                initializers[value.name] = onnx.numpy_helper.from_array(fixed, value.name)
            else:
                feeds[value.name] = source(value)
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in nodes],
        "rewrite",
        [_value_info(name, array) for name, array in feeds.items()],
        [onnx.helper.make_value_info(out.name, onnx.TypeProto()) for out in outputs],
        initializer=list(initializers.values()),
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid(MS_DOMAIN, 1)],
        ir_version=10,
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a refusal is reported as the reason, not logged
        return session.run([out.name for out in outputs], feeds, quiet)
    except Exception as error:  # ORT refuses the fused op for these shapes or types
        message = str(error).strip().splitlines()[0][:400]
        raise NoMatch(f"ONNX Runtime rejects the fused op: {message}") from None


def _value_info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    return onnx.helper.make_tensor_value_info(name, elem, list(array.shape))


def relative_error(expected: np.ndarray, got: np.ndarray, real: np.ndarray | None = None) -> float:
    """Max abs difference over real token positions, relative to the expected scale."""
    if expected.shape != got.shape:
        return float("inf")
    expected = expected.astype(np.float64)
    got = got.astype(np.float64)
    if real is not None:
        keep = _positions(expected.shape, real)
        if keep is not None:
            expected, got = expected[keep], got[keep]
    if expected.size == 0:
        return 0.0
    finite = np.isfinite(expected)
    if not np.array_equal(finite, np.isfinite(got)):
        return float("inf")
    scale = max(float(np.abs(expected[finite]).max(initial=0.0)), 1e-6)
    return float(np.abs(expected[finite] - got[finite]).max(initial=0.0)) / scale


def _positions(shape: tuple[int, ...], real: np.ndarray):
    """A boolean index of the real tokens for a tensor laid out [B, S, ...] or [B*S, ...]."""
    batch, seqlen = real.shape
    if len(shape) >= 2 and shape[:2] == (batch, seqlen):
        return real
    if len(shape) >= 1 and shape[0] == batch * seqlen and batch * seqlen != batch:
        return real.reshape(-1)
    return None


def prove(nodes: list[ir.Node], claims: list[tuple[ir.Value, ir.Value]], probe, extra: list[ir.Value] = (), opset: int = 20):
    """Check that each new value equals the original one it replaces, on every probe run that
    computed them, to the tolerance of their dtype (passes/precision.py).

    Returns the values of `extra` on the first such run (`first_run`). Raises NoMatch.
    """
    extra = list(extra)
    extras = []
    runs = runs_seeing([old for old, _ in claims], probe)
    for run in runs:
        news = evaluate(nodes, [new for _, new in claims] + extra, lambda value: observed(value, probe, run), opset)
        real = probe.inputs(run).real
        for (old, _), got in zip(claims, news):
            expected = observed(old, probe, run)
            error = relative_error(expected, got, real)
            if not error <= precision.tolerance(expected.dtype):
                raise NoMatch(f"the fused op does not reproduce the original (relative error {error:.2g})")
        if run == runs[0]:
            extras = news[len(claims):]
    return extras


def first_run(value: ir.Value, probe) -> int:
    """The probe run whose values `prove` returns for a rewrite of `value`."""
    return runs_seeing([value], probe)[0]


def substitute(claims: list[tuple[ir.Value, ir.Value]], probe) -> None:
    """Point the readers of each original value at its proven replacement. The probe then
    answers for the replacement as for the original, so that later rewrites can read through it
    (the attention output's layernorm reads the previous layer's fused one)."""
    for old, new in claims:
        new_name, old_name = new.name, old.name
        replace_uses(old, new)
        probe.same_as(new_name, old_name)
