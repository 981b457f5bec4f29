"""What the rules measure with: the values a graph computes on the probe's runs, and its regions
evaluated on chosen points.

Both front-ends probe the original model on check inputs of different batch sizes,
lengths and data (a run each). A `View` answers, for any value of the graph, what it
was on each run; a value equal on every run is a constant of the graph (shape
arithmetic folds that way, without parsing it). `evaluate` runs a set of nodes on
their own, fed with chosen arrays for some values and with a run's values for the
rest: ONNX Runtime evaluates an ONNX region (one session per region, reused across
runs), torch evaluates an fx region. Every measurement in core/measure is written
over the numpy arrays a View returns, so it is written once for both front-ends.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from attnfuse.core.graph import Node, Value


class View(Protocol):
    @property
    def run_count(self) -> int:
        """How many probe runs there are."""

    def value(self, x: Value, run: int | None = None) -> np.ndarray | None:
        """x's value on `run` (None: on the first run that computed it); None if no run did."""

    def runs(self, *values: Value) -> list[int]:
        """The runs that computed every one of `values` (inside an If branch: those taking it).
        NoMatch if none did."""

    def constant(self, x: Value) -> np.ndarray | None:
        """x's value if it does not depend on the inputs (a weight, a number, or equal on every
        run that computed it), else None."""

    def evaluate(self, nodes: Sequence[Node], outputs: Sequence[Value], feeds: Mapping[Value, np.ndarray],
                 run: int) -> list[np.ndarray]:
        """`nodes` run alone: what they read is taken from `feeds` where given, else from run
        `run`. NoMatch if the runtime refuses them."""

    def real(self, run: int) -> np.ndarray | None:
        """bool [batch, new tokens]: the real (unpadded) tokens of the run; None without a mask."""

    def real_total(self, run: int) -> np.ndarray | None:
        """bool [batch, cached + new tokens]: the mask over a KV cache and the new tokens; None
        without a cache."""

    def batch(self, run: int) -> int:
        """The run's batch size."""

    def committed(self, replacement) -> None:
        """A proven rewrite went into the graph: its values now read as the originals they replace."""


def dtype_of(view: View, x: Value) -> np.dtype:
    """The dtype seen for x (float32 when no run saw it)."""
    seen = view.value(x)
    return seen.dtype if seen is not None else np.dtype(np.float32)


def scalar(view: View, x: Value) -> float | None:
    """x as a number, if it is a constant of one element."""
    array = view.constant(x)
    return float(array.reshape(())) if array is not None and array.size == 1 else None
