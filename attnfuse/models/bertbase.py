"""A BERT-base-sized encoder with random weights, for benchmarks: hidden 768, 12 heads,
intermediate 3072, only 4 layers and an 8192-token vocabulary so that exports stay light.

Nothing is downloaded. The layers are BERT-base's own, so time per layer is BERT-base's.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
import torch

from attnfuse.models import _export, wrappers
from attnfuse.models.zoo import randomise_vectors

WEIGHTS_VERSION = "w1"  # part of the cache key: bump it when load_torch changes the weights
CONFIG = dict(
    vocab_size=8192, hidden_size=768, num_hidden_layers=4, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=512,
)
_TEXT_DIMS = {0: "batch", 1: "sequence"}


def load_torch(attention: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """forward(input_ids, attention_mask, token_type_ids) -> last_hidden_state; eval mode, fp32.
    Named as minilm.load_torch, so that benchmarks take either module."""
    from transformers import BertConfig, BertModel

    config = BertConfig(**CONFIG)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False)
    randomise_vectors(model)  # biases and layernorm weights too, so a fusion that drops one shows
    return wrappers.TextModelWithTokenTypes(model).float().eval()


def padded_batch(batch: int = 16, max_length: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids (never the pad id 0), lengths uniform in [8, max_length], right padded to the longest row."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min(8, max_length), max_length + 1, size=batch)
    mask = (np.arange(lengths.max())[None, :] < lengths[:, None]).astype(np.int64)
    input_ids = rng.integers(1, CONFIG["vocab_size"], size=mask.shape) * mask
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}


def export_onnx(path: str | os.PathLike, dynamo: bool = True, attention: str = "sdpa") -> pathlib.Path:
    """Export with dynamic batch and sequence, traced on a batch whose rows differ in length."""
    example = padded_batch(batch=2, max_length=16, seed=1)
    inputs = {name: torch.from_numpy(array) for name, array in example.items()}
    dims = {name: _TEXT_DIMS for name in (*inputs, "last_hidden_state")}
    return _export.export_onnx(load_torch(attention), inputs, path, dynamo=dynamo, dynamic_dims=dims)


def exported(dynamo: bool = True, attention: str = "sdpa", cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cached export (see attnfuse.models.zoo.exported for the cache rules)."""
    name = f"bertbase-{'dynamo' if dynamo else 'torchscript'}-{attention}-{WEIGHTS_VERSION}"
    return _export.cached(name, lambda tmp: export_onnx(tmp, dynamo, attention), cache_dir)
