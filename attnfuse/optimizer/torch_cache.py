"""KV caches in attnfuse.optimize: capturing decoders that take or return one.

A transformers decoder called with use_cache=True returns a `DynamicCache`, and a
decode step takes one (past_key_values): objects, not tensors. torch.export handles
them once they are pytree nodes, which transformers' own exporter registers. A cache
is then a tree of [batch, kv_heads, past, head_size] tensors; check inputs get caches
of the same tree with other batch sizes and past lengths, and compare the present
k/v a model returns at the real (unpadded) positions of the mask only.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree


def register_caches(model: torch.nn.Module) -> None:
    """Make transformers' cache classes pytree nodes (as its exporter does), when transformers is in use."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:  # an older transformers: capture then says what it cannot flatten
        return
    register_cache_pytrees_for_model(model)


def is_cache(value: Any) -> bool:
    """A container (not a tensor) of [batch, heads, length, head_size] tensors: a KV cache."""
    if isinstance(value, torch.Tensor) or value is None:
        return False
    leaves = [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
    return bool(leaves) and all(x.dim() == 4 for x in leaves)


def past_length(cache: Any) -> int:
    return _tensors(cache)[0].shape[2]


def cache_like(cache: Any, batch: int, past: int, generator: torch.Generator) -> Any:
    """A cache of the same tree as `cache`, `batch` rows of `past` positions of random values."""
    leaves, spec = pytree.tree_flatten(cache)
    made = [
        torch.randn(batch, x.shape[1], past, x.shape[3], generator=generator, dtype=x.dtype).to(x.device)
        if isinstance(x, torch.Tensor) else x for x in leaves
    ]
    return pytree.tree_unflatten(made, spec)


def as_captured(example: Any) -> Callable[[Any], Any]:
    """A function giving a cache the tree the module was captured with. transformers' caches carry
    bookkeeping in their tree (how they were made) that does not change what they hold; a cache
    made another way would not match the captured tree."""
    spec = pytree.tree_flatten(example)[1]

    def rebuild(cache: Any) -> Any:
        leaves = pytree.tree_leaves(cache)
        return pytree.tree_unflatten(leaves, spec) if len(leaves) == spec.num_leaves else cache

    return rebuild


def dynamic_shapes(cache: Any) -> list[dict[int, Any]]:
    """Batch and past length dynamic, for every tensor of the cache (torch.export's form for a pytree node)."""
    auto = torch.export.Dim.AUTO
    return [{0: auto, 2: auto} if isinstance(x, torch.Tensor) else None for x in pytree.tree_leaves(cache)]


def unsupported(name: str, value: Any) -> str | None:
    """Why a cache input cannot be captured, or None. A cache whose layers keep state besides their
    k/v tensors (a sliding-window layer counts the tokens it has seen) would be captured for that
    state only."""
    if not type(value).__name__.endswith("Cache") or is_cache(value):
        return None
    return (f"{name}: {type(value).__name__} keeps state besides its [batch, heads, length, head_size] tensors "
            "(sliding-window layers, as transformers makes for models with a sliding window); "
            "pass a DynamicCache() made without the model's config")


def real_values(leaf: torch.Tensor, real: torch.Tensor | None, new_tokens: int | None) -> torch.Tensor:
    """The entries of an output at real positions: [B, S, ...] outputs at the new tokens' real
    positions (the mask's last S with a cache), [B, heads, L, D] present k/v at the mask's last L
    (all of them, or those a sliding window keeps)."""
    if real is None or leaf.dim() < 2 or leaf.shape[0] != real.shape[0]:
        return leaf
    tokens = real[:, -new_tokens:] if new_tokens else real
    if leaf.shape[1] == tokens.shape[1]:
        return leaf[tokens]
    if leaf.dim() == 4 and leaf.shape[2] <= real.shape[1]:
        return leaf.transpose(1, 2)[real[:, real.shape[1] - leaf.shape[2]:]]
    return leaf


def _tensors(cache: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(cache) if isinstance(x, torch.Tensor)]
