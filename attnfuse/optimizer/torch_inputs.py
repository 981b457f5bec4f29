"""Check inputs for a PyTorch model, made from the user's example inputs.

The example fixes names, dtypes and value ranges; the check inputs vary batch and
sequence length and pad rows on the right, on the left and down to one token, so
that probing and verification see what real batches do. With a KV cache among the
inputs, they vary the cache's length too (down to none): the mask then covers the
cache's positions and the new tokens, and position ids follow the mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from attnfuse.optimizer import torch_cache
from attnfuse.optimizer.inputs import real_positions, row_lengths

# (batch, sequence length as a fraction of the example's, padding side) of each check input.
# With a KV cache the fraction is of the cache's length, and the checks add an empty cache.
RUNS = ((3, 1.0, "right"), (2, 0.6, "left"), (4, 0.8, "right"))
EMPTY_CACHE = (2, 0.0, "left")


@dataclass
class Signature:
    """The example inputs by name, and which of them is the padding mask, a KV cache, position ids."""

    example: dict[str, object]
    mask: str | None
    cache: str | None = None
    positions: str | None = None
    # The value at padded positions of an input, for an example without padding to show it
    # (a transformers model's config.pad_token_id for its input_ids).
    pad_ids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, example: dict[str, object], pad_ids: dict[str, int | None] | None = None) -> Signature:
        names = [name for name, value in example.items() if _is_mask(name, value)]
        caches = [name for name, value in example.items() if torch_cache.is_cache(value)]
        positions = [name for name, value in example.items() if "position" in name and isinstance(value, torch.Tensor)
                     and value.dim() == 2 and not value.dtype.is_floating_point]
        known = {name: value for name, value in (pad_ids or {}).items() if isinstance(value, int)}
        return cls(example, names[0] if names else None, caches[0] if caches else None,
                   positions[0] if positions and names and caches else None, known)

    def dynamic_shapes(self) -> dict[str, object]:
        """Batch dynamic for every batched tensor; sequence too for [B, S] integer inputs (ids, masks);
        a cache's length too. A decode step (one new token) stays one token: a capture from two would
        take the branches models take for prompts."""
        auto = torch.export.Dim.AUTO
        shapes = {}
        for name, value in self.example.items():
            if name == self.cache:
                shapes[name] = torch_cache.dynamic_shapes(value)
            elif not isinstance(value, torch.Tensor) or value.dim() == 0:
                shapes[name] = None
            elif _is_sequence(value) and (self.cache is None or name == self.mask or self._new_tokens() != 1):
                shapes[name] = {0: auto, 1: auto}
            else:
                shapes[name] = {0: auto}
        return shapes

    def runs(self, seed: int, count: int = 2) -> list[dict[str, object]]:
        specs = RUNS[:count] + ((EMPTY_CACHE,) if self.cache is not None and count > 2 else ())
        return [self.make(batch, fraction, side, seed + i) for i, (batch, fraction, side) in enumerate(specs)]

    def make(self, batch: int, fraction: float, side: str, seed: int) -> dict[str, object]:
        if self.cache is not None:
            return self._make_cached(batch, fraction, side, seed)
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

    def _make_cached(self, batch: int, fraction: float, side: str, seed: int) -> dict[str, object]:
        """A step with a cache of the example's length times `fraction`: the mask pads the start of
        the rows ("left") or the end of the cache's part ("right", holes before the new tokens)."""
        generator = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        past = round(torch_cache.past_length(self.example[self.cache]) * fraction)
        new = self._new_tokens() or 1
        if side == "left":
            real = real_positions(row_lengths(batch, past + new, rng), past + new, "left")
        else:
            real = np.concatenate([real_positions(row_lengths(batch, past, rng), past, "right") if past else
                                   np.zeros((batch, 0), bool), np.ones((batch, new), bool)], axis=1)
        real = torch.from_numpy(real)
        out = {}
        for name, value in self.example.items():
            if name == self.cache:
                out[name] = torch_cache.cache_like(value, batch, past, generator)
            elif name == self.mask:
                out[name] = real.to(device=value.device, dtype=value.dtype)
            elif name == self.positions:  # counted over the real tokens, as generation does
                positions = (real.long().cumsum(-1) - 1).clamp_min(0)[:, -new:]
                out[name] = positions.to(device=value.device, dtype=value.dtype)
            elif isinstance(value, torch.Tensor) and value.dim() == 2 and not value.dtype.is_floating_point:
                out[name] = self._ids(name, batch, new, real[:, -new:], generator)
            elif isinstance(value, torch.Tensor) and value.dim() > 0:
                shape = (batch, new, *value.shape[2:]) if _is_sequence(value) else (batch, *value.shape[1:])
                out[name] = torch.randn(shape, generator=generator, dtype=value.dtype).to(value.device) \
                    if value.dtype.is_floating_point else value[:1].expand(*shape).clone()
            else:
                out[name] = value
        return out

    def _new_tokens(self) -> int | None:
        """The new tokens of a step with a cache: the width of its [B, S] inputs besides the mask."""
        return _sequence_width(self.example, self.mask)

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
        mask = mask[:, -example.shape[1]:] if mask is not None else None  # a cache's positions come first
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
    """The inputs a model was captured with: what the graph takes (tensors, and KV caches as
    trees of tensors) by name, and the other values (flags such as return_dict), which the
    graph holds fixed."""

    traced: tuple[str, ...]
    constants: dict[str, object]

    @classmethod
    def of(cls, named: dict[str, object]) -> Call:
        traced = tuple(name for name, value in named.items() if _traced(value))
        return cls(traced, {name: value for name, value in named.items() if name not in traced})

    def traced_of(self, named: dict[str, object]) -> dict[str, object] | None:
        """A call's traced inputs, or None if it is not the captured call (None for an input the
        capture did not have counts as leaving it out)."""
        given = {name: value for name, value in named.items() if value is not None or name in self.constants}
        traced = {name: value for name, value in given.items() if _traced(value)}
        others = {name: value for name, value in given.items() if name not in traced}
        return traced if set(traced) == set(self.traced) and others == self.constants else None

    def __str__(self) -> str:
        return ", ".join([*self.traced, *(f"{name}={value!r}" for name, value in self.constants.items())])


