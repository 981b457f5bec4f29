"""Modules that give a decoder the flat signature of a deployment file, as Optimum's exporter writes it.

Inputs and outputs are plain tensors in a fixed order, each with a name: `input_ids`,
`attention_mask` (covering past and new tokens), `position_ids`, `past_key_values.{i}.key` /
`.value` in, `logits` and `present.{i}.key` / `.value` out; seq2seq decoders name their caches
`past_key_values.{i}.decoder.key` / `.encoder.key`. Inside, the flat tensors become the
transformers cache the model expects, so attention runs exactly as the family's own code.
"""
from __future__ import annotations

import dataclasses

import torch

from attnfuse.models.decoders.families import CAUSAL, SEQ2SEQ
from attnfuse.models.wrappers import TextModel



@dataclasses.dataclass(frozen=True)
class Dims:
    """Dimension names, as Optimum's exporter writes them: TorchScript exports carry them all;
    dynamo names the inputs' and derives the outputs' (`sequence_length + past_sequence_length`)."""

    batch: str = "batch_size"
    sequence: str = "sequence_length"
    past: str = "past_sequence_length"
    encoder: str = "encoder_sequence_length"

    @property
    def total(self) -> str:  # the attention mask and the present k/v cover the past and the new tokens
        return f"{self.past} + {self.sequence}"


CAUSAL_DIMS = Dims()
SEQ2SEQ_DIMS = Dims(sequence="decoder_sequence_length", past="past_decoder_sequence_length")


def dims_of(kind: str) -> Dims:
    return SEQ2SEQ_DIMS if kind == SEQ2SEQ else CAUSAL_DIMS


# What a file takes and returns about the cache. A seq2seq decoder has three files, as
# Optimum writes them: decoder_model without and with presents, and decoder_with_past_model.
NO_CACHE, FIRST, PAST_MODE = "none", "first", "past"


@dataclasses.dataclass(frozen=True)
class Signature:
    input_names: list[str]
    output_names: list[str]
    dynamic_dims: dict[str, dict[int, str]]  # name -> {axis: dim name}, inputs and outputs


def _per_layer(layers: int, template: str, parts: tuple[str, ...]) -> list[str]:
    return [template.format(i=i, part=part) for i in range(layers) for part in parts]


def decoder_layers(config) -> int:
    return getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) or config.num_hidden_layers


def signature(kind: str, config, cache: str) -> Signature:
    """The names and dynamic dims of a file of this kind and cache mode."""
    d = dims_of(kind)
    text, encoder = {0: d.batch, 1: d.sequence}, {0: d.batch, 1: d.encoder}
    dims = {"input_ids": text, "logits": text}
    layers = decoder_layers(config)
    if kind == CAUSAL:
        inputs, outputs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
        dims.update(attention_mask={0: d.batch, 1: d.total if cache == PAST_MODE else d.sequence}, position_ids=text)
        if cache == PAST_MODE:
            past = _per_layer(layers, "past_key_values.{i}.{part}", ("key", "value"))
            present = _per_layer(layers, "present.{i}.{part}", ("key", "value"))
            inputs, outputs = inputs + past, outputs + present
            dims.update({name: {0: d.batch, 2: d.past} for name in past})
            dims.update({name: {0: d.batch, 2: d.total} for name in present})
        return Signature(inputs, outputs, dims)
    if kind == SEQ2SEQ:
        encoder_mask = ["encoder_attention_mask"] if config.model_type == "t5" else []  # Whisper's decoder takes none
        inputs = ["input_ids"] + ([] if cache == PAST_MODE else ["encoder_hidden_states"]) + encoder_mask
        outputs = ["logits"]
        dims.update(encoder_hidden_states=encoder, encoder_attention_mask=encoder)
        self_present = _per_layer(layers, "present.{i}.decoder.{part}", ("key", "value"))
        cross_present = _per_layer(layers, "present.{i}.encoder.{part}", ("key", "value"))
        if cache == FIRST:
            outputs += self_present + cross_present
            dims.update({name: {0: d.batch, 2: d.sequence} for name in self_present})
            dims.update({name: {0: d.batch, 2: d.encoder} for name in cross_present})
        elif cache == PAST_MODE:
            past = _per_layer(layers, "past_key_values.{i}.{part}",
                              ("decoder.key", "decoder.value", "encoder.key", "encoder.value"))
            inputs, outputs = inputs + past, outputs + self_present
            dims.update({name: {0: d.batch, 2: d.encoder if ".encoder." in name else d.past} for name in past})
            dims.update({name: {0: d.batch, 2: d.total} for name in self_present})
        return Signature(inputs, outputs, dims)
    return Signature(["input_ids", "attention_mask"], ["last_hidden_state"],
                     {"input_ids": text, "attention_mask": text, "last_hidden_state": text})


