"""Realistic inputs for the decoder zoo: left-padded prompts, decode steps over a cache, the real positions.

A batch follows what `generate` feeds a deployed decoder: prompts left padded (rows of
different lengths, one of a single token), the attention mask covering past and new tokens,
position ids counting real tokens (cumsum(mask) - 1, clipped at 0), past k/v in
[batch, kv_heads, past, head_dim]. Seq2seq decoders read a right-padded encoder output.
Tensors are made for the names of a signature, so one function serves every file.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from attnfuse.models.decoders.families import VOCAB
from attnfuse.models.decoders.wrappers import Signature


@dataclasses.dataclass(frozen=True)
class Step:
    """One call of a decoder: `new` tokens per row after `past` cached ones.

    `lengths[i]` is row i's real tokens among the past + new (left padded; at least `new` once a
    past exists). Seq2seq decoders take no padding: their rows are all real, and
    `encoder_lengths[i]` is row i's real encoder positions (right padded)."""

    new: int
    lengths: tuple[int, ...]
    past: int = 0
    encoder_lengths: tuple[int, ...] = ()

    @property
    def batch(self) -> int:
        return len(self.lengths)


# The examples the exports trace: every dim >= 2 and different from the others, padding in every
# mask (a traced graph must keep the mask), so no size is specialised.
EXPORT_STEPS = {False: Step(new=6, lengths=(6, 4), encoder_lengths=(7, 5)),
                True: Step(new=3, past=5, lengths=(8, 6), encoder_lengths=(7, 5))}

PREFILL = Step(new=11, lengths=(11, 6, 1, 9), encoder_lengths=(9, 4, 1, 7))
DECODES = (
    Step(new=1, past=0, lengths=(1, 1, 1), encoder_lengths=(5, 2, 4)),  # a first step of one token
    Step(new=1, past=5, lengths=(6, 3, 2), encoder_lengths=(5, 2, 4)),
    Step(new=1, past=12, lengths=(13, 9, 2, 13), encoder_lengths=(9, 4, 1, 7)),
    Step(new=3, past=6, lengths=(9, 4, 3), encoder_lengths=(6, 6, 3)),  # several new tokens over a cache
)


def left_padded_mask(lengths: tuple[int, ...], total: int) -> torch.Tensor:
    """int64 [B, total]: row i has total - lengths[i] zeros, then lengths[i] ones."""
    return (torch.arange(total)[None, :] >= total - torch.tensor(lengths)[:, None]).long()


def right_padded_mask(lengths: tuple[int, ...], total: int) -> torch.Tensor:
    return (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens, as generate computes them for left padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def token_ids(mask: torch.Tensor, generator: torch.Generator, pad: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """Random ids clear of the special ids (0-2); padded positions hold the pad id."""
    ids = torch.randint(3, vocab, mask.shape, generator=generator)
    return torch.where(mask.bool(), ids, torch.full_like(ids, pad))


def cache_geometry(config) -> tuple[int, int, int]:
    """(kv heads, head size, hidden) of a decoder's attention, whatever the family calls them."""
    heads = getattr(config, "decoder_attention_heads", None) or config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    return kv_heads, head_dim, config.hidden_size


def make(signature: Signature, config, step: Step, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for every name of `signature`, in its order."""
    generator = torch.Generator().manual_seed(seed)
    kv_heads, head_dim, hidden = cache_geometry(config)
    batch, total = step.batch, step.past + step.new
    mask = left_padded_mask(step.lengths, total)
    encoder_length = max(step.encoder_lengths, default=0)

    def cache_tensor(length: int) -> torch.Tensor:
        return torch.randn(batch, kv_heads, length, head_dim, generator=generator)

    made = {}
    for name in signature.input_names:
        if name == "input_ids":
            made[name] = token_ids(mask, generator, config.pad_token_id or 0, config.vocab_size)[:, step.past:]
        elif name == "attention_mask":
            made[name] = mask
        elif name == "position_ids":
            made[name] = positions(mask)[:, step.past:]
        elif name == "encoder_hidden_states":
            made[name] = torch.randn(batch, encoder_length, hidden, generator=generator)
        elif name == "encoder_attention_mask":
            made[name] = right_padded_mask(step.encoder_lengths, encoder_length)
        elif name.startswith("past_key_values."):
            made[name] = cache_tensor(encoder_length if ".encoder." in name else step.past)
        else:
            raise ValueError(f"no input generator for {name!r}")
    return made


def real_positions(name: str, feeds: dict[str, np.ndarray], output: np.ndarray) -> np.ndarray:
    """A boolean array, broadcastable to `output`, of the entries that real tokens compute
    (padded rows are free to hold anything, an optimized model's zeros for instance)."""
    mask = feeds.get("attention_mask")
    encoder_mask = feeds.get("encoder_attention_mask")
    if name in ("logits", "last_hidden_state"):
        if mask is None:  # seq2seq decoders have no padding
            return np.ones(output.shape[:2] + (1,), dtype=bool)
        return mask[:, -output.shape[1]:, None].astype(bool)
    if ".encoder." in name:
        chosen = encoder_mask if encoder_mask is not None else np.ones(output.shape[::2], dtype=np.int64)
    elif ".decoder." in name:
        chosen = np.ones(output.shape[::2], dtype=np.int64)
    else:
        chosen = mask
    return chosen[:, None, :, None].astype(bool)
