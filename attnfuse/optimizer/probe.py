"""Values of every tensor of the original graph, on several different sets of inputs.

The passes ask the probe what the graph computes: a tensor equal in every run that
sees it (the runs differ in batch size, sequence length, cache length and data) is
a constant of the graph, and a value seen in a run tells which mask convention or
scale a model uses. Values inside an If branch are seen in the runs that take it.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attnfuse.optimizer.errors import UserError, first_line
from attnfuse.optimizer.inputs import Case, CheckInputs, InputPlan
from attnfuse.optimizer.observe import CannotLoad, Observer

# Two runs that differ in batch size, length and data, so that shapes that follow the inputs
# differ between runs and only true constants compare equal; models with a KV cache get two
# more with cached tokens (a prompt continued, and one decode step).
PROBE_CASES = (Case(3, 12), Case(2, 9))
CACHE_CASES = (Case(3, 4, "left", past=5), Case(2, 1, "left", past=7))
# The case a model gets where it refuses one: a prompt continued over a cache one row at a time, unpadded,
# for a model that takes several new tokens after a past only so (ONNX Runtime's GroupQueryAttention, as
# onnxruntime-genai's builder writes it).
FALLBACKS = {CACHE_CASES[0]: Case(1, 4, "none", past=5)}
IMAGE_SIDES = (224, 384, 256, 512, 32, 64, 128)  # tried in turn when the graph does not say


def probe_cases(plan: InputPlan) -> list[Case]:
    return [*PROBE_CASES, *(CACHE_CASES if plan.has_cache else ())]


class Probe:
    def __init__(self, runs: list[dict[str, np.ndarray]], inputs: list[CheckInputs], weights: dict[str, ir.Value],
                 plan: InputPlan | None = None):
        self._runs = runs
        self._inputs = inputs
        self._weights = weights  # initializers: constant by definition, read only when asked
        self._aliases: dict[str, str] = {}  # a proven replacement's name -> the original value's name
        self.plan = plan

    @classmethod
    def capture(cls, model: ir.Model, seed: int = 0, plan: InputPlan | None = None) -> Probe:
        """Run the original `model` (left unchanged) and keep every intermediate tensor."""
        plan = plan or InputPlan(model)
        observe = Observer(model)
        cases = probe_cases(plan)
        first = _first_run(model, plan, observe, cases[0], seed)
        inputs, runs = [first[0]], [first[1]]
        for i, case in enumerate(cases[1:], start=1):
            check = plan.make(case, seed + i)
            try:
                run = _run(observe, check)
            except UserError:
                if case not in FALLBACKS:
                    raise
                check = plan.make(FALLBACKS[case], seed + i)
                run = _run(observe, check)
            inputs.append(check)
            runs.append(run)
        weights = {v.name: v for g in model.graphs() for v in g.initializers.values()}
        return cls(runs, inputs, weights, plan)

    def for_rewrite(self) -> Probe:
        """The probe for one run of the passes: the same values, none of the aliases that another
        run's rewrites left (their names mean other values in a fresh copy of the model)."""
        return Probe(self._runs, self._inputs, self._weights, self.plan)

    @property
    def run_count(self) -> int:
        return len(self._runs)

    def same_as(self, new: str, original: str) -> None:
        """A rewrite proved `new` equal to `original` on these runs: answer for it the same,
        so that a later rewrite can read through an earlier one."""
        self._aliases[new] = self._aliases.get(original, original)

    def runs_seeing(self, name: str) -> list[int]:
        """The runs in which `name` was computed (all of them for weights)."""
        name = self._aliases.get(name, name)
        if name in self._weights:
            return list(range(len(self._runs)))
        return [i for i, run in enumerate(self._runs) if name in run]

    def get(self, name: str, run: int | None = None) -> np.ndarray | None:
        """The value of `name` in run `run`, or in the first run that computed it."""
        name = self._aliases.get(name, name)
        runs = range(len(self._runs)) if run is None else [run]
        for i in runs:
            if name in self._runs[i]:
                return self._runs[i][name]
        weight = self._weights.get(name)
        if weight is not None and weight.const_value is not None:
            return weight.const_value.numpy()
        return None

    def is_constant(self, name: str) -> bool:
        """Computed in at least two runs, and equal in all of them."""
        name = self._aliases.get(name, name)
        if name in self._weights:
            return True
        seen = [run[name] for run in self._runs if name in run]
        if len(seen) < 2 or not all(isinstance(v, np.ndarray) for v in seen):
            return False
        first = seen[0]
        return all(v.shape == first.shape and np.array_equal(v, first, equal_nan=first.dtype.kind == "f")
                   for v in seen[1:])

    def shape(self, name: str, run: int | None = None) -> tuple[int, ...] | None:
        value = self.get(name, run)
        return None if value is None else tuple(value.shape)

    def inputs(self, run: int) -> CheckInputs:
        return self._inputs[run]


def _first_run(model: ir.Model, plan: InputPlan, observe: Observer, case: Case, seed: int):
    """The first case, trying the usual image sides when the graph does not fix them."""
    sides = IMAGE_SIDES if plan.open_image else IMAGE_SIDES[:1]
    first_failure = None
    for side in sides:
        plan.image_side = side
        check = plan.make(case, seed)
        try:
            return check, _run(observe, check)
        except UserError as failure:
            first_failure = first_failure or failure
    if len(sides) > 1:
        raise UserError(f"{first_failure} (image sides tried: {', '.join(map(str, sides))})")
    raise first_failure


def _run(observe: Observer, check: CheckInputs) -> dict[str, np.ndarray]:
    try:
        return observe(check.feeds)
    except CannotLoad as e:
        raise UserError(f"onnxruntime cannot load the model: {e}") from None
    except Exception as e:
        tried = "; ".join(f"{entry['name']} {entry['shape']}" for entry in check.describe())
        raise UserError(f"the model does not run on the inputs attnfuse generated ({check.case}: {tried}): "
                        f"{first_line(e)}; give the sizes it needs with --input-shape NAME=DIMS") from None
