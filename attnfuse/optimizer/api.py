"""optimize_onnx and inspect_onnx: the pipeline behind the Python API and the command line.

load -> probe the original -> rewrite a copy -> verify against the original ->
roll back the rewrites that change the result (optimizer/rollback.py).
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
import onnx_ir as ir

from attnfuse.core.driver import Candidate
from attnfuse.core.options import PassOptions, Target
from attnfuse.optimizer import io, openvino_run
from attnfuse.optimizer.config import OptimizeConfig
from attnfuse.optimizer.errors import UserError, VerificationError
from attnfuse.optimizer.inputs import InputPlan
from attnfuse.optimizer.probe import Probe
from attnfuse.optimizer.quantize import after_rewrites, check_float, padded_path_matmuls, quantize
from attnfuse.optimizer.report import Report, VerifyResult, count_fused_ops, ops_on_one_path
from attnfuse.optimizer.rollback import mark_rolled_back, rewrites, roll_back
from attnfuse.optimizer.verify import Verifier, check_inputs, providers
from attnfuse.passes.onnx import PassResult, prepare, run_passes, standard
from attnfuse.passes.onnx.activation_qdq import float_reads

ModelSource = str | os.PathLike | onnx.ModelProto
Progress = Callable[[str], None]
# The stages an optimize run goes through, in order, as given to `progress`.
# Roll-back trials are announced as "roll back: <k> of <n> rewrites" between "verify" and the end.
STAGES = ("load", "quantize", "probe", "rewrite", "verify")  # "quantize" only with config.quantize


@dataclass
class OptimizeResult:
    """The optimized model (an onnx_ir.Model, weights shared with the input) and its report."""

    model: ir.Model
    report: Report

    @property
    def proto(self) -> onnx.ModelProto:
        """The model as one self-contained ModelProto; ValueError for models over 2 GB."""
        return io.to_proto(self.model)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically; weights go to PATH.data when the model is large or its input had external data."""
        io.save_model(self.model, path)


@dataclass
class _Attempt:
    """One run of the passes on a fresh copy of the original."""

    model: ir.Model
    passes: PassResult
    excluded: frozenset[Candidate]
    verify: VerifyResult | None = None
    verify_precision: VerifyResult | None = None


def optimize_onnx(
    model: ModelSource, config: OptimizeConfig | None = None, *, progress: Progress | None = None, **overrides: Any
) -> OptimizeResult:
    """Optimize an ONNX model (a path or a ModelProto); `overrides` are OptimizeConfig fields.

    Raises UserError for unusable input and VerificationError when the result differs
    from the original beyond `config.tolerance` even after rolling back rewrites
    (unless `force`, which returns the fully rewritten model with the failed check).
    """
    config = make_config(config, overrides)
    options = config.pass_options()
    _check_runtime(config)
    stage = progress or _quiet
    start = time.perf_counter()
    stage("load")
    original = io.load_model(model)
    reference = io.load_model(config.reference) if config.reference is not None else None
    finish = None  # what each rewritten model gets last: its weights quantized, where that comes after the rewrites
    if config.quantize is not None:
        stage("quantize")
        reference = reference or original
        finish = after_rewrites(config.quantize, config.target == Target.OPENVINO, config.precision)
        # Quantized first, the export is the original the rewrites are verified against; quantized after
        # them, the same quantizer makes that original from the model the rewrites start from (below).
        original = check_float(original) if finish is not None else quantize(prepare(original), config.quantize)
    stage("probe")
    prepared = prepared_for(original, options)  # rewrites start from this; verification compares with the original
    probe = capture(prepared, config)
    if finish is not None:
        original = finish(prepared.clone())
    rewrite = _Rewriter(prepared, probe, finish)
    stage("rewrite")
    checked = checkable(options)
    first = attempt = rewrite(checked)
    culprits: dict[Candidate, str] = {}
    if config.verify:
        stage("verify")
        verifier = Verifier(original, checked, check_inputs(original, probe, config.seed, options.target),
                            probe.run_count, config.tolerance, reference)
        attempt, culprits = _verified(first, rewrite, checked, verifier, stage)
    if checked is not options:
        # The verified rewrites again, with the target's own ops (CUDA-only ones that this
        # machine cannot run) in place of their CPU equivalents.
        final = rewrite(options, attempt.excluded)
        final.verify = attempt.verify
        attempt = final
    if config.verify and (config.precision != "f32" or config.int8_activations) and attempt.verify.ok:
        stage(f"verify {config.precision}{' int8' if config.int8_activations else ''}")
        attempt.verify_precision = verifier.check(attempt.model, config.precision, config.int8_activations)
    rolled_back = mark_rolled_back(attempt.passes.applied, culprits, first.passes.applied)
    report = _report(model, original, config, attempt, rolled_back, time.perf_counter() - start)
    for check in (report.verify, report.verify_precision):
        if check is not None and not check.ok and not config.force:
            raise VerificationError(f"verification failed: {check.message}", report)
    return OptimizeResult(attempt.model, report)


