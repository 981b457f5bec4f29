"""attnfuse.optimize on a sentence-transformers model: `encode` keeps working, faster.

What comes back is a SentenceTransformer too: a copy of the original that shares its
weights, tokenizer and every module but one, the transformer module, whose model is
replaced by attnfuse.optimize's module of it. Tokenizing, batching (sorted by
length), padding, pooling and normalising stay sentence-transformers' own, so every
`encode` option works as before. The model is optimized on the very call the
transformer module makes (the same inputs by name, `return_dict` included), and the
copy is verified whole against the original on check batches: token embeddings at
real tokens, sentence embeddings whole, as a part of the transformer's verification,
so that what fails it is rolled back like any failure. That is what proves that the
pooling (mean, cls, max, ...) reads no padded position, where padding-free leaves zeros.
"""
from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch

from attnfuse.core.options import PassOptions
from attnfuse.optimizer.errors import UserError
from attnfuse.optimizer.torch_inputs import Signature, pad_ids
from attnfuse.optimizer.torch_verify import check

# Tokenized when no example is given: optimize builds its own check batches from it.
EXAMPLE_SENTENCES = ["attnfuse captures the model on this sentence.", "And on this one."]


def is_sentence_transformer(model: object) -> bool:
    module = sys.modules.get("sentence_transformers")  # never imported here: a model of it means it is loaded
    return module is not None and isinstance(model, module.SentenceTransformer)


def optimize(model, example_inputs: tuple | None, example_kwargs: dict | None, optimize_module: Callable,
             options: PassOptions, *, tolerance: float | None, seed: int):
    """`model` with its transformer's model replaced by `optimize_module`'s (attnfuse.optimize's)."""
    _, transformer = _transformer_module(model)
    features = _example_features(model, example_inputs, example_kwargs)
    call = _model_call(transformer, features)
    check_whole = _whole_check(model, features, tolerance, seed) if options.verified else None
    inner = optimize_module(transformer.auto_model, None, call, options, tolerance=tolerance, seed=seed,
                            check_also=check_whole)
    return _reported(with_model(model, inner), inner)


def _whole_check(model, features: dict, tolerance: float | None, seed: int) -> Callable:
    """The check of the SentenceTransformer with an optimized transformer model against `model`."""
    model.eval()
    inputs = Signature.of(features, pad_ids=pad_ids(_transformer_module(model)[1].auto_model))
    runs = inputs.runs(seed + 200, count=3)
    with torch.no_grad():
        expected = [model(dict(run)) for run in runs]

    def check_whole(inner):
        optimized = with_model(model, inner)
        return check(lambda **run: optimized(dict(run)), runs, expected, inputs, tolerance)

    return check_whole


def _transformer_module(model) -> tuple[str, torch.nn.Module]:
    """The module that runs the transformers model (sentence-transformers' Transformer)."""
    for name, module in model.named_children():
        if isinstance(getattr(module, "auto_model", None), torch.nn.Module):
            return name, module
    raise UserError("this SentenceTransformer has no transformer module (auto_model) to optimize")


def _example_features(model, example_inputs: tuple | None, example_kwargs: dict | None) -> dict:
    """Tokenized inputs: given as they are, tokenized from sentences, or from EXAMPLE_SENTENCES."""
    given = dict(example_kwargs) if example_kwargs else (example_inputs[0] if example_inputs else EXAMPLE_SENTENCES)
    if hasattr(given, "items") and set(given) == {"input"}:  # forward(input=features), by its parameter's name
        given = given["input"]
    if isinstance(given, str):
        given = [given]
    if isinstance(given, (list, tuple)) and all(isinstance(s, str) for s in given):
        tokenize = getattr(model, "preprocess", None) or model.tokenize
        given = tokenize(list(given))
    if not hasattr(given, "items") or not any(isinstance(v, torch.Tensor) for v in dict(given).values()):
        raise UserError("give a SentenceTransformer's example as sentences or as its tokenized features")
    return dict(given)


class _CallRecorder(torch.nn.Module):
    """Stands in for the transformer's model for one call and keeps that call's arguments."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config
        self.kwargs: dict | None = None

    def forward(self, *args, **kwargs):
        if args:
            raise UserError("the transformer module passes its model positional inputs; attnfuse needs them by name")
        self.kwargs = kwargs
        return self.model(**kwargs)


def _model_call(transformer: torch.nn.Module, features: dict) -> dict:
    """The inputs, by name, that the transformer module gives its model for `features`."""
    recorder = _CallRecorder(transformer.auto_model)
    with torch.no_grad():
        _replaced(transformer, recorder)(dict(features))
    if recorder.kwargs is None:
        raise UserError("the transformer module did not call its model")
    return recorder.kwargs


def _replaced(transformer: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `transformer` that runs `model` in place of its own (the original keeps its own)."""
    slot = next(name for name, child in transformer.named_children() if child is transformer.auto_model)
    return _shallow_copy(transformer, {slot: model})


def with_model(model, replacement: torch.nn.Module):
    """A copy of the SentenceTransformer `model` whose transformer runs `replacement` (an
    optimized or a torch.compile'd module of its model); the original is left as it was."""
    position, transformer = _transformer_module(model)
    return _shallow_copy(model, {position: _replaced(transformer, replacement)})


def _shallow_copy(module: torch.nn.Module, children: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """`module` with some children replaced; everything else, weights included, shared."""
    new = copy.copy(module)
    new._modules = {**module._modules, **children}
    return new


def _reported(optimized, inner):
    report = inner.report  # its check is the sentence embeddings', end to end, where it verifies
    report.model = f"{type(optimized).__name__}({report.model})"
    optimized.report = report
    return optimized
