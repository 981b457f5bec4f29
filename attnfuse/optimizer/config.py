"""What a user can ask of an optimize run."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx

from attnfuse.core.modes import AttentionMode, parse_attention
from attnfuse.core.options import PassOptions, Target
from attnfuse.optimizer.quantize import Quantization, parse_quantization

TARGETS = (Target.ORT_CPU, Target.ORT_CUDA, Target.OPENVINO)
PRECISIONS = ("f32", "bf16")


@dataclass
class OptimizeConfig:
    target: Target | str = Target.ORT_CPU
    verify: bool = True  # compare optimized with original on generated inputs
    force: bool = False  # write even when verification fails
    attention: AttentionMode | str = "exact"  # parsed into an AttentionMode
    padding_free: bool = True
    tolerance: float | None = None  # max error relative to the output's scale; None: by the model's dtype
    seed: int = 0
    input_shapes: Mapping[str, Sequence[int]] | None = None  # input name -> dims, for what the graph leaves open
    precision: str = "f32"  # what the optimized model will compute in (openvino: its INFERENCE_PRECISION_HINT)
    quantize: Quantization | str | None = None  # "int8" | "int4": the output quantized by ONNX Runtime's quantizers
    # The fp32 model a quantized input was made from: the report gives the errors against it too.
    reference: str | os.PathLike | onnx.ModelProto | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        self.target = Target(self.target)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.precision != "f32" and self.target != Target.OPENVINO:
            raise ValueError(f"precision {self.precision} is for target openvino (its runtime's precision hint)")
        self.attention = parse_attention(self.attention)  # ValueError with the usage
        self.quantize = parse_quantization(self.quantize)  # ValueError with the choices
        if self.quantize == Quantization.INT4 and self.target == Target.OPENVINO:
            # MatMulNBits, what int4 writes, is ONNX Runtime's own op
            raise ValueError("--quantize int4 is for the ONNX Runtime targets; openvino takes --quantize int8")

    @property
    def int8_activations(self) -> bool:
        """Whether the runtime quantizes activations itself: OpenVINO does at f32, for the int8 weights it is
        given (at bf16 they are widened: optimizer/quantize.py)."""
        return self.quantize == Quantization.INT8 and self.target == Target.OPENVINO and self.precision == "f32"

    def pass_options(self) -> PassOptions:
        """What the passes are asked to do."""
        return PassOptions(self.target, self.padding_free, self.verify, self.attention)
