"""What a user can ask of an optimize run."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from attnfuse.core.modes import parse_attention

TARGETS = ("ort-cpu", "ort-cuda")


@dataclass
class OptimizeConfig:
    target: str = "ort-cpu"
    verify: bool = True  # compare optimized with original on generated inputs
    force: bool = False  # write even when verification fails
    attention: str = "exact"
    padding_free: bool = True
    tolerance: float | None = None  # max error relative to the output's scale; None: by the model's dtype
    seed: int = 0
    input_shapes: Mapping[str, Sequence[int]] | None = None  # input name -> dims, for what the graph leaves open

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        self.attention = str(parse_attention(self.attention))  # ValueError with the usage
