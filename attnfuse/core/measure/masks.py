"""What an attention bias hides and adds, from its values: pure numpy, for both front-ends.

The scores are scale * q.k + bias; the bias (f(0): the scores with q.k zero) is read on
each probe run as [B|1, H|1, S, T], S queries and T keys. A score at or below MASKED hides
its key. What the bias hides from the real queries (padded query rows do not count: their
outputs are never compared) is, on every run:

    key padding   the keys the padding mask marks padded (where the padding mask is not
                  known, the keys hidden from every real query)
    causal        the keys after the query, bottom-right aligned: with a KV cache the S
                  queries are the last S of the T positions
    window        the keys more than `left` before or `right` after the query (a causal
                  window when right <= 0)

besides the key padding; anything else is an additive mask. What it adds where it hides
nothing is none, ALiBi (each head's bias a line in the key position, or in |i - j|: its slope
is the step from one key to the next) or an additive bias.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnfuse.core.outcome import BiasKind, MaskKind

# Scores pushed this low are hidden: masks add -10000 (or finfo.min, -inf), and a bias on top
# (ALiBi) may lift a hidden score by some thousands on long sequences.
MASKED = -5e3
_ZERO = 1e-6  # a bias entry this small adds nothing


@dataclass(frozen=True)
class Run:
    """One probe run: the bias and the real tokens."""

    bias: np.ndarray  # [B|1, H|1, S, T]
    queries: np.ndarray | None = None  # bool [B, S]: the real queries (None: every query counts)
    keys: np.ndarray | None = None  # bool [B, T]: the real keys (None: not known)


@dataclass(frozen=True)
class MaskReading:
    kind: MaskKind = MaskKind.NONE
    causal: bool = False
    window: tuple[int, int] = (-1, -1)  # (left, right): the keys seen around the query; (-1, 0) when causal
    bias: BiasKind = BiasKind.NONE
    alibi_slopes: tuple[float, ...] | None = None
    masks_padded_keys: bool = False  # every key the padding mask marks padded is hidden from every real query

    @property
    def key_padding_only(self) -> bool:
        """Its only mask is the padding mask: a fused op can take that mask instead of the bias."""
        return self.kind is MaskKind.KEY_PADDING and self.bias is BiasKind.NONE and self.masks_padded_keys


def read_mask(runs: Sequence[Run]) -> MaskReading:
    """What the biases of `runs` hide and add (see the module's doc)."""
    scores = [_Scores.of(run) for run in runs]
    padding = any(s.has_padding for s in scores) and all(s.hides_padding for s in scores)
    kind, causal, window = _structure([s.rest(padding) for s in scores], [s.considered(padding) for s in scores])
    if padding:
        kind = {MaskKind.NONE: MaskKind.KEY_PADDING, MaskKind.CAUSAL: MaskKind.CAUSAL_PADDING}.get(kind, kind)
    bias, slopes = _added(scores)
    masks_padded_keys = all(s.known and s.hides_padding for s in scores)
    return MaskReading(kind, causal, window, bias, slopes, masks_padded_keys)


@dataclass
class _Scores:
    """One run's bias over [B, H|1, S, T], what it hides, the real queries and the padded keys."""

    bias: np.ndarray
    hidden: np.ndarray
    rows: np.ndarray  # bool [B, 1, S, 1]: the real queries
    padded: np.ndarray  # bool [B, 1, 1, T]
    known: bool  # `padded` is the padding mask's (else the keys hidden from every real query)

    @classmethod
    def of(cls, run: Run) -> _Scores:
        batch = max([run.bias.shape[0], *(x.shape[0] for x in (run.queries, run.keys) if x is not None)])
        bias = np.broadcast_to(run.bias.astype(np.float64), (batch, *run.bias.shape[1:]))
        queries, keys = bias.shape[-2:]
        hidden = bias <= MASKED
        rows = np.ones((batch, 1, queries, 1), bool)
        if run.queries is not None and run.queries.shape == (batch, queries):
            rows = run.queries[:, None, :, None]
        known = run.keys is not None and run.keys.shape == (batch, keys)
        if known:
            padded = ~run.keys[:, None, None, :]
        else:
            padded = (hidden | ~rows).all(axis=(1, 2), keepdims=True) & rows.any(axis=(1, 2), keepdims=True)
        return cls(bias, hidden, rows, padded, known)

    @property
    def has_padding(self) -> bool:
        return bool((self.padded & self.rows).any())

    @property
    def hides_padding(self) -> bool:
        """Every padded key is hidden from every real query."""
        return bool(np.all(self.hidden | ~(self.padded & self.rows)))

    def considered(self, padding: bool) -> np.ndarray:
        """The scores the mask's structure is read on: real queries, and unpadded keys when it hides padding."""
        return np.broadcast_to(self.rows & ~self.padded if padding else self.rows, self.hidden.shape)

    def rest(self, padding: bool) -> np.ndarray:
        return self.hidden & self.considered(padding)


def _structure(rests: list[np.ndarray], considered: list[np.ndarray]) -> tuple[MaskKind, bool, tuple[int, int]]:
    """(kind, causal, window) of what is hidden besides the padding, the same on every run."""
    def fits(left: int, right: int) -> bool:
        return all(np.array_equal(rest, _outside(rest.shape, left, right) & seen)
                   for rest, seen in zip(rests, considered))

    if not any(rest.any() for rest in rests):
        return MaskKind.NONE, False, (-1, -1)
    if fits(-1, 0):
        return MaskKind.CAUSAL, True, (-1, 0)
    left, right = _reach(rests, considered)
    if fits(left, right):
        return MaskKind.WINDOW, right <= 0, (left, right)
    return MaskKind.ADDITIVE, False, (-1, -1)


def _distance(shape: tuple[int, ...]) -> np.ndarray:
    """i - j for each score, the S queries being the last S of the T key positions."""
    queries, keys = shape[-2:]
    return np.broadcast_to((np.arange(queries)[:, None] + keys - queries) - np.arange(keys)[None, :], shape)


def _outside(shape: tuple[int, ...], left: int, right: int) -> np.ndarray:
    """The keys more than `left` before the query (-1: no limit) or more than `right` after it."""
    distance = _distance(shape)
    return (-distance > right) | (distance > left) if left >= 0 else -distance > right


def _reach(rests: list[np.ndarray], considered: list[np.ndarray]) -> tuple[int, int]:
    """How far before and after the query the keys it sees reach, over every run."""
    left = right = 0
    for rest, seen in zip(rests, considered):
        visible = seen & ~rest
        if visible.any():
            distance = _distance(rest.shape)[visible]
            left, right = max(left, int(distance.max())), max(right, int(-distance.min()))
    return left, right


def _added(scores: list[_Scores]) -> tuple[BiasKind, tuple[float, ...] | None]:
    """What the bias adds to the scores it does not hide, for the real queries: none, ALiBi (and its
    slopes per head) or additive."""
    added = [np.where(s.hidden | ~s.rows, np.nan, s.bias) for s in scores]
    if all(np.nanmax(np.abs(a), initial=0.0) <= _ZERO for a in added):
        return BiasKind.NONE, None
    heads = {a.shape[1] for a in added}
    steps = [np.abs(np.concatenate([np.diff(a, axis=-1)[:, h].reshape(-1) for a in added])) for h in range(min(heads))]
    steps = [s[~np.isnan(s)] for s in steps]
    if len(heads) == 1 and all(s.size for s in steps) \
            and all(np.allclose(s, s.mean(), rtol=1e-3, atol=1e-5) for s in steps):
        return BiasKind.ALIBI, tuple(float(np.median(s)) for s in steps)
    return BiasKind.ADDITIVE, None
