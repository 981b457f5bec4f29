"""One base for the enums whose members are their strings."""
from __future__ import annotations

import enum


class TextEnum(str, enum.Enum):
    """An enum whose members read as their values: in reports, JSON, messages and f-strings alike
    (enum.StrEnum, which needs Python 3.11)."""

    def __str__(self) -> str:
        return self.value
