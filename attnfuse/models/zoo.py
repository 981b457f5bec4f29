"""The zoo: 8 tiny transformers families x 2 exporters x 2 attention implementations.

Every model has random weights (seeded) from a transformers config, so nothing is
downloaded. They are small enough to export in seconds and run in milliseconds,
yet spell attention exactly as the real models of their family do.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import torch

from attnfuse.models import wrappers
from attnfuse.models._export import EXPORTERS, cached, export_onnx

ATTENTIONS = ("eager", "sdpa")
WEIGHTS_VERSION = "w2"  # part of the cache key: bump it when build_torch changes the weights
VOCAB = 128
MAX_POSITIONS = 64
IMAGE, PATCH, CHANNELS = 32, 8, 3

_BERT_LIKE = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=128, max_position_embeddings=MAX_POSITIONS,
)


@dataclasses.dataclass(frozen=True)
class _Family:
    kind: str  # "encoder", "decoder" or "vision"
    class_prefix: str  # transformers.<prefix>Config / <prefix>Model
    config: dict
    init_kwargs: dict = dataclasses.field(default_factory=dict)
    pad_token_id: int = 0
    has_sdpa: bool = True


_FAMILIES = {
    "bert": _Family("encoder", "Bert", _BERT_LIKE, dict(add_pooling_layer=False)),
    # RoBERTa counts positions from padding_idx + 1, so real tokens must not be its pad id (1).
    "roberta": _Family("encoder", "Roberta", dict(_BERT_LIKE, max_position_embeddings=MAX_POSITIONS + 2),
                       dict(add_pooling_layer=False), pad_token_id=1),
    "distilbert": _Family("encoder", "DistilBert", dict(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=MAX_POSITIONS)),
    "albert": _Family("encoder", "Albert", dict(_BERT_LIKE, embedding_size=32), dict(add_pooling_layer=False)),
    "electra": _Family("encoder", "Electra", dict(_BERT_LIKE, embedding_size=64)),
    "gpt2": _Family("decoder", "GPT2", dict(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=MAX_POSITIONS, use_cache=False,
        bos_token_id=0, eos_token_id=0)),  # GPT-2's defaults (50256) lie outside the tiny vocabulary
    # BLOOM's MLP width is fixed at 4 x hidden; transformers 5.23 has only its own (eager, ALiBi) attention.
    "bloom": _Family("decoder", "Bloom", dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, use_cache=False),
                     has_sdpa=False),
    "vit": _Family("vision", "ViT", dict(
        image_size=IMAGE, patch_size=PATCH, num_channels=CHANNELS, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128), dict(add_pooling_layer=False)),
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
MODEL_KIND: dict[str, str] = {name: family.kind for name, family in _FAMILIES.items()}


@dataclasses.dataclass(frozen=True)
class ZooCase:
    family: str
    exporter: str  # "dynamo" or "torchscript"
    attention: str  # "eager" or "sdpa"

    @property
    def id(self) -> str:
        return f"{self.family}-{self.exporter}-{self.attention}"

    @property
    def kind(self) -> str:
        return MODEL_KIND[self.family]


ZOO: list[ZooCase] = [
    ZooCase(family, exporter, attention) for family in FAMILIES for exporter in EXPORTERS for attention in ATTENTIONS
]


def effective_attention(family: str, attention: str) -> str:
    """The implementation the model really runs: BLOOM has no SDPA path and runs eager for both."""
    return attention if _FAMILIES[family].has_sdpa else "eager"


def build_torch(family: str, attention: str = "eager", seed: int = 0) -> torch.nn.Module:
    """The family's tiny model with random weights, wrapped to take tensors by name; eval mode, fp32."""
    import transformers

    spec = _FAMILIES[family]
    config = getattr(transformers, f"{spec.class_prefix}Config")(**spec.config)
    config._attn_implementation = effective_attention(family, attention)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{spec.class_prefix}Model")(config, **spec.init_kwargs)
    randomise_vectors(model)
    if spec.kind == "vision":
        wrapper = wrappers.VisionModel(model)
    elif spec.kind == "decoder":
        wrapper = wrappers.TextModel(model, use_cache=False)
    else:
        wrapper = wrappers.TextModel(model)
    return wrapper.float().eval()


def randomise_vectors(model: torch.nn.Module, spread: float = 0.1) -> None:
    """Biases start at 0 and layernorm weights at 1: a fusion that dropped one would go
    unnoticed. Perturb every vector parameter so that each one changes the output."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * spread)


def padding_mask(lengths: list[int], seqlen: int) -> torch.Tensor:
    """int64 [B, S] mask, right padded: row i has lengths[i] ones then zeros."""
    return (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()


def example_inputs(
    family: str, batch: int = 2, seqlen: int = 8, seed: int = 0, lengths: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Inputs by name. Text rows are right padded, lengths spread from `seqlen` down to 1 unless given."""
    generator = torch.Generator().manual_seed(seed)
    spec = _FAMILIES[family]
    if spec.kind == "vision":
        return {"pixel_values": torch.randn(batch, CHANNELS, IMAGE, IMAGE, generator=generator)}
    if lengths is None:
        lengths = [seqlen - round(i * (seqlen - 1) / max(batch - 1, 1)) for i in range(batch)]
    mask = padding_mask(lengths, seqlen)
    # Ids from 2 up keep clear of the pad ids (0, 1); padded positions hold the pad id, as a tokenizer writes them.
    ids = torch.randint(2, VOCAB, (batch, seqlen), generator=generator)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, spec.pad_token_id))
    return {"input_ids": ids, "attention_mask": mask}


def dynamic_dims(family: str) -> dict[str, dict[int, str]]:
    """Batch is dynamic everywhere; sequence too for text models (ViT's is fixed by the image size)."""
    if MODEL_KIND[family] == "vision":
        return {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}}
    text = {0: "batch", 1: "sequence"}
    return {"input_ids": text, "attention_mask": text, "last_hidden_state": text}


def export(case: ZooCase, path: str | os.PathLike, opset: int = 18) -> pathlib.Path:
    """Export the case's model to `path` (.onnx, weights inside) and return the path."""
    module = build_torch(case.family, case.attention)
    return export_onnx(
        module, example_inputs(case.family), path,
        dynamo=case.exporter == "dynamo", dynamic_dims=dynamic_dims(case.family), opset=opset,
    )


def exported(case: ZooCase, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The case's .onnx, exported on first use into the cache and reused after."""
    return cached(f"{case.id}-{WEIGHTS_VERSION}", lambda tmp: export(case, tmp), cache_dir)
