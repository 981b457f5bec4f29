"""Check inputs generated from a graph's input names and types.

A model is checked on inputs that look like real ones: token ids inside the
vocabulary, attention masks with real padding (rows of different lengths), pixel
values for image models. Static dims in the graph win over the requested
batch size and sequence length.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

DEFAULT_VOCAB = 100
IMAGE_DIMS = (3, 32, 32)  # channels, height, width of a rank-4 float input
# Ops that carry token ids unchanged in meaning on their way to the embedding Gather.
_ID_CARRIERS = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})


@dataclass
class CheckInputs:
    feeds: dict[str, np.ndarray]
    real: np.ndarray | None = None  # bool [B, S]: True at real (not padded) tokens
    lengths: dict[str, list[int]] = field(default_factory=dict)  # mask name -> real tokens per row
    padding: str = "right"

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


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """The inputs a caller feeds (old models also list their initializers as inputs)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def make_inputs(model: ir.Model, batch: int, seqlen: int, seed: int, padding: str = "right") -> CheckInputs:
    if padding not in ("right", "left", "none"):
        raise ValueError(f"padding must be 'right', 'left' or 'none', not {padding!r}")
    maker = _InputMaker(batch, seqlen, np.random.default_rng(seed), padding)
    values = graph_inputs(model)
    # Token inputs first, so that the dims they share with others are bound to batch and seqlen.
    values.sort(key=lambda v: _kind(v) not in ("mask", "ids"))
    for value in values:
        maker.add(value)
    order = [v.name for v in graph_inputs(model)]
    return CheckInputs(
        feeds={name: maker.feeds[name] for name in order},
        real=maker.real,
        lengths=maker.lengths,
        padding=padding,
    )


def _kind(value: ir.Value) -> str:
    name = value.name.lower()
    dtype = value.dtype
    is_float = dtype is not None and dtype.is_floating_point()
    if "mask" in name:
        return "mask"
    if "token_type" in name:
        return "token_types"
    if "position_ids" in name:
        return "positions"
    if is_float and ("pixel" in name or _rank(value) == 4):
        return "pixels"
    if "ids" in name and not is_float:
        return "ids"
    return "float" if is_float else "other"


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else value.shape.rank()


class _InputMaker:
    """Makes one feed per graph input, sharing the values of named dynamic dims."""

    def __init__(self, batch: int, seqlen: int, rng: np.random.Generator, padding: str):
        self.batch, self.seqlen, self.rng, self.padding = batch, seqlen, rng, padding
        self.bound: dict[str, int] = {}  # symbolic dim name -> size
        self.feeds: dict[str, np.ndarray] = {}
        self.lengths: dict[str, list[int]] = {}
        self.real: np.ndarray | None = None

    def add(self, value: ir.Value) -> None:
        kind = _kind(value)
        shape = self._shape(value, kind)
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        self.feeds[value.name] = self._makers[kind](self, value, shape).astype(dtype)

    def _shape(self, value: ir.Value, kind: str) -> tuple[int, ...]:
        defaults = (self.batch, *IMAGE_DIMS) if kind == "pixels" else (self.batch, self.seqlen)
        if value.shape is None:
            return defaults
        dims = []
        for axis, dim in enumerate(value.shape.dims):
            if isinstance(dim, int):
                dims.append(dim)
                continue
            size = self.bound.get(dim.value) or defaults[min(axis, len(defaults) - 1)]
            if dim.value is not None:
                self.bound[dim.value] = size
            dims.append(size)
        return tuple(dims)

    def _mask(self, value: ir.Value, shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) != 2:  # an already expanded mask: let everything through
            return np.ones(shape)
        lengths = [shape[1]] * shape[0] if self.padding == "none" else row_lengths(*shape, self.rng)
        real = real_positions(lengths, shape[1], self.padding)
        self.lengths[value.name] = lengths
        if self.real is None or value.name == "attention_mask":
            self.real = real
        return real

    def _ids(self, value: ir.Value, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.integers(0, table_rows(value) or DEFAULT_VOCAB, size=shape)

    def _token_types(self, value: ir.Value, shape: tuple[int, ...]) -> np.ndarray:
        types = np.zeros(shape)
        if table_rows(value) == 2 and len(shape) == 2:
            types[:, shape[1] // 2 :] = 1  # sentence A, then sentence B
        return types

    def _positions(self, value: ir.Value, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(np.arange(shape[-1]), shape)

    def _pixels(self, value: ir.Value, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.standard_normal(shape)

    def _zeros(self, value: ir.Value, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape)

    _makers: dict[str, Callable[..., np.ndarray]] = {
        "mask": _mask,
        "ids": _ids,
        "token_types": _token_types,
        "positions": _positions,
        "pixels": _pixels,
        "float": _pixels,
        "other": _zeros,
    }


def row_lengths(batch: int, seqlen: int, rng: np.random.Generator) -> list[int]:
    """A full row, a row of one token, then random lengths strictly between when there is room."""
    low, high = (2, seqlen) if seqlen > 2 else (1, seqlen + 1)
    lengths = [seqlen, 1] + rng.integers(low, high, size=max(batch - 2, 0)).tolist()
    return lengths[:batch]


def real_positions(lengths: list[int], seqlen: int, padding: str) -> np.ndarray:
    columns = np.arange(seqlen)[None, :]
    lengths_ = np.asarray(lengths)[:, None]
    if padding == "left":
        return columns >= seqlen - lengths_
    return columns < lengths_


def table_rows(value: ir.Value) -> int | None:
    """Rows of the embedding table that `value` indexes (the first dim of a Gather's data),
    looking through casts and reshapes; None when no Gather with a static table is found."""
    frontier = [value]
    for _ in range(len(_ID_CARRIERS) + 1):
        following = []
        for v in frontier:
            for node, index in v.uses():
                if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and index == 1:
                    rows = _static_first_dim(node.inputs[0])
                    if rows is not None:
                        return rows
                elif node.op_type in _ID_CARRIERS and index == 0:
                    following.extend(node.outputs)
        frontier = following
    return None


def _static_first_dim(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    shape = value.shape if value.shape is not None else getattr(value.const_value, "shape", None)
    if shape is None or shape.rank() == 0 or not isinstance(shape[0], int):
        return None
    return shape[0]
