"""The decoder zoo's cases: family x exporter x attention x cache, their wrappers and cached exports.

A case that cannot be built or exported stays in the list with the reason (`unavailable`), so
that a test can check the reason still holds rather than the case silently disappearing.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import torch

from attnfuse.models._export import EXPORTERS, cached, export_onnx
from attnfuse.models.decoders import families, inputs, wrappers
from attnfuse.models.decoders.families import CAUSAL, ENCODER, FAMILIES, SEQ2SEQ

ATTENTIONS = ("eager", "sdpa")
WEIGHTS_VERSION = "d2"  # part of the cache key with the config's fingerprint: bump it when the weights or a wrapper change
CACHE_MODES = {
    CAUSAL: (wrappers.NO_CACHE, wrappers.PAST_MODE),
    SEQ2SEQ: (wrappers.NO_CACHE, wrappers.FIRST, wrappers.PAST_MODE),
    ENCODER: (wrappers.NO_CACHE,),
}


@dataclasses.dataclass(frozen=True)
class DecoderCase:
    family: str
    exporter: str  # "dynamo" or "torchscript"
    attention: str  # "eager" or "sdpa"
    cache: str  # "none", "past" or (seq2seq) "first"

    @property
    def id(self) -> str:
        return f"{self.family}-{self.exporter}-{self.attention}-{self.cache}"

    @property
    def kind(self) -> str:
        return FAMILIES[self.family].kind

    @property
    def unavailable(self) -> str | None:
        """Why this case cannot be built or exported, or None."""
        return next((r.reason for r in REFUSALS if r.matches(self)), None)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Cases that cannot be built or exported (None matches any value), why, and the error that shows it."""

    family: str
    reason: str
    error: str  # a regular expression the failure's message matches
    exporter: str | None = None
    attention: str | None = None
    cache: str | None = None

    def matches(self, case: DecoderCase) -> bool:
        return all(want is None or want == getattr(case, field)
                   for field, want in (("family", self.family), ("exporter", self.exporter),
                                       ("attention", self.attention), ("cache", self.cache)))


REFUSALS = (
    Refusal("gemma2", "transformers' Gemma2 has no SDPA attention (_supports_sdpa is False: SDPA cannot soft-cap)",
            error="does not support an attention implementation through torch.nn.functional.scaled_dot_product",
            attention="sdpa"),
    Refusal("whisper", "TorchScript has no ONNX translation of aten::diff, which transformers' packed-sequence check "
            "runs on Whisper's decoder position ids when there is neither a cache nor a decoder mask",
            error="aten::diff", exporter="torchscript", cache=wrappers.NO_CACHE),
)


CASES: list[DecoderCase] = [
    DecoderCase(family, exporter, attention, cache)
    for family, spec in FAMILIES.items() for exporter in EXPORTERS for attention in ATTENTIONS
    for cache in CACHE_MODES[spec.kind]
]
AVAILABLE: list[DecoderCase] = [case for case in CASES if case.unavailable is None]
# What the test suite exports (within its time on a machine without the export cache): every family
# and cache mode, each exporter with one attention implementation, the two crossed (dynamo with
# SDPA, TorchScript with eager), and eager twice where there is no SDPA. `python -m
# benchmarks.decoder_coverage` takes every available case.
TESTED: list[DecoderCase] = [
    case for case in AVAILABLE
    if (case.exporter, case.attention) in (("dynamo", "sdpa"), ("torchscript", "eager"))
    or (case.attention == "eager" and DecoderCase(case.family, case.exporter, "sdpa", case.cache).unavailable)
]


def find(case_id: str) -> DecoderCase:
    return next(case for case in CASES if case.id == case_id)


def build_torch(case: DecoderCase, seed: int = 0) -> torch.nn.Module:
    """The case's model in its flat-tensor wrapper (eval, fp32); raises for an unavailable case."""
    return wrappers.wrap(case.kind, families.build(case.family, case.attention, seed), case.cache).eval()


def config(case: DecoderCase):
    return FAMILIES[case.family].make_config(case.attention)


def signature(case: DecoderCase) -> wrappers.Signature:
    """The case's input and output names and dims, without building the model."""
    return wrappers.signature(case.kind, config(case), case.cache)


def example(case: DecoderCase, step: inputs.Step, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for one call of the case's file (see inputs.Step), by name in the file's order."""
    return inputs.make(signature(case), config(case), step, seed)


def export(case: DecoderCase, path: str | os.PathLike, opset: int = 18) -> pathlib.Path:
    """Export the case to `path` (.onnx, weights inside) with the wrapper's names and dynamic dims."""
    return export_wrapped(build_torch(case), case.cache, path, dynamo=case.exporter == "dynamo", opset=opset)


def export_wrapped(module: torch.nn.Module, cache: str, path: str | os.PathLike, dynamo: bool,
                   opset: int = 18) -> pathlib.Path:
    """Export a decoder in its flat-tensor wrapper (`wrappers.wrap`, cache mode `cache`) with its
    names and dynamic dims, from an example step of that mode."""
    step = inputs.EXPORT_STEPS[cache == wrappers.PAST_MODE]
    example = inputs.make(module.signature, module.model.config, step)
    return export_onnx(module, example, path, dynamo=dynamo, dynamic_dims=module.signature.dynamic_dims,
                       output_names=module.signature.output_names, opset=opset)


def exported(case: DecoderCase, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The case's .onnx, exported on first use into the cache and reused after."""
    if case.unavailable:
        raise ValueError(f"{case.id} cannot be exported: {case.unavailable}")
    name = f"decoder-{case.id}-{WEIGHTS_VERSION}-{FAMILIES[case.family].fingerprint}"
    return cached(name, lambda tmp: export(case, tmp), cache_dir)
