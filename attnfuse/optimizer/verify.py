"""Does the optimized model compute what the original computes?

The original runs in ONNX Runtime on generated check inputs; the optimized model runs where its target
runs it: ONNX Runtime (CPU, or CUDA where asked for and present), or OpenVINO (in a child process,
openvino_run.py), at float32 and then at the precision the user chose. Padded positions of a
padding-free model's outputs are zero by design, so only real tokens count.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from attnfuse.optimizer import openvino_run
from attnfuse.optimizer.errors import UserError, first_line
from attnfuse.optimizer.inputs import Case, CheckInputs, InputPlan
from attnfuse.optimizer.io import session
from attnfuse.optimizer.report import Against, Baseline, Check, VerifyResult
from attnfuse.optimizer.twin import SESSION_CONFIG as TWIN_SESSION, twin
from attnfuse.core import tolerance as precision_tolerance
from attnfuse.core.options import PassOptions, Target
from attnfuse.passes.onnx.padding_free import PER_SEQUENCE_WIDTH


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], real: np.ndarray | None,
            real_total: np.ndarray | None = None) -> tuple[float, float]:
    """(max absolute error, max error relative to each output's largest magnitude).

    Outputs whose first two dims are the mask's [B, S] are compared at real tokens only, and
    so are caches [B, heads, past + S, head_size] at the real tokens of `real_total`.
    A missing output or a shape mismatch is an infinite error.
    """
    errors = errors_by_output(reference, candidate, real, real_total)
    max_abs = max((error for error, _ in errors.values()), default=0.0)
    max_rel = max((error / scale for error, scale in errors.values()), default=0.0)
    return max_abs, max_rel


def errors_by_output(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], real: np.ndarray | None,
                     real_total: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """Each output's (max absolute error, largest magnitude of the reference), compared as `compare` says."""
    errors = {}
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or np.shape(got) != np.shape(ref):
            errors[name] = (float("inf"), 1.0)
            continue
        ref, got = _real_part(np.asarray(ref), np.asarray(got), real, real_total)
        errors[name] = (_abs_error(ref, got), _scale(ref))
    return errors


def _mean_of(cosines: list[np.ndarray]) -> float:
    """The mean over outputs of each one's mean cosine (1.0 is equal)."""
    means = [np.mean(c) for c in cosines if c.size]
    return float(np.mean(means)) if means else 1.0


def vector_cosines(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], real: np.ndarray | None,
                   real_total: np.ndarray | None = None) -> list[np.ndarray]:
    """Per output of rank 2 or more, the cosine similarity of each last-axis vector (an embedding) at real
    tokens to the reference's; two zero vectors (a pad id's embedding, say) are equal: 1."""
    cosines = []
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or np.shape(got) != np.shape(ref) or np.ndim(ref) < 2:
            continue
        ref, got = _real_part(np.asarray(ref, np.float64), np.asarray(got, np.float64), real, real_total)
        ref, got = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
        ref_norms, got_norms = np.linalg.norm(ref, axis=-1), np.linalg.norm(got, axis=-1)
        cosine = (ref * got).sum(-1) / np.maximum(ref_norms * got_norms, 1e-30)
        cosines.append(np.where((ref_norms == 0) & (got_norms == 0), 1.0, cosine))
    return cosines


