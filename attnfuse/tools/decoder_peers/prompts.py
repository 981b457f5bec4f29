"""The benchmark's prompts in each runtime's layout, and their logits back in one layout to compare.

torch and the ONNX contenders take a left-padded batch (input_ids, attention_mask); genai takes
padding only at the end of a row (right padded with the pad id); CTranslate2 takes one list of ids
per row, unpadded. Logits are compared over the real tokens only, packed row after row.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from attnfuse.models.decoders import inputs as decoder_inputs


@dataclasses.dataclass(frozen=True)
class Prompts:
    rows: tuple[np.ndarray, ...]  # each row's real token ids, in order
    pad: int

    @classmethod
    def from_feeds(cls, feeds: dict[str, np.ndarray], pad: int) -> Prompts:
        """The real tokens of a left-padded prompt batch (a workload without a past)."""
        mask = feeds["attention_mask"].astype(bool)
        if mask.shape != feeds["input_ids"].shape:
            raise ValueError("prompts are read from a batch without a past: its mask and ids must have one shape")
        return cls(tuple(ids[real] for ids, real in zip(feeds["input_ids"], mask)), pad)

    @classmethod
    def of_lengths(cls, lengths: tuple[int, ...], vocab: int, pad: int, seed: int = 0,
                   width: int | None = None) -> Prompts:
        """Rows of these lengths, drawn as the decoder inputs draw a step's ids over `width` positions
        (with the same seed and a decode step's past + new as width: the ids of its past and new tokens,
        whose past the ONNX contenders get as random k/v)."""
        mask = decoder_inputs.left_padded_mask(lengths, width or max(lengths))
        ids = decoder_inputs.token_ids(mask, torch.Generator().manual_seed(seed), pad, vocab)
        return cls.from_feeds({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, pad)

    @property
    def lengths(self) -> list[int]:
        return [len(row) for row in self.rows]

    @property
    def width(self) -> int:
        return max(self.lengths)

    def lists(self) -> list[list[int]]:
        return [row.tolist() for row in self.rows]

    def right_padded(self) -> np.ndarray:
        ids = np.full((len(self.rows), self.width), self.pad, dtype=np.int64)
        for i, row in enumerate(self.rows):
            ids[i, :len(row)] = row
        return ids

    def left_padded(self) -> dict[str, np.ndarray]:
        """input_ids and attention_mask, as a tokenizer with padding_side='left' writes them."""
        mask = decoder_inputs.left_padded_mask(tuple(self.lengths), self.width).numpy()
        ids = np.full(mask.shape, self.pad, dtype=np.int64)
        ids[mask.astype(bool)] = np.concatenate(self.rows)
        return {"input_ids": ids, "attention_mask": mask}


def packed(output: np.ndarray, lengths: list[int], side: str) -> np.ndarray:
    """[real tokens, ...]: each row's real positions of a [batch, width, ...] output, row after row;
    `side` says where the rows were padded ("left" or "right")."""
    width = output.shape[1]
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    rows = [row[width - n:] if side == "left" else row[:n] for row, n in zip(output, lengths)]
    return np.concatenate(rows)