def inspect_onnx(model: ModelSource, config: OptimizeConfig | None = None, **overrides: Any) -> Report:
    """What optimize_onnx would rewrite: the passes run on a copy, nothing is verified or written."""
    config = make_config(config, overrides)
    start = time.perf_counter()
    options = config.pass_options()
    original = io.load_model(model)
    prepared = prepared_for(original, options)
    attempt = _Rewriter(prepared, capture(prepared, config))(options)
    return _report(model, original, config, attempt, [], time.perf_counter() - start)


def prepared_for(original: ir.Model, options: PassOptions) -> ir.Model:
    """The model the rewrites start from: in the spellings the matchers know, at the opset the target writes."""
    prepared = prepare(original)
    return io.with_opset(prepared, standard.OPSET) if options.target.standard_onnx else prepared


def _check_runtime(config: OptimizeConfig) -> None:
    """The target's runtime is here to verify in, and this CPU computes the precision asked for."""
    if config.target != Target.OPENVINO or not config.verify:
        return
    if not openvino_run.installed():
        raise UserError(f"target openvino is verified in OpenVINO, which is not installed: {openvino_run.INSTALL} "
                        "(or --no-verify)")
    if config.precision == "bf16" and not openvino_run.has_bf16():
        raise UserError("precision bf16 needs a CPU with AVX512_BF16 or AMX, and this one has neither; use f32")


def capture(original: ir.Model, config: OptimizeConfig) -> Probe:
    """The probe of the original, on inputs made for it (with the user's input shapes)."""
    return Probe.capture(original, seed=config.seed, plan=InputPlan(original, config.input_shapes))


def checkable(options: PassOptions) -> PassOptions:
    """The options whose output this machine can run and so verify: the CUDA target's
    rewrites are checked in their CPU form when no CUDA provider is here."""
    if options.target == Target.ORT_CUDA and providers(options.target) == ["CPUExecutionProvider"]:
        return dataclasses.replace(options, target=Target.ORT_CPU)
    return options


def make_config(config: OptimizeConfig | None, overrides: dict[str, Any]) -> OptimizeConfig:
    """`config` (or the defaults) with `overrides` applied; bad names or values are UserErrors."""
    try:
        return dataclasses.replace(config or OptimizeConfig(), **overrides)
    except TypeError:
        known = {f.name for f in dataclasses.fields(OptimizeConfig)}
        unknown = ", ".join(sorted(set(overrides) - known))
        raise UserError(f"unknown option {unknown}; options are {', '.join(sorted(known))}") from None
    except ValueError as e:
        raise UserError(str(e)) from None


def _quiet(stage: str) -> None:
    pass


@dataclass
class _Rewriter:
    """Runs of the passes, each on a fresh copy of the prepared model, finished alike (`finish`: the
    int8 weights written for OpenVINO)."""

    prepared: ir.Model
    probe: Probe
    finish: Callable[[ir.Model], ir.Model] | None = None

    def __call__(self, options: PassOptions, excluded: frozenset[Candidate] = frozenset()) -> _Attempt:
        copy = self.prepared.clone()  # graph copied, weights shared
        passes = run_passes(copy, self.probe.for_rewrite(), options, excluded)
        return _Attempt(self.finish(copy) if self.finish else copy, passes, excluded)


def _verified(
    first: _Attempt, rewrite: _Rewriter, options: PassOptions, verifier: Verifier, stage: Progress
) -> tuple[_Attempt, dict[Candidate, str]]:
    """The first attempt if it verifies; otherwise the rewrites that verify together, and the
    reasons the others were rolled back. Returns `first` unchanged when nothing verifies."""

    def attempt(excluded: frozenset[Candidate]) -> _Attempt:
        result = rewrite(options, excluded)
        result.verify = verifier.check(result.model)
        return result

    first.verify = verifier.check(first.model)
    return roll_back(first, rewrites(first.passes.applied), attempt, stage)


def _report(source: ModelSource, original: ir.Model, config: OptimizeConfig, attempt: _Attempt,
            rolled_back: list[str], seconds: float) -> Report:
    """The report of `attempt`, the rewrite of `original` (read from `source`)."""
    matmuls = padded_path_matmuls(attempt.model)
    return Report(
        model=_source_name(source),
        target=str(config.target),
        attention_mode=str(config.attention),
        sites=attempt.passes.sites,
        fusions=attempt.passes.fusions,
        fused_ops=count_fused_ops(ops_on_one_path(attempt.model.graph)),
        quantize=str(config.quantize) if config.quantize is not None else None,
        quantized_matmuls=matmuls.total_quantized,
        float_matmuls=matmuls.float_weights,
        float_activation_reads=len(float_reads(original)),
        verify=attempt.verify,
        verify_precision=attempt.verify_precision,
        rolled_back=rolled_back,
        seconds=seconds,
    )


def _source_name(source: ModelSource) -> str:
    if isinstance(source, onnx.ModelProto):
        return source.graph.name or "<ModelProto>"
    return os.fspath(source)
