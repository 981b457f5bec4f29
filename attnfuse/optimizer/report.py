"""What an optimize run did: the report behind `--report` and `result.report`."""
from __future__ import annotations

import enum
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from attnfuse.core.text_enum import TextEnum
from attnfuse.core import registry
from attnfuse.core.outcome import AttentionSite
from attnfuse.passes.onnx import quantized
from attnfuse.passes.onnx.graph import nodes_on_one_path


class Check(str, enum.Enum):
    """What verification compared."""

    DIRECT = "direct"  # the optimized model with the original
    TWIN = "twin"  # their twins without activation quantization (optimizer/twin.py), at the float tolerance


class Baseline(TextEnum):
    """A model the optimized one is measured against besides the one verification judged it by."""

    QUANTIZED_ORIGINAL = "quantized original"  # when the twins judged it
    FP32_REFERENCE = "fp32 reference"  # the fp32 model a quantized one was made from


@dataclass
class Against:
    """The optimized model's error against a model it was not judged by, relative to that model's outputs."""

    model: Baseline
    max_rel_error: float
    bound: float | None = None  # what it may reach: the twins' own quantization errors plus the tolerance
    original_max_rel_error: float | None = None  # the original's own error against that model

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.value, "max_rel_error": _finite_or_none(self.max_rel_error),
                "bound": _finite_or_none(self.bound) if self.bound is not None else None,
                "original_max_rel_error": _finite_or_none(self.original_max_rel_error)
                if self.original_max_rel_error is not None else None}

    def describe(self) -> str:
        text = f"against the {self.model} {self.max_rel_error:.3g}"
        if self.bound is not None:
            text += f" ({'within' if self.max_rel_error <= self.bound else 'over'} its bound {self.bound:.3g})"
        if self.original_max_rel_error is not None:
            text += f" (the original: {self.original_max_rel_error:.3g})"
        return text


@dataclass
class VerifyResult:
    ok: bool
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    inputs: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""
    mean_cosine: float = 1.0  # of the outputs' vectors at real tokens; reported for approximations
    precision: str = "f32"  # what the optimized model computed in (OpenVINO's precision hint)
    min_cosine: float | None = None  # below float32: of the outputs' vectors at real tokens, to the original's
    original_error: float | None = None  # below float32: the original's own error computing so (in the tolerance)
    check: Check = Check.DIRECT
    against: list[Against] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "precision": self.precision,
            "check": self.check.value,
            "max_abs_error": _finite_or_none(self.max_abs_error),
            "max_rel_error": _finite_or_none(self.max_rel_error),
            "tolerance": self.tolerance,
            "mean_cosine": _finite_or_none(self.mean_cosine),
            "min_cosine": None if self.min_cosine is None else _finite_or_none(self.min_cosine),
            "original_error": None if self.original_error is None else _finite_or_none(self.original_error),
            "against": [other.to_dict() for other in self.against],
            "inputs": self.inputs,
            "message": self.message,
        }


@dataclass
class Report:
    model: str = ""
    # How the run ended, as the exit code says it: "ok" (0), "user_error" (1), "verification_failed" (2),
    # "internal_error" (3); `error` is the one-line message of a run that did not end "ok".
    status: str = "ok"
    error: str | None = None
    target: str = "ort-cpu"
    attention_mode: str = "exact"
    sites: list[AttentionSite] = field(default_factory=list)
    fusions: list[Any] = field(default_factory=list)  # passes.onnx.Fusion
    fused_ops: dict[str, int] = field(default_factory=dict)  # op type -> count in the output graph
    quantize: str | None = None  # "int8" / "int4" when the run quantized the model (--quantize)
    # MatMuls with a constant weight on the path a padded batch runs: quantized ones, and those left in float
    quantized_matmuls: int = 0
    float_matmuls: int = 0
    # Reads of a statically quantized activation that read it in float, where no int8 MatMul uses it
    # (passes/onnx/activation_qdq.py)
    float_activation_reads: int = 0
    verify: VerifyResult | None = None
    verify_precision: VerifyResult | None = None  # the check at the user's precision, where it is not float32
    rolled_back: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def attention_total(self) -> int:
        return len(self.sites)

    @property
    def attention_fused(self) -> int:
        return sum(site.fused for site in self.sites)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "status": self.status,
            "error": self.error,
            "target": self.target,
            "attention": {
                "total": self.attention_total,
                "fused": self.attention_fused,
                "sites": [site.summary() for site in self.sites],
                "mode": self.attention_mode,
            },
            "fused_ops": dict(self.fused_ops),
            "quantize": self.quantize,
            "quantized_matmuls": self.quantized_matmuls,
            "float_matmuls": self.float_matmuls,
            "float_activation_reads": self.float_activation_reads,
            "fusions": [f.summary() for f in self.fusions],
            "verify": self.verify.to_dict() if self.verify else None,
            "verify_precision": self.verify_precision.to_dict() if self.verify_precision else None,
            "rolled_back": list(self.rolled_back),
            "seconds": round(self.seconds, 3),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def ops_on_one_path(graph) -> list[tuple[str, str]]:
    """(domain, op_type) of the nodes one run takes (see graph.nodes_on_one_path)."""
    return [(node.domain, node.op_type) for node in nodes_on_one_path(graph)]


def count_fused_ops(op_types: list[tuple[str, str]]) -> dict[str, int]:
    """Count the fused ops among (domain, op_type) pairs: those of the registry (ONNX Runtime's
    own in the ONNX domain included), and every other com.microsoft op a model came with but its
    quantized MatMuls (the report counts those apart: quantized_matmuls)."""
    return dict(Counter(op for domain, op in op_types
                        if (domain == registry.MS_DOMAIN or registry.of_onnx(domain, op) is not None)
                        and quantized.of_onnx(domain, op) is None))


def _finite_or_none(number: float) -> float | None:
    """Strict JSON has no Infinity or NaN: an error that is not finite is reported as null."""
    return number if math.isfinite(number) else None
