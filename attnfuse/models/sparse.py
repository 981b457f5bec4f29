"""Example models for sparse attention, built from code with seeded random weights.

One encoder block, written plainly as real models write attention (q/k/v Linear,
head split, q @ k^T * scale + bias, softmax, @ v, merge), configured three ways:
- `banded_encoder`: key padding plus a band |i - j| <= window (exact windowed attention);
- `causal_window_decoder`: causal attention over the last `window` tokens (Mistral's sliding window);
- `alibi_encoder`: no position embeddings, an ALiBi bias -slope[h] * |i - j|;
- `long_encoder`: a dense encoder for long contexts (positions up to 16K), the
  benchmark model for windowed and linear attention.
"""
from __future__ import annotations

import math
import os
import pathlib

import torch
from torch import nn

from attnfuse.kernels.reference import alibi_slopes
from attnfuse.models import _export
from attnfuse.models.zoo import randomise_vectors


class Block(nn.Module):
    """Post-layernorm encoder block; `bias(scores_shape)` is added to the scores."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_size = heads, hidden // heads
        self.q, self.k, self.v, self.out = (nn.Linear(hidden, hidden) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.heads, self.head_size).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(self.head_size)) + bias
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        x = self.norm1(x + self.out(context))
        return self.norm2(x + self.mlp(x))


class Encoder(nn.Module):
    """Token (+ learned position) embeddings, `layers` blocks, and one additive bias
    made from the mask: key padding, and optionally a band or ALiBi."""

    def __init__(self, hidden=64, heads=4, layers=2, vocab=128, max_positions=512, window=0, alibi=False,
                 causal=False):
        super().__init__()
        self.window, self.heads, self.causal = window, heads, causal
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = None if alibi else nn.Embedding(max_positions, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.register_buffer("slopes", alibi_slopes(heads) if alibi else torch.zeros(0), persistent=False)

    def bias(self, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = attention_mask.shape[1]
        lowest = torch.finfo(torch.float32).min
        bias = (1.0 - attention_mask[:, None, None, :].float()) * lowest  # [B, 1, 1, S]: padded keys
        position = torch.arange(seq, device=attention_mask.device)
        distance = (position[:, None] - position[None, :]).abs()
        if self.window:
            bias = bias.masked_fill(distance > self.window, lowest)  # [B, 1, S, S]: the band
        if self.causal:
            bias = bias.masked_fill(position[None, :] > position[:, None], lowest)
        if self.slopes.numel():
            bias = bias - self.slopes[None, :, None, None] * distance.float()  # [B, H, S, S]: ALiBi
        return bias

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(input_ids)
        if self.positions is not None:
            x = x + self.positions(torch.arange(input_ids.shape[1], device=input_ids.device))[None]
        bias = self.bias(attention_mask)
        for block in self.blocks:
            x = block(x, bias)
        return x


def _build(seed: int, **config) -> Encoder:
    torch.manual_seed(seed)
    model = Encoder(**config)
    randomise_vectors(model)
    return model.eval()


def banded_encoder(hidden=64, heads=4, layers=2, window=4, vocab=128, seed=0) -> Encoder:
    return _build(seed, hidden=hidden, heads=heads, layers=layers, vocab=vocab, window=window)


def causal_window_decoder(hidden=64, heads=4, layers=2, window=4, vocab=128, seed=0) -> Encoder:
    """Causal attention over the last `window` tokens, as Mistral's sliding window."""
    return _build(seed, hidden=hidden, heads=heads, layers=layers, vocab=vocab, window=window, causal=True)


def alibi_encoder(hidden=64, heads=4, layers=2, vocab=128, seed=0) -> Encoder:
    return _build(seed, hidden=hidden, heads=heads, layers=layers, vocab=vocab, alibi=True)


def long_encoder(hidden=128, heads=2, layers=1, vocab=256, max_positions=16384, seed=0) -> Encoder:
    return _build(seed, hidden=hidden, heads=heads, layers=layers, vocab=vocab, max_positions=max_positions)


SPARSE_MODELS = {"banded_encoder": banded_encoder, "causal_window_decoder": causal_window_decoder,
                 "alibi_encoder": alibi_encoder, "long_encoder": long_encoder}


def example_inputs(batch=2, seqlen=16, seed=0, lengths=None, vocab=128) -> dict[str, torch.Tensor]:
    """Right-padded ids and mask; row lengths from `seqlen` down to 1 unless given."""
    generator = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = [seqlen - round(i * (seqlen - 1) / max(batch - 1, 1)) for i in range(batch)]
    mask = (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": torch.randint(1, vocab, (batch, seqlen), generator=generator), "attention_mask": mask}


def exported(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The named model exported (dynamo) with dynamic batch and sequence, cached."""
    text = {0: "batch", 1: "sequence"}
    dims = {"input_ids": text, "attention_mask": text, "last_hidden_state": text}
    build = lambda path: _export.export_onnx(  # noqa: E731
        SPARSE_MODELS[name](), example_inputs(2, 16), path, dynamo=True, dynamic_dims=dims)
    return _export.cached(f"sparse-{name}", build, cache_dir)
