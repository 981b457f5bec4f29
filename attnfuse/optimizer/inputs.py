"""Check inputs made from what the graph says its inputs are (see input_roles.py).

A model is checked on inputs that look like real ones: token ids inside the
vocabulary, attention masks with real padding (rows of different lengths, also at
fixed shapes), KV caches whose length adds up with the new tokens under the mask,
position ids that follow the mask, images of a size the model takes. Each set of
inputs is made for a `Case` (sizes, padding side, cache length), which names what
it covers in the report.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from attnfuse.optimizer.errors import UserError
from attnfuse.optimizer.input_roles import (
    BATCH, CACHE, CACHE_FLAG, DEFAULT_IMAGE, ENCODER, ENCODER_CACHE, ENCODER_STATES, FLOAT, HEADS, IDS, IMAGE, MASK,
    NEW, OTHER, PAST, PIXELS, POSITIONS, TOKEN_TYPES, TOTAL, Dim, InputRole, padding_mask, read_roles, token_ids,
)

DEFAULT_VOCAB = 100
ENCODER_TOKENS = 7  # the length of encoder states and cross-attention caches in every case
PADDINGS = ("right", "left", "none")


@dataclass(frozen=True)
class Case:
    """What one set of check inputs covers: its sizes, padding side and cache length."""

    batch: int
    seqlen: int
    padding: str = "right"
    past: int = 0

    def __post_init__(self) -> None:
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be 'right', 'left' or 'none', not {self.padding!r}")

    def describe(self, has_cache: bool = False) -> str:
        padding = "no padding" if self.padding == "none" else f"{self.padding} padding"
        past = f", past {self.past}" if has_cache else ""
        return f"{padding}, batch {self.batch} x {self.seqlen} new tokens{past}"


@dataclass
class CheckInputs:
    feeds: dict[str, np.ndarray]
    real: np.ndarray | None = None  # bool [B, S]: True at real (not padded) new tokens
    lengths: dict[str, list[int]] = field(default_factory=dict)  # mask name -> real tokens per row
    padding: str = "right"
    case: str = ""
    real_total: np.ndarray | None = None  # bool [B, past + S]: the mask over cached and new tokens
    batch: int = 0  # the batch size fed (the case's, or the one the graph fixes)

    def describe(self) -> list[dict[str, Any]]:
        """Name, shape and dtype of every feed, and the row lengths of the masks."""
        out = []
        for name, array in self.feeds.items():
            entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "dtype": str(array.dtype)}
            if name in self.lengths:
                entry["lengths"] = self.lengths[name]
                entry["padding"] = self.padding
            out.append(entry)
        return out


class InputPlan:
    """The graph's inputs, ready to be fed for any `Case`. `shapes` (input name -> dims) fixes what
    the graph leaves open and attnfuse cannot derive."""

    def __init__(self, model: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None):
        self.roles = read_roles(model)
        self.shapes = {name: tuple(int(d) for d in dims) for name, dims in (shapes or {}).items()}
        known = {role.name for role in self.roles}
        unknown = sorted(set(self.shapes) - known)
        if unknown:
            raise UserError(f"--input-shape names {', '.join(unknown)}, which the model does not take as inputs "
                            f"(its inputs: {', '.join(sorted(known))})")
        for role in self.roles:
            given = self.shapes.get(role.name)
            if given is not None and role.dims is not None and len(given) != len(role.dims):
                raise UserError(f"--input-shape {role.name}: {len(given)} dims given, the model's input has {len(role.dims)}")
        self.has_cache = any(role.role == CACHE for role in self.roles)
        # Images whose side the graph leaves open are made DEFAULT_IMAGE wide; the probe tries others.
        self.open_image = any(dim.quantity == IMAGE for role in self.roles if role.name not in self.shapes
                              for dim in role.dims or ())
        self.image_side = DEFAULT_IMAGE
        self.cache_heads = _cache_heads(self.roles)
        # The inputs padding-free reads, by name (the passes rewrite a copy of the graph).
        mask, ids = padding_mask(self.roles), token_ids(self.roles)
        self.padding_mask: str | None = mask.name if mask else None
        self.token_ids: str | None = ids.name if ids else None

    def describe(self, case: Case) -> str:
        return case.describe(self.has_cache)

    def make(self, case: Case, seed: int) -> CheckInputs:
        maker = _Maker(self, case, np.random.default_rng(seed))
        feeds = {role.name: maker.feed(role) for role in _tokens_first(self.roles)}
        return CheckInputs(
            feeds={role.name: feeds[role.name] for role in self.roles},
            real=maker.real, lengths=maker.lengths, padding=case.padding, case=self.describe(case),
            real_total=maker.real_total, batch=maker.batch(feeds),
        )


def _cache_heads(roles: list[InputRole]) -> int:
    """Heads in a KV cache whose heads dim the graph leaves open: the hidden size (the width of
    the token embeddings) over the head size (the cache's fixed last dim)."""
    width = next((role.table_width for role in roles if role.role == IDS and role.table_width), None)
    for role in roles:
        if role.role == CACHE and role.dims:
            sizes = [dim.size for axis, dim in enumerate(role.dims) if axis and dim.size]
            if width and sizes and width % sizes[-1] == 0:
                return width // sizes[-1]
    return 1


def make_inputs(model: ir.Model, batch: int, seqlen: int, seed: int, padding: str = "right", past: int = 0,
                shapes: Mapping[str, Sequence[int]] | None = None) -> CheckInputs:
    """Check inputs for one case (a shortcut for InputPlan(model).make)."""
    return InputPlan(model, shapes).make(Case(batch, seqlen, padding, past), seed)


def _tokens_first(roles: list[InputRole]) -> list[InputRole]:
    """Masks first (they decide the real tokens), then the rest; the graph's order is kept apart."""
    return sorted(roles, key=lambda role: role.role != MASK)


class _Maker:
    """Makes the feeds of one case; symbols shared between inputs get one size."""

    def __init__(self, plan: InputPlan, case: Case, rng: np.random.Generator):
        self.plan, self.case, self.rng = plan, case, rng
        self.quantities = {BATCH: case.batch, NEW: case.seqlen, PAST: case.past, TOTAL: case.past + case.seqlen,
                           ENCODER: ENCODER_TOKENS, IMAGE: plan.image_side, HEADS: plan.cache_heads}
        self.symbols: dict[str, int] = {}
        self.lengths: dict[str, list[int]] = {}
        self.real: np.ndarray | None = None
        self.real_total: np.ndarray | None = None
        self._bind_symbols()

    def _bind_symbols(self) -> None:
        """Every plain symbol gets its quantity's size (the first input naming it wins)."""
        for role in self.plan.roles:
            given = self.plan.shapes.get(role.name)
            for axis, dim in enumerate(role.dims or ()):
                if dim.symbol is None or dim.expression is not None or dim.symbol in self.symbols:
                    continue
                if given is not None:
                    self.symbols[dim.symbol] = given[axis]
                elif dim.quantity is not None:
                    self.symbols[dim.symbol] = self.quantities[dim.quantity]
        # A cache dim written "batch_size x num_heads": a name nothing else binds counts heads.
        for role in self.plan.roles:
            if role.role in (CACHE, ENCODER_CACHE):
                for dim in role.dims or ():
                    for name in dim.expression.names() if dim.expression else ():
                        self.symbols.setdefault(name, self.quantities[HEADS])

    def shape(self, role: InputRole) -> tuple[int, ...]:
        if role.name in self.plan.shapes:
            return self.plan.shapes[role.name]
        if role.dims is None:
            return (self.case.batch, self.case.seqlen)
        return tuple(self._size(dim) for dim in role.dims)

    def _size(self, dim: Dim) -> int:
        if dim.size is not None:
            return dim.size
        if dim.symbol in self.symbols:
            return self.symbols[dim.symbol]
        if dim.expression is not None:
            size = dim.expression.evaluate(self.symbols)
            if size is not None:
                return size
        if dim.quantity is not None:
            return self.quantities[dim.quantity]
        return self.case.seqlen  # a size only the model knows: the error will say what was tried

    def batch(self, feeds: dict[str, np.ndarray]) -> int:
        """The batch fed: the first dim of the first input whose first dim is the batch."""
        for role in self.plan.roles:
            if role.dims and (role.dims[0].quantity == BATCH or role.role in (IDS, MASK)) and feeds[role.name].ndim:
                return int(feeds[role.name].shape[0])
        return self.case.batch

    def feed(self, role: InputRole) -> np.ndarray:
        shape = self.shape(role)
        return np.asarray(_MAKERS[role.role](self, role, shape)).astype(role.dtype)

    # --- one maker per role ---------------------------------------------------------

    def _mask(self, role: InputRole, shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) < 2:
            return np.ones(shape)
        batch, width = shape[0], shape[-1]
        encoder = role.dims is not None and role.dims[-1].quantity == ENCODER
        padding = "right" if encoder else self.case.padding
        new = min(self.case.seqlen, width)
        lengths = [width] * batch if padding == "none" else row_lengths(batch, width, self.rng, at_least=0 if encoder else
                                                                        (new if self.case.past else 0))
        real = real_positions(lengths, width, padding)
        if not encoder:
            self.lengths[role.name] = lengths
            if self.real is None or role.name == self.plan.padding_mask:
                self.real_total, self.real = real, real[:, width - new:]
        # A 3-D [B, S, T] or 4-D [B, 1, S, T] mask hides the padded keys from every query.
        return np.broadcast_to(real.reshape(batch, *([1] * (len(shape) - 2)), width), shape)

    def _ids(self, role: InputRole, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.integers(0, role.table_rows or DEFAULT_VOCAB, size=shape)

    def _token_types(self, role: InputRole, shape: tuple[int, ...]) -> np.ndarray:
        types = np.zeros(shape)
        if role.table_rows == 2 and len(shape) == 2:
            types[:, shape[1] // 2:] = 1  # sentence A, then sentence B
        return types

    def _positions(self, role: InputRole, shape: tuple[int, ...]) -> np.ndarray:
        """Each real token's place among the real tokens of its row (cached ones too), as
        generation counts them; padded positions hold 1, as transformers fills them."""
        new = shape[-1]
        if self.real_total is not None and len(shape) == 2 and shape[0] == self.real_total.shape[0]:
            counted = np.cumsum(self.real_total, axis=-1) - 1
            positions = np.where(self.real_total, counted, 1)[:, -new:]
        else:
            positions = np.arange(self.case.past, self.case.past + new)
        return np.broadcast_to(positions, shape)

    def _cache_flag(self, role: InputRole, shape: tuple[int, ...]) -> np.ndarray:
        return np.full(shape, self.case.past > 0)

    def _normal(self, role: InputRole, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.standard_normal(shape)

    def _zeros(self, role: InputRole, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape)


_MAKERS = {
    MASK: _Maker._mask, IDS: _Maker._ids, TOKEN_TYPES: _Maker._token_types, POSITIONS: _Maker._positions,
    CACHE_FLAG: _Maker._cache_flag, CACHE: _Maker._normal, ENCODER_CACHE: _Maker._normal,
    ENCODER_STATES: _Maker._normal, PIXELS: _Maker._normal, FLOAT: _Maker._normal, OTHER: _Maker._zeros,
}


def row_lengths(batch: int, width: int, rng: np.random.Generator, at_least: int = 0) -> list[int]:
    """Real tokens per row of a padded batch: a full row, a row of one token, then random
    lengths between; a batch of one row is padded too. No row is shorter than `at_least`."""
    if width <= 1:
        lengths = [width] * batch
    elif batch == 1:
        lengths = [int(rng.integers(1, width))]
    else:
        low, high = (2, width) if width > 2 else (1, width + 1)
        lengths = ([width, 1] + rng.integers(low, high, size=max(batch - 2, 0)).tolist())[:batch]
    return [max(length, at_least) for length in lengths]


def real_positions(lengths: list[int], seqlen: int, padding: str) -> np.ndarray:
    columns = np.arange(seqlen)[None, :]
    lengths_ = np.asarray(lengths)[:, None]
    if padding == "left":
        return columns >= seqlen - lengths_
    return columns < lengths_
