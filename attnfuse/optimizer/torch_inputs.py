"""Check inputs for a PyTorch model, made from the user's example inputs.

The example fixes names, dtypes and value ranges; the check inputs vary batch and
sequence length and pad rows on the right, on the left and down to one token, so
that probing and verification see what real batches do.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from attnfuse.optimizer.inputs import real_positions, row_lengths

# (batch, sequence length as a fraction of the example's, padding side) of each check input.
RUNS = ((3, 1.0, "right"), (2, 0.6, "left"), (4, 0.8, "right"))


@dataclass
class Signature:
    """The example inputs by name, and which of them is the padding mask."""

    example: dict[str, object]
    mask: str | None
    # The value at padded positions of an input, for an example without padding to show it
    # (a transformers model's config.pad_token_id for its input_ids).
    pad_ids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, example: dict[str, object], pad_ids: dict[str, int | None] | None = None) -> Signature:
        names = [name for name, value in example.items() if _is_mask(name, value)]
        known = {name: value for name, value in (pad_ids or {}).items() if isinstance(value, int)}
        return cls(example, names[0] if names else None, known)

    def dynamic_shapes(self) -> dict[str, object]:
        """Batch dynamic for every batched tensor; sequence too for [B, S] integer inputs (ids, masks)."""
        auto = torch.export.Dim.AUTO
        shapes = {}
        for name, value in self.example.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                shapes[name] = None
            elif _is_sequence(value):
                shapes[name] = {0: auto, 1: auto}
            else:
                shapes[name] = {0: auto}
        return shapes

    def runs(self, seed: int, count: int = 2) -> list[dict[str, object]]:
        return [self.make(batch, fraction, side, seed + i) for i, (batch, fraction, side) in enumerate(RUNS[:count])]

    def make(self, batch: int, fraction: float, side: str, seed: int) -> dict[str, object]:
        generator = torch.Generator().manual_seed(seed)
        width = self._width()
        length = max(2, round(width * fraction)) if width else None
        lengths = row_lengths(batch, length, np.random.default_rng(seed)) if length else None
        real = torch.from_numpy(real_positions(lengths, length, side)) if length else None
        out = {}
        for name, value in self.example.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                out[name] = value
            elif name == self.mask:
                out[name] = real.to(device=value.device, dtype=value.dtype)
            elif value.dim() == 2 and not value.dtype.is_floating_point and length:
                out[name] = self._ids(name, batch, length, real, generator)
            elif value.dtype.is_floating_point:
                shape = (batch, length, *value.shape[2:]) if _is_sequence(value) and length else (batch, *value.shape[1:])
                out[name] = torch.randn(shape, generator=generator, dtype=value.dtype).to(value.device)
            else:
                out[name] = value[:1].expand(batch, *value.shape[1:]).clone()
        return out

    def _width(self) -> int | None:
        if self.mask is not None:
            return self.example[self.mask].shape[1]
        for value in self.example.values():
            if isinstance(value, torch.Tensor) and _is_sequence(value):
                return value.shape[1]
        return None

    def _ids(self, name: str, batch: int, length: int, real: torch.Tensor, generator) -> torch.Tensor:
        """Values drawn from the example's own real positions; padded positions get its pad value
        (the example's, else the one known for the input, else real values)."""
        example = self.example[name]
        mask = self.example.get(self.mask) if self.mask else None
        seen = example[mask != 0] if mask is not None else example.flatten()
        padded_values = example[mask == 0].flatten().tolist() if mask is not None else []
        picks = torch.randint(len(seen), (batch, length), generator=generator)
        ids = seen.cpu()[picks]
        pad = padded_values[0] if padded_values else self.pad_ids.get(name)
        if pad is not None:
            ids = torch.where(real.bool(), ids, torch.tensor(pad, dtype=ids.dtype))
        return ids.to(example.device)


@dataclass
class Call:
    """The inputs a model was captured with: tensors by name, and the other values (flags
    such as return_dict), which the graph holds fixed."""

    tensors: tuple[str, ...]
    constants: dict[str, object]

    @classmethod
    def of(cls, named: dict[str, object]) -> Call:
        tensors = tuple(name for name, value in named.items() if isinstance(value, torch.Tensor))
        return cls(tensors, {name: value for name, value in named.items() if name not in tensors})

    def tensors_of(self, named: dict[str, object]) -> dict[str, torch.Tensor] | None:
        """A call's tensors, or None if it is not the captured call (None for an input the
        capture did not have counts as leaving it out)."""
        given = {name: value for name, value in named.items() if value is not None or name in self.constants}
        tensors = {name: value for name, value in given.items() if isinstance(value, torch.Tensor)}
        others = {name: value for name, value in given.items() if name not in tensors}
        return tensors if set(tensors) == set(self.tensors) and others == self.constants else None

    def __str__(self) -> str:
        return ", ".join([*self.tensors, *(f"{name}={value!r}" for name, value in self.constants.items())])


def real_mask(inputs: dict[str, object], signature: Signature) -> torch.Tensor | None:
    return inputs[signature.mask] != 0 if signature.mask else None


def _is_sequence(value: torch.Tensor) -> bool:
    """[B, S] ids and masks, and [B, S, hidden] embeddings."""
    return value.dim() == 2 and not value.dtype.is_floating_point or value.dim() == 3 and value.dtype.is_floating_point


def _is_mask(name: str, value: object) -> bool:
    return isinstance(value, torch.Tensor) and "mask" in name.lower() and value.dim() == 2 \
        and not value.dtype.is_floating_point
