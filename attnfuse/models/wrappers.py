"""Thin modules that give a transformers model a plain tensor signature.

transformers 5.x models trace badly when called positionally (arguments land on the
wrong keyword), so each wrapper passes its inputs by name and returns one tensor.
"""
from __future__ import annotations

import torch


class TextModel(torch.nn.Module):
    """forward(input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, model: torch.nn.Module, **call_kwargs):
        super().__init__()
        self.model = model
        self.call_kwargs = call_kwargs  # e.g. use_cache=False for decoders

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.call_kwargs).last_hidden_state


class TextModelWithTokenTypes(TextModel):
    """forward(input_ids, attention_mask, token_type_ids) -> last_hidden_state, as BERT tokenizers produce."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **self.call_kwargs
        ).last_hidden_state


class VisionModel(torch.nn.Module):
    """forward(pixel_values) -> last_hidden_state."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state