def _real_part(ref: np.ndarray, got: np.ndarray, real: np.ndarray | None,
               real_total: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if real is not None and ref.ndim >= 2 and ref.shape[:2] == real.shape:
        return ref[real], got[real]
    if real_total is not None and ref.ndim == 4 and (ref.shape[0], ref.shape[2]) == real_total.shape:
        return np.moveaxis(ref, 2, 1)[real_total], np.moveaxis(got, 2, 1)[real_total]
    return ref, got


def _abs_error(ref: np.ndarray, got: np.ndarray) -> float:
    if ref.size == 0:
        return 0.0
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.abs(ref - got)
    # Equal infinities and NaN where the original has NaN are agreement; other NaN is not.
    same = (ref == got) | (np.isnan(ref) & np.isnan(got))
    return float(np.max(np.where(same, 0.0, np.nan_to_num(diff, nan=np.inf))))


def _scale(ref: np.ndarray) -> float:
    finite = np.abs(ref[np.isfinite(ref)]) if ref.dtype.kind in "fc" else np.abs(ref)
    scale = float(finite.max()) if finite.size else 0.0
    return scale if scale > 0 else 1.0


# Besides the probe's cases: left padding, none (padding-free takes other branches for those), a
# batch PER_SEQUENCE_WIDTH tokens wide (attention one sequence at a time), and with a KV cache,
# a decode step over a longer cache and a continued prompt without padding.
CHECK_CASES = (Case(3, 12, "left"), Case(2, 9, "none"), Case(2, PER_SEQUENCE_WIDTH))
CACHE_CHECK_CASES = (Case(3, 1, "left", past=9), Case(2, 3, "none", past=4))
# OpenVINO also gets a batch of 32 rows, 48 tokens wide: where it mis-ran per-sequence attention (from 32 tokens).
TARGET_CHECK_CASES = {Target.OPENVINO: (Case(32, 48),)}


def check_inputs(model: ir.Model, probe: Any, seed: int = 0, target: Target = Target.ORT_CPU) -> list[CheckInputs]:
    """The probe's input sets, then CHECK_CASES (and CACHE_CHECK_CASES for models with a cache, and the
    target's own TARGET_CHECK_CASES)."""
    plan = probe.plan or InputPlan(model)
    cases = [*CHECK_CASES, *(CACHE_CHECK_CASES if plan.has_cache else ()), *TARGET_CHECK_CASES.get(target, ())]
    seed += probe.run_count
    return [*(probe.inputs(run) for run in range(probe.run_count)),
            *(plan.make(case, seed + i) for i, case in enumerate(cases))]


def model_tolerance(model: ir.Model) -> float:
    """The default tolerance (core/tolerance.py) of the least precise float the model computes in: its
    outputs', its weights', and what it casts to (a float16 model with float32 inputs and outputs, as
    onnxconverter's keep_io_types writes it, computes in float16)."""
    return precision_tolerance.least_precise(dtype.numpy() for dtype in _float_dtypes(model))


def _float_dtypes(model: ir.Model):
    for graph in model.graphs():
        for value in (*graph.outputs, *graph.initializers.values()):
            if value.dtype is not None and value.dtype.is_floating_point():
                yield value.dtype
        for node in graph:
            if node.op_type == "Cast" and node.domain in ("", "ai.onnx") and "to" in node.attributes:
                dtype = ir.DataType(node.attributes["to"].value)
                if dtype.is_floating_point():
                    yield dtype


def judge(max_abs: float, max_rel: float, tolerance: float, inputs: list[dict[str, Any]], message: str = "",
          worst: str | None = None) -> VerifyResult:
    """The check's result: ok when the largest relative error is within `tolerance`; `message`
    (a failure to run) or the error against the tolerance, on the `worst` output if named."""
    ok = max_rel <= tolerance
    if not message:
        message = f"max relative error {max_rel:.3g} {'within' if ok else 'over'} tolerance {tolerance:g}"
        message += f" (output {worst})" if worst and not ok else ""
    return VerifyResult(ok, max_abs, max_rel, tolerance, inputs, message)


# Each precision's tolerance (core/tolerance.py), for a check computing in it.
_TOLERANCES = {"f32": precision_tolerance.tolerance("float32"), "bf16": precision_tolerance.tolerance("bfloat16")}


def providers(target: Target) -> list[str]:
    """ORT CPU, or CUDA when the target asks for it and this machine has it."""
    if target == Target.ORT_CUDA and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Verifier:
    """The original's outputs, computed once, against which candidates are checked.

    A model that quantizes activations dynamically is judged by its twin (optimizer/twin.py): the
    candidate's twin against the original's, at the float tolerance. The candidate's error against
    the quantized original is reported beside it with the bound the twins derive for it, and must
    stay within it. With a `reference` (the fp32 model a quantized one was made from), the error of
    the candidate and of the original against it is reported too."""

    def __init__(self, original: ir.Model, options: PassOptions, inputs_list: list[CheckInputs], probe_runs: int = 2,
                 tolerance: float | None = None, reference: ir.Model | None = None):
        self.target = options.target
        self.original = original
        self.providers = providers(options.target)
        self._own_errors: dict[tuple[str, bool], float] = {}  # the original's, computed below float32
        self.tolerance = tolerance if tolerance is not None else model_tolerance(original)
        self.approximation = str(options.attention) if options.attention.approximate else None
        self.output_names = [o.name for o in original.graph.outputs]
        # The conditions of the original's Ifs come out too, to say which branches each set checks.
        self.branches = {node.name: node.inputs[0].name for node in original.graph if node.op_type == "If"}
        fed = {value.name for value in original.graph.inputs}
        conditions = [cond for cond in self.branches.values() if cond not in fed]
        runner = session(original, self.providers, extra_outputs=conditions, optimize=False)
        names = [o.name for o in runner.get_outputs()]
        self.inputs_list, self.references, self.cases = [], [], []
        for i, inputs in enumerate(inputs_list):
            try:
                values = dict(zip(names, runner.run(None, inputs.feeds)))
            except Exception:
                if i < probe_runs:
                    raise  # the probe ran these: something else is wrong
                continue  # a set the original itself cannot take (longer than its positions): no run will
            self.references.append({name: values[name] for name in self.output_names})
            self.cases.append(self._case(inputs, {**inputs.feeds, **values}))
            self.inputs_list.append(inputs)
        self.onnx_runtime = self.target != Target.OPENVINO  # where DequantizeLinear -> MatMul quantizes activations
        self.twin = twin(original, self.onnx_runtime)
        self.twin_references = self._ort_outputs(self.twin, TWIN_SESSION) if self.twin is not None else None
        self.fp32 = self._reference_outputs(reference) if reference is not None else None

    def _case(self, inputs: CheckInputs, values: dict[str, np.ndarray]) -> str:
        """The set's case, with the branch each If of the original takes on it."""
        taken = [f"{node} takes branch {'then' if bool(np.asarray(values[cond]).reshape(-1)[0]) else 'else'}"
                 for node, cond in self.branches.items() if cond in values]
        return "; ".join([inputs.case, *taken])

    def _outputs(self, candidate: ir.Model, precision: str = "f32", int8_activations: bool = False,
                 is_twin: bool = False) -> list[dict[str, np.ndarray]]:
        """The candidate's outputs on every check set, run where the target runs it (OpenVINO: at `precision`,
        quantizing activations with `int8_activations`)."""
        if self.target == Target.OPENVINO:
            return openvino_run.run(candidate, [inputs.feeds for inputs in self.inputs_list], precision,
                                    int8_activations)
        return self._ort_outputs(candidate, TWIN_SESSION if is_twin else None)

    def _own_error(self, precision: str, int8_activations: bool) -> float:
        """The original's own largest relative error when the target's runtime computes it below float32 (at
        `precision`, with its int8 activations): rounding adds up over a model's layers, so a deep model is
        that far off at that precision whatever the rewrite; the check allows it on top of the precision's
        tolerance. 0 where the runtime cannot run the original."""
        key = (precision, int8_activations)
        if key not in self._own_errors:
            try:
                outputs = self._outputs(self.original, precision, int8_activations)
                sets = zip(self.inputs_list, self.references, outputs)
                self._own_errors[key] = max(self._compare(reference, result, inputs)[1]
                                            for inputs, reference, result in sets)
            except Exception:  # not ours to verify: the check keeps the precision's tolerance alone
                self._own_errors[key] = 0.0
        return self._own_errors[key]

    def _ort_outputs(self, model: ir.Model, config: dict[str, str] | None = None) -> list[dict[str, np.ndarray]]:
        """The model's outputs on every check set, in ONNX Runtime (where the original runs)."""
        runner = session(model, self.providers, config=config)
        return [dict(zip(self.output_names, runner.run(self.output_names, inputs.feeds)))
                for inputs in self.inputs_list]

    def _reference_outputs(self, reference: ir.Model) -> list[dict[str, np.ndarray]]:
        """The fp32 reference's outputs on every check set; a UserError when it does not take the
        original's inputs or lacks one of its outputs."""
        inputs = [value.name for value in reference.graph.inputs]
        outputs = {value.name for value in reference.graph.outputs}
        missing = [name for name in self.output_names if name not in outputs]
        if missing or any(name not in self.inputs_list[0].feeds for name in inputs):
            raise UserError(f"the reference model does not compute the model's outputs from its inputs "
                            f"(outputs {', '.join(missing) or 'match'}; inputs {', '.join(inputs)})")
        try:
            runner = session(reference, self.providers)
            return [dict(zip(self.output_names, runner.run(self.output_names, {n: case.feeds[n] for n in inputs})))
                    for case in self.inputs_list]
        except Exception as e:
            raise UserError(f"the reference model does not run on the check inputs: {first_line(e)}") from None

    def check(self, candidate: ir.Model, precision: str = "f32", int8_activations: bool = False) -> VerifyResult:
        """The candidate against the original, computing in `precision` (where the target's runtime takes
        one: OpenVINO's INFERENCE_PRECISION_HINT), at that precision's tolerance where it is lower than float32;
        with `int8_activations`, the runtime quantizing activations as it does by default (OpenVINO, for int8
        weights), at their tolerance."""
        try:
            results = self._outputs(candidate, precision, int8_activations)
            twins = None if self.twin is None else \
                self._outputs(twin(candidate, self.onnx_runtime) or candidate, precision, is_twin=True)
        except Exception as e:  # a rewrite that does not even run fails verification
            return self._result([], message=f"the optimized model does not run: {first_line(e)}")
        judged, references = (twins, self.twin_references) if twins is not None else (results, self.references)
        per_set = [(inputs, *self._compare(reference, result, inputs))
                   for inputs, reference, result in zip(self.inputs_list, references, judged)]
        lowered = max(_TOLERANCES[precision], precision_tolerance.INT8_ACTIVATIONS if int8_activations else 0.0)
        own = self._own_error(precision, int8_activations) if lowered > self.tolerance else 0.0
        verdict = self._result(per_set, tolerance=max(self.tolerance, lowered + own))
        cosines = [vector_cosines(reference, result, inputs.real, inputs.real_total)
                   for inputs, reference, result in zip(self.inputs_list, self.references, results)]
        verdict.mean_cosine = float(np.mean([_mean_of(per_output) for per_output in cosines]))
        if precision != "f32" or int8_activations:
            verdict.precision = precision + (", int8 activations" if int8_activations else "")
            verdict.min_cosine = float(min((c.min() for per_output in cosines for c in per_output if c.size), default=1.0))
            verdict.original_error = own
            verdict.message += (f" ({lowered:g} plus the original's own error computing so, {own:.3g}); computing in "
                                f"{verdict.precision}, the outputs' vectors at real tokens have a min cosine "
                                f"of {verdict.min_cosine:.6f} to the original's (float32)")
        if twins is not None:
            verdict.check = Check.TWIN
            quantized, within = self._against_quantized(results, twins)
            verdict.against.append(quantized)
            verdict.ok = verdict.ok and within
        if self.fp32 is not None:
            verdict.against.append(self._against_fp32(results))
        if self.approximation:  # measured and reported, not held to the exact tolerance
            verdict.ok = bool(np.isfinite(verdict.max_rel_error))
            verdict.message = (f"approximation {self.approximation}: max relative error {verdict.max_rel_error:.3g}, "
                               f"mean cosine similarity {verdict.mean_cosine:.6f}")
        elif verdict.check is Check.TWIN:
            verdict.message = f"twin check (activation quantization removed): {verdict.message}"
        if verdict.against and not self.approximation:
            verdict.message += "; " + "; ".join(other.describe() for other in verdict.against)
        return verdict

    def _compare(self, reference: dict[str, np.ndarray], result: dict[str, np.ndarray],
                 inputs: CheckInputs) -> tuple[float, float]:
        return compare(reference, result, inputs.real, inputs.real_total)

    def _against_quantized(self, results: list[dict[str, np.ndarray]], twins: list[dict[str, np.ndarray]]
                           ) -> tuple[Against, bool]:
        """The candidate's largest error against the quantized original O with the bound its twin check
        implies there (or the error furthest over its bound), and whether every output of every set is
        within its bound: |O - R| <= |O - twin O|
        + |twin O - twin R| + |twin R - R|, the middle term within the tolerance of twin O's magnitude;
        all relative to O's magnitude."""
        pairs = []  # (error, bound) of each output on each check set
        for inputs, original, original_twin, result, result_twin in zip(
                self.inputs_list, self.references, self.twin_references, results, twins):
            found, original_noise, result_noise, twins_apart = (
                errors_by_output(a, b, inputs.real, inputs.real_total)
                for a, b in ((original, result), (original, original_twin), (result, result_twin),
                             (original_twin, result_twin)))
            for name, (error, scale) in found.items():
                twin_scale = twins_apart[name][1]
                bound = (original_noise[name][0] + result_noise[name][0] + self.tolerance * twin_scale) / scale
                pairs.append((error / scale, bound))
        over = [(error, bound) for error, bound in pairs if error > bound]
        error, bound = max(over, key=lambda pair: pair[0] - pair[1]) if over else max(pairs)
        return Against(Baseline.QUANTIZED_ORIGINAL, error, bound), not over

    def _against_fp32(self, results: list[dict[str, np.ndarray]]) -> Against:
        error = max(self._compare(reference, result, inputs)[1]
                    for inputs, reference, result in zip(self.inputs_list, self.fp32, results))
        original = max(self._compare(reference, result, inputs)[1]
                       for inputs, reference, result in zip(self.inputs_list, self.fp32, self.references))
        return Against(Baseline.FP32_REFERENCE, error, original_max_rel_error=original)

    def _result(self, per_set: list[tuple[CheckInputs, float, float]], message: str = "",
                tolerance: float | None = None) -> VerifyResult:
        max_abs = max((a for _, a, _ in per_set), default=float("inf"))
        max_rel = max((r for _, _, r in per_set), default=float("inf"))
        inputs = [
            {"case": case, "inputs": inputs.describe(), "padding": inputs.padding, "max_abs_error": a,
             "max_rel_error": r}
            for (inputs, a, r), case in zip(per_set, self.cases)
        ] or [{"case": case, "inputs": inputs.describe(), "padding": inputs.padding}
              for inputs, case in zip(self.inputs_list, self.cases)]
        return judge(max_abs, max_rel, tolerance or self.tolerance, inputs, message)


def verify(original: ir.Model, optimized: ir.Model, options: PassOptions, inputs_list: list[CheckInputs],
           tolerance: float | None = None, reference: ir.Model | None = None) -> VerifyResult:
    """Run both models on every set of check inputs; ok when the error is within tolerance."""
    return Verifier(original, options, inputs_list, tolerance=tolerance, reference=reference).check(optimized)
