"""The Llama-shaped benchmark model: as wide as two CPU cores allow, random weights, exported by dynamo.

hidden 1024, 16 query heads, 4 kv heads (head size 64), 4 layers, gated MLP 2816 wide, a
32000-token vocabulary (by default): 110M parameters, a 443 MB fp32 file, exported in ~35 s.
The workloads of the issue: prefill (16 left-padded prompts, lengths uniform in [16, 256])
and decode (batch 8, one new token over a past of 512).
"""
from __future__ import annotations

import os
import pathlib
import random

import torch

from attnfuse.models._export import cached
from attnfuse.models.decoders import inputs, wrappers
from attnfuse.models.decoders.cases import export_wrapped
from attnfuse.models.decoders.families import CAUSAL, PAD, Family, build

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
