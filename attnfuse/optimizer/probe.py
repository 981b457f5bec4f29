"""Values of every tensor of the original graph, on two different sets of inputs.

The passes ask the probe what the graph computes: a tensor equal in both runs
(which differ in batch size, sequence length and data) is a constant of the graph,
and a value seen in a run tells which mask convention or scale a model uses.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from attnfuse.optimizer.errors import UserError, first_line
from attnfuse.optimizer.inputs import CheckInputs, make_inputs
from attnfuse.optimizer.io import session

# (batch, seqlen) of the two runs: different in both, so shapes that follow the
# inputs differ between runs and only true constants compare equal.
RUN_SIZES = ((3, 12), (2, 9))


class Probe:
    def __init__(self, runs: list[dict[str, np.ndarray]], inputs: list[CheckInputs], weights: dict[str, ir.Value]):
        self._runs = runs
        self._inputs = inputs
        self._weights = weights  # initializers: constant by definition, read only when asked
        self._aliases: dict[str, str] = {}  # a proven replacement's name -> the original value's name

    @classmethod
    def capture(cls, model: ir.Model, seed: int = 0) -> Probe:
        """Run the original `model` (left unchanged) and keep every intermediate tensor."""
        typed = _typed_copy(model)
        try:
            runner = session(typed, extra_outputs=_intermediates(typed), optimize=False)
        except Exception as e:  # the user's own model does not run: nothing to optimize against
            raise UserError(f"onnxruntime cannot load the model: {first_line(e)}") from None
        output_names = [o.name for o in runner.get_outputs()]
        inputs = [make_inputs(model, b, s, seed + i) for i, (b, s) in enumerate(RUN_SIZES)]
        runs = []
        for check in inputs:
            try:
                values = runner.run(output_names, check.feeds)
            except Exception as e:
                raise UserError(f"onnxruntime cannot run the model on generated inputs: {first_line(e)}") from None
            runs.append({**check.feeds, **dict(zip(output_names, values))})
        weights = {v.name: v for g in model.graphs() for v in g.initializers.values()}
        return cls(runs, inputs, weights)

    def same_as(self, new: str, original: str) -> None:
        """A rewrite proved `new` equal to `original` on these runs: answer for it the same,
        so that a later rewrite can read through an earlier one."""
        self._aliases[new] = self._aliases.get(original, original)

    def get(self, name: str, run: int = 0) -> np.ndarray | None:
        name = self._aliases.get(name, name)
        if name in self._runs[run]:
            return self._runs[run][name]
        weight = self._weights.get(name)
        if weight is not None and weight.const_value is not None:
            return weight.const_value.numpy()
        return None

    def is_constant(self, name: str) -> bool:
        name = self._aliases.get(name, name)
        if name in self._weights:
            return True
        first, second = (run.get(name) for run in self._runs)
        if not isinstance(first, np.ndarray) or not isinstance(second, np.ndarray):
            return False
        return first.shape == second.shape and np.array_equal(first, second, equal_nan=first.dtype.kind == "f")

    def shape(self, name: str, run: int = 0) -> tuple[int, ...] | None:
        value = self.get(name, run)
        return None if value is None else tuple(value.shape)

    def inputs(self, run: int) -> CheckInputs:
        return self._inputs[run]


def _typed_copy(model: ir.Model) -> ir.Model:
    """A copy (weights shared) whose values carry the types onnx shape inference finds."""
    copy = model.clone()
    if any(v.type is None for v in _node_outputs(copy)):
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(copy)
    return copy


def _intermediates(model: ir.Model) -> list[str]:
    """Node outputs of the main graph with a known tensor element type."""
    outputs = {v.name for v in model.graph.outputs}
    return [
        v.name
        for v in _node_outputs(model)
        if v.name not in outputs and isinstance(v.type, ir.TensorType) and v.dtype != ir.DataType.UNDEFINED
    ]


def _node_outputs(model: ir.Model) -> list[ir.Value]:
    return [v for node in model.graph for v in node.outputs if v.name]

