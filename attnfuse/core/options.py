"""What a pass run is asked to do: typed, parsed once, passed down to every pass."""
from __future__ import annotations

from dataclasses import dataclass, field

from attnfuse.core.text_enum import TextEnum
from attnfuse.core.modes import AttentionMode


class Target(TextEnum):
    """Where the optimized model runs."""

    ORT_CPU = "ort-cpu"
    ORT_CUDA = "ort-cuda"
    OPENVINO = "openvino"
    TORCH_CPU = "cpu"
    TORCH_CUDA = "cuda"

    @property
    def standard_onnx(self) -> bool:
        """Its runtime reads standard ONNX ops only: fused ops are spelled without ONNX Runtime's contrib ops."""
        return self is Target.OPENVINO


@dataclass(frozen=True)
class PassOptions:
    target: Target = Target.ORT_CPU
    padding_free: bool = True
    verified: bool = True  # the result is verified afterwards: rewrites only verification can prove are allowed
    attention: AttentionMode = field(default_factory=AttentionMode)
