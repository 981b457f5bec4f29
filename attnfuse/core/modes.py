"""The `--attention` modes: exact (the default) or an opt-in approximation."""
from __future__ import annotations

from dataclasses import dataclass

EXACT, WINDOW, PERFORMER, ELU, LINFORMER = "exact", "window", "performer", "elu", "linformer"
USAGE = "exact | window=W[,global=G] | performer=F | elu | linformer=K"


@dataclass(frozen=True)
class AttentionMode:
    kind: str = EXACT
    window: int = 0  # window: each query sees keys within +-window
    global_tokens: int = 0  # window: the first tokens attend to and are attended by all
    features: int = 0  # performer: random features
    rank: int = 0  # linformer: projected sequence length
    seed: int = 0

    @property
    def approximate(self) -> bool:
        return self.kind != EXACT

    def __str__(self) -> str:
        if self.kind == WINDOW:
            return f"window={self.window}" + (f",global={self.global_tokens}" if self.global_tokens else "")
        if self.kind == PERFORMER:
            return f"performer={self.features}"
        if self.kind == LINFORMER:
            return f"linformer={self.rank}"
        return self.kind


def parse_attention(text: str | AttentionMode) -> AttentionMode:
    """'window=256,global=2' -> AttentionMode(window, 256, 2). ValueError with the usage."""
    if isinstance(text, AttentionMode):
        return text
    head, _, rest = str(text).strip().partition(",")
    kind, _, value = head.partition("=")
    options = dict(part.partition("=")[::2] for part in rest.split(",") if part)
    try:
        if kind == EXACT and not value and not options:
            return AttentionMode()
        if kind == ELU and not value and not options:
            return AttentionMode(ELU)
        number = int(value)
        if number <= 0:
            raise ValueError
        if kind == WINDOW and set(options) <= {"global"}:
            return AttentionMode(WINDOW, window=number, global_tokens=int(options.get("global", 0)))
        if kind == PERFORMER and not options:
            return AttentionMode(PERFORMER, features=number)
        if kind == LINFORMER and not options:
            return AttentionMode(LINFORMER, rank=number)
    except ValueError:
        pass
    raise ValueError(f"bad attention mode {text!r}; use {USAGE}")