def _traced(value: object) -> bool:
    return isinstance(value, torch.Tensor) or torch_cache.is_cache(value)


def real_mask(inputs: dict[str, object], signature: Signature) -> torch.Tensor | None:
    return inputs[signature.mask] != 0 if signature.mask else None


def new_tokens(inputs: dict[str, object], signature: Signature) -> int | None:
    """How many of the mask's last positions are this step's tokens, for a step with a cache."""
    return None if signature.cache is None else _sequence_width(inputs, signature.mask)


def _sequence_width(inputs: dict[str, object], mask: str | None) -> int | None:
    """The width of the first [B, S] input besides the mask."""
    return next((v.shape[1] for name, v in inputs.items()
                 if name != mask and isinstance(v, torch.Tensor) and _is_sequence(v)), None)


def pad_ids(model) -> dict[str, int | None]:
    """The pad id of a transformers model's input_ids (its config's), for Signature.of."""
    return {"input_ids": getattr(getattr(model, "config", None), "pad_token_id", None)}


def _is_sequence(value: torch.Tensor) -> bool:
    """[B, S] ids and masks, and [B, S, hidden] embeddings."""
    return value.dim() == 2 and not value.dtype.is_floating_point or value.dim() == 3 and value.dtype.is_floating_point


def _is_mask(name: str, value: object) -> bool:
    return isinstance(value, torch.Tensor) and "mask" in name.lower() and value.dim() == 2 \
        and not value.dtype.is_floating_point
