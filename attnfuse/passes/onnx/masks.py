"""Say what an attention bias is, from its values: key padding, causal, window, ALiBi."""
from __future__ import annotations

import numpy as np

from attnfuse.passes import site as kinds

# Scores pushed this low are masked out: masks add -10000 (or finfo.min, -inf), and a bias on top
# (ALiBi) may lift a masked score by some thousands on long sequences.
MASKED = -5e3


def describe(bias: np.ndarray | None, site) -> None:
    """Fill site.mask, site.causal, site.bias and site.window from a [b, h, S, T] bias."""
    if bias is None:
        site.mask, site.causal, site.bias = kinds.MASK_NONE, False, kinds.BIAS_NONE
        return
    masked = bias <= MASKED
    site.mask, site.causal, site.window = _mask_kind(masked)
    site.bias = _bias_kind(np.where(masked, 0.0, bias), masked)


def _mask_kind(masked: np.ndarray) -> tuple[str, bool, tuple[int, int]]:
    seq_q, seq_k = masked.shape[-2:]
    if not masked.any():
        return kinds.MASK_NONE, False, (-1, -1)
    # Columns masked in every row are padded keys.
    padded_keys = masked.all(axis=-2, keepdims=True)
    rest = masked & ~padded_keys
    i = np.arange(seq_q)[:, None] + (seq_k - seq_q)
    j = np.arange(seq_k)[None, :]
    if not rest.any():
        return kinds.MASK_KEY_PADDING, False, (-1, -1)
    future = j > i
    if np.array_equal(rest, np.broadcast_to(future, rest.shape) & ~padded_keys):
        kind = kinds.MASK_CAUSAL_PADDING if padded_keys.any() else kinds.MASK_CAUSAL
        return kind, True, (-1, 0)
    distance = (i - j)[None, None]
    seen = ~rest & ~padded_keys
    left = int(np.where(seen, distance, -np.inf).max())
    right = int(np.where(seen, -distance, -np.inf).max())
    band = (distance > left) | (-distance > right)
    if np.array_equal(rest, np.broadcast_to(band, rest.shape) & ~padded_keys):
        return kinds.MASK_WINDOW, right <= 0, (left, right)
    return kinds.MASK_ADDITIVE, False, (-1, -1)


def _bias_kind(values: np.ndarray, masked: np.ndarray) -> str:
    if not np.any(values):
        return kinds.BIAS_NONE
    # ALiBi: each head's bias is linear in the key position (up to a per-row
    # constant, which softmax ignores) or in |i - j|.
    steps = np.diff(values, axis=-1)
    both = ~masked[..., 1:] & ~masked[..., :-1]
    per_head = []
    for h in range(values.shape[1]):
        s = steps[:, h][both[:, h] if both.shape[1] > 1 else both[:, 0]]
        per_head.append(s)
    linear = all(s.size == 0 or np.allclose(np.abs(s), np.abs(s).mean(), rtol=1e-3, atol=1e-5) for s in per_head)
    return kinds.BIAS_ALIBI if linear else kinds.BIAS_ADDITIVE


def masks_padded_keys(bias: np.ndarray | None, real: np.ndarray | None) -> bool:
    """Does the bias mask, for every row, each key the input mask marks as padding?"""
    if bias is None or real is None or bias.shape[0] != real.shape[0] or bias.shape[-1] != real.shape[1]:
        return False
    padded = (bias <= MASKED).all(axis=(1, 2))  # [batch, keys]
    return bool(np.all(padded[~real]))


def alibi_slopes(bias: np.ndarray) -> list[float]:
    """Per-head slope of an ALiBi bias: its step from one key to the next, on unmasked pairs."""
    masked = bias <= MASKED
    steps = np.diff(np.where(masked, np.nan, bias), axis=-1)
    return [float(np.nanmedian(np.abs(steps[:, h]))) for h in range(bias.shape[1])]
