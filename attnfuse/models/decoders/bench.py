"""The Llama-shaped benchmark model: as wide as two CPU cores allow, random weights, exported by dynamo.

hidden 1024, 16 query heads, 4 kv heads (head size 64), 4 layers, gated MLP 2816 wide, a
32000-token vocabulary (by default): 110M parameters, a 443 MB fp32 file, exported in ~35 s.
The workloads of the issue: prefill (16 left-padded prompts, lengths uniform in [16, 256])
and decode (batch 8, one new token over a past of 512). The runtimes that build their own model
from a transformers folder (onnxruntime-genai, CTranslate2, Optimum) read `transformers_folder`'s.
"""
from __future__ import annotations

import os
import pathlib
import random
import shutil
import tempfile
from typing import Callable

import torch

from attnfuse.models._export import cached, default_cache_dir, quiet, versions_tag
from attnfuse.models.decoders import inputs, wrappers
from attnfuse.models.decoders.cases import export_wrapped
from attnfuse.models.decoders.families import BOS, CAUSAL, EOS, PAD, Family, build

BENCH_VERSION = "b2"  # part of the cache key with the config's fingerprint: bump it when the weights change
VOCAB = 32000


def bench_family(vocab_size: int = VOCAB) -> Family:
    """The benchmark Llama. At hidden 1024 a 32000-token LM head is ~40% of a prefill's FLOPs (it
    is ~2% in Llama-7B); a smaller vocabulary puts the weight back on the layers."""
    return Family(CAUSAL, "LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=vocab_size, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False), "the benchmark's Llama")


def llama_bench_torch(cache: str = wrappers.PAST_MODE, attention: str = "sdpa", vocab_size: int = VOCAB) -> torch.nn.Module:
    """The benchmark Llama in torch, in the flat-tensor wrapper of its export (the same seeded weights)."""
    return _torch(bench_family(vocab_size), cache, attention)


def _torch(spec: Family, cache: str, attention: str) -> torch.nn.Module:
    return wrappers.wrap(CAUSAL, build(spec, attention), cache).eval()


def _export(spec: Family, cache: str, attention: str, path: pathlib.Path) -> None:
    export_wrapped(_torch(spec, cache, attention), cache, path, dynamo=True)


def llama_bench_model(caches: tuple[str, ...] = (wrappers.PAST_MODE,), attention: str = "sdpa",
                      vocab_size: int = VOCAB, cache_dir: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
    """{cache mode: .onnx path} of the benchmark Llama exported by dynamo, on first use into the cache.

    "past" (the default) takes past_key_values.{i}.key/value and returns present.{i}.key/value: with
    a past of length 0 it is the prefill file, with a past the decode file. "none" has no cache.
    The logits cover every position ([batch, sequence, vocab]), as Optimum's files do."""
    spec = bench_family(vocab_size)
    return {cache: cached(f"llama-bench-dynamo-{attention}-{cache}-{BENCH_VERSION}-{spec.fingerprint}",
                          lambda tmp, cache=cache: _export(spec, cache, attention, tmp), cache_dir)
            for cache in caches}


def transformers_folder(spec: Family, attention: str = "sdpa",
                        cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The family's model (the same seeded weights as its torch wrapper and export) saved with
    save_pretrained, with a word-level tokenizer over its vocabulary, on first use into the cache.

    Runtimes that build their own model read a folder, and their builders load its tokenizer too
    (genai's model builder refuses a folder without one). Token i is "t{i}" except the special ids:
    the benchmark feeds ids, never text."""
    def save(folder: pathlib.Path) -> None:
        with quiet():
            build(spec, attention).save_pretrained(folder)
            _word_tokenizer(spec.make_config(attention).vocab_size).save_pretrained(folder)

    return cached_folder(f"hf-{spec.config_class}-{attention}-{BENCH_VERSION}-{spec.fingerprint}-{versions_tag()}",
                         save, cache_dir)


def cached_folder(name: str, build: Callable[[pathlib.Path], object],
                  cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """`<cache>/<name>`, a folder that `build(tmp_folder)` fills once: written whole under a temporary
    name, then renamed, so that a reader never finds half a folder (as `cached` does for files)."""
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / name
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
    try:
        build(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    special = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}
    vocab = {special.get(i, f"t{i}"): i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=special[PAD])),
                                   pad_token=special[PAD], bos_token=special[BOS], eos_token=special[EOS])


def prefill_step(seed: int = 0, prompts: int = 16, shortest: int = 16, longest: int = 256) -> inputs.Step:
    """16 prompts, lengths uniform in [16, 256], left padded to the longest."""
    rng = random.Random(seed)
    lengths = tuple(rng.randint(shortest, longest) for _ in range(prompts))
    return inputs.Step(new=max(lengths), lengths=lengths)


def decode_step(seed: int = 0, batch: int = 8, past: int = 512, shortest: int = 16) -> inputs.Step:
    """One new token for each of 8 rows over a past of 512 (rows' real lengths uniform in [16, 513])."""
    rng = random.Random(seed)
    return inputs.Step(new=1, past=past, lengths=tuple(rng.randint(shortest, past + 1) for _ in range(batch)))


def bench_inputs(step: inputs.Step, cache: str = wrappers.PAST_MODE, vocab_size: int = VOCAB,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs by name for the benchmark file of this cache mode (past k/v random, as a cache holds)."""
    config = bench_family(vocab_size).make_config("sdpa")
    return inputs.make(wrappers.signature(CAUSAL, config, cache), config, step, seed)