def _flatten(cache) -> list[torch.Tensor]:
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]


class CausalLM(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids[, past k/v ...]) -> (logits[, present k/v ...])."""

    def __init__(self, model: torch.nn.Module, cache: str):
        super().__init__()
        self.model, self.with_cache = model, cache == PAST_MODE
        self.signature = signature(CAUSAL, model.config, cache)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache([past[i:i + 2] for i in range(0, len(past), 2)]) if self.with_cache else None
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=self.with_cache)
        return (out.logits, *_flatten(out.cache)) if self.with_cache else out.logits


class Seq2SeqDecoder(torch.nn.Module):
    """The decoder half of an encoder-decoder model with its LM head, reading the encoder's output.

    "none":  (input_ids, encoder_hidden_states[, encoder_attention_mask]) -> logits
    "first": the same inputs -> (logits, present.{i}.decoder.key/value..., present.{i}.encoder.key/value...)
    "past":  (input_ids[, encoder_attention_mask], per layer past_key_values.{i}.decoder.key/value and
              .encoder.key/value) -> (logits, present.{i}.decoder.key/value...)

    With a past, cross-attention reads its k/v from the inputs in [B, H, encoder_sequence, D], and
    self-attention concatenates the past with the new k/v.
    """

    def __init__(self, model: torch.nn.Module, cache: str):
        super().__init__()
        self.model, self.mode = model, cache
        self.signature = signature(SEQ2SEQ, model.config, cache)
        self.encoder_mask = "encoder_attention_mask" in self.signature.input_names

    def forward(self, input_ids, *rest):
        from transformers import DynamicCache, EncoderDecoderCache

        rest = list(rest)
        hidden = None if self.mode == PAST_MODE else rest.pop(0)
        encoder_mask = rest.pop(0) if self.encoder_mask else None
        cache = None
        if self.mode == FIRST:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        elif self.mode == PAST_MODE:
            layers = [rest[i:i + 4] for i in range(0, len(rest), 4)]
            cache = EncoderDecoderCache(DynamicCache([(dk, dv) for dk, dv, _, _ in layers]),
                                        DynamicCache([(ek, ev) for _, _, ek, ev in layers]))
            # Cross-attention reads the cached encoder k/v; the encoder's output only lends its shape.
            encoder_key = layers[0][2]
            hidden = encoder_key.new_zeros(encoder_key.shape[0], encoder_key.shape[2], self.model.config.d_model)
        out = self.model(encoder_outputs=(hidden,), attention_mask=encoder_mask, decoder_input_ids=input_ids,
                         cache=cache, use_cache=cache is not None)
        if cache is None:
            return out.logits
        present = _flatten(out.cache.self_attention_cache)
        if self.mode == FIRST:
            present += _flatten(out.cache.cross_attention_cache)
        return (out.logits, *present)


class Encoder(TextModel):
    """forward(input_ids, attention_mask) -> last_hidden_state (ModernBERT: no cache, no position ids)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.signature = signature("encoder", model.config, NO_CACHE)


def wrap(kind: str, model: torch.nn.Module, cache: str) -> torch.nn.Module:
    """The flat-signature module for a model of this kind and cache mode."""
    if kind == CAUSAL:
        return CausalLM(model, cache)
    if kind == SEQ2SEQ:
        return Seq2SeqDecoder(model, cache)
    return Encoder(model)
