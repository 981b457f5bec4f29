"""The View over an ONNX graph: the probe's values, and regions evaluated in ONNX Runtime.

A region is serialised as a small model of its own (what it reads from outside comes in as
inputs of rank but no fixed size, constants as initializers) and compiled once: the same
session then runs on every probe run, and again whenever the same region is evaluated on
other points.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from attnfuse.core.rule import NoMatch
from attnfuse.passes.onnx.graph import MS_DOMAIN, constant

_SESSION_CACHE_LIMIT = 256
# A cached session holds its region's weights: a large model's projections, once per layer, would
# otherwise keep a copy of most of its weights alive until the pass ends.
_SESSION_CACHE_BYTES = 256 * 2**20


class OrtView:
    """A View (core/view.py) of the graph the probe observed; `opset` is the model's."""

    def __init__(self, probe, opset: int):
        self.probe = probe
        self.opset = opset
        self._sessions: dict[tuple, tuple[ort.InferenceSession, list[str], list, tuple]] = {}
        self._weights: dict[tuple, int] = {}  # the bytes of constants each cached session holds

    @property
    def run_count(self) -> int:
        return self.probe.run_count

    def value(self, x: ir.Value, run: int | None = None) -> np.ndarray | None:
        if x is None:
            return None
        fixed = constant(x)
        if fixed is not None:
            return fixed
        return self.probe.get(x.name, run) if x.name else None

    def runs(self, *values: ir.Value) -> list[int]:
        runs = None
        for value in values:
            seen = set(self.probe.runs_seeing(value.name)) if value.name else set()
            if not seen and constant(value) is not None:
                seen = set(range(self.run_count))
            if not seen:
                raise NoMatch(f"no value was observed for {value.name!r}")
            runs = seen if runs is None else runs & seen
        if not runs:
            raise NoMatch(f"no run observed all of {', '.join(repr(v.name) for v in values)}")
        return sorted(runs)

    def constant(self, x: ir.Value | None) -> np.ndarray | None:
        return constant(x, self.probe)

    def real(self, run: int) -> np.ndarray | None:
        return self.probe.inputs(run).real

    def real_total(self, run: int) -> np.ndarray | None:
        return self.probe.inputs(run).real_total

    def batch(self, run: int) -> int:
        return self.probe.inputs(run).batch

    def committed(self, replacement) -> None:
        for old, new in replacement.claims:
            if not new.is_graph_output():  # one that is took the original's name (replace_uses)
                self.probe.same_as(new.name, old.name)

    def evaluate(self, nodes: Sequence[ir.Node], outputs: Sequence[ir.Value], feeds: Mapping[ir.Value, np.ndarray],
                 run: int) -> list[np.ndarray]:
        session, names, reads, _ = self._session(self._reading_through(nodes, feeds), outputs, feeds)
        values = {}
        for value in reads:
            given = next((array for fed, array in feeds.items() if fed is value), None)
            values[value.name] = given if given is not None else self._observed(value, run)
        try:
            return session.run(names, values, _QUIET)
        except Exception as error:  # ONNX Runtime refuses the region for these shapes or types
            raise NoMatch(f"ONNX Runtime rejects the fused op: {_first_line(error)}") from None

    def _reading_through(self, nodes: Sequence[ir.Node], feeds: Mapping[ir.Value, np.ndarray]) -> list[ir.Node]:
        """`nodes`, after the nodes of earlier rewrites that make what they read and the probe never saw (a
        value inside an earlier rewrite: the region computes it from what the probe saw)."""
        made = {id(out) for node in nodes for out in node.outputs} | {id(value) for value in feeds}
        pending, earlier = [x for node in nodes for x in node.inputs], []
        while pending:
            value = pending.pop()
            if value is None or id(value) in made or constant(value, self.probe) is not None \
                    or (value.name and self.probe.runs_seeing(value.name)):
                continue
            node = value.producer()
            if node is None or node.graph is None:
                continue  # not observed, and not computed here: _observed says so
            earlier.append(node)
            made.update(id(out) for out in node.outputs)
            pending.extend(node.inputs)
        if not earlier:
            return list(nodes)
        order = {id(node): i for i, node in enumerate(earlier[0].graph)}
        return sorted(earlier, key=lambda node: order.get(id(node), -1)) + list(nodes)

    def _observed(self, value: ir.Value, run: int) -> np.ndarray:
        array = self.probe.get(value.name, run) if value.name else None
        if array is None:
            raise NoMatch(f"no value was observed for {value.name!r}")
        return array

    def _session(self, nodes: Sequence[ir.Node], outputs: Sequence[ir.Value], feeds: Mapping[ir.Value, np.ndarray]):
        """The compiled region: what it reads from outside is an input (fed, or taken from a run), a
        constant is an initializer."""
        fed = {id(value): array for value, array in feeds.items()}
        key = (tuple(map(id, nodes)), tuple(map(id, outputs)),
               tuple(sorted((i, a.dtype.str, a.ndim) for i, a in fed.items())))
        if key in self._sessions:
            return self._sessions[key]
        produced = {id(out) for node in nodes for out in node.outputs}
        reads: list[ir.Value] = []
        initializers: dict[str, onnx.TensorProto] = {}
        for node in nodes:
            for value in node.inputs:
                if value is None or id(value) in produced or value.name in initializers \
                        or any(value is r for r in reads):
                    continue
                fixed = constant(value, self.probe) if id(value) not in fed else None
                if fixed is not None:
                    initializers[value.name] = onnx.numpy_helper.from_array(np.asarray(fixed), value.name)
                else:
                    reads.append(value)
        inputs = [_declared(value, fed.get(id(value)), self) for value in reads]
        graph = onnx.helper.make_graph(
            [ir.serde.serialize_node(node) for node in nodes], "region", inputs,
            [onnx.helper.make_value_info(out.name, onnx.TypeProto()) for out in outputs],
            initializer=list(initializers.values()))
        model = onnx.helper.make_model(graph, ir_version=10, opset_imports=[
            onnx.helper.make_opsetid("", self.opset), onnx.helper.make_opsetid(MS_DOMAIN, 1)])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # One thread: a region is small, and the threads of every cached session would spin between runs.
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise NoMatch(f"ONNX Runtime rejects the fused op: {_first_line(error)}") from None
        # The nodes stay referenced while their session is cached: their ids are its key.
        entry = (session, [out.name for out in outputs], reads, (tuple(nodes), tuple(outputs)))
        self._weights[key] = sum(len(tensor.raw_data) for tensor in initializers.values())
        self._sessions[key] = entry
        while len(self._sessions) > _SESSION_CACHE_LIMIT or \
                (len(self._sessions) > 1 and sum(self._weights.values()) > _SESSION_CACHE_BYTES):
            oldest = next(iter(self._sessions))  # a proof reuses the session it just made, not the oldest
            del self._sessions[oldest], self._weights[oldest]
        return entry


def _declared(value: ir.Value, fed: np.ndarray | None, view: OrtView) -> onnx.ValueInfoProto:
    """An input of the region: its dtype and rank (sizes left open, so one session serves every run)."""
    array = fed if fed is not None else view._observed(value, next(iter(view.runs(value))))
    elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    return onnx.helper.make_tensor_value_info(value.name, elem, [None] * array.ndim)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:400]


_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4  # a refusal is reported as the reason, not logged
