"""End to end: N greedy tokens from the prefill prompts, for every contender, equal to torch's or marked.

torch runs transformers' own `generate` (the reference); an ONNX contender runs the deployment loop
of attnfuse.models.decoders.generate.greedy_causal, here over the benchmark's runner of its
session (the prompt once with an empty past, then one token at a time, the presents fed back);
a runtime peer runs its own generation. Each is checked once (first: its tokens judge the runtime
peers' decode steps), then all are timed interleaved (last: a generation is long).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from attnfuse.models.decoders import inputs as decoder_inputs
from attnfuse.tools import bench
from attnfuse.tools.timing import interleaved_medians

Generate = Callable[[], np.ndarray]  # -> [batch, new tokens]


def greedy_over_runner(run: bench.Runner, input_names: list[str], config, prompt: dict[str, np.ndarray],
                       new_tokens: int) -> np.ndarray:
    """[batch, new_tokens] greedy tokens of a with-cache file whose runner takes `input_names` and
    returns logits then the present k/v in the order of its past_key_values inputs."""
    kv_heads, head_dim, _ = decoder_inputs.cache_geometry(config)
    past_names = [name for name in input_names if name.startswith("past_key_values.")]
    mask = prompt["attention_mask"].astype(np.int64)
    empty = np.zeros((len(mask), kv_heads, 0, head_dim), np.float32)
    feeds = {"input_ids": prompt["input_ids"], "attention_mask": mask,
             "position_ids": decoder_inputs.positions(torch.from_numpy(mask)).numpy(),
             **{name: empty for name in past_names}}
    tokens = []
    for _ in range(new_tokens):
        logits, *present = run(feeds)
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(token)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        feeds = {"input_ids": token, "attention_mask": mask, "position_ids": feeds["position_ids"][:, -1:] + 1,
                 **dict(zip(past_names, present))}
    return np.concatenate(tokens, axis=1)


def token_mismatch(tokens: np.ndarray, expected: np.ndarray, ends_at: int | None = None) -> str | None:
    """None if `tokens` are `expected`, else what differs: rows, and the first step that differs.
    `ends_at`: the end-of-sequence id, for a contender whose rows end there (genai): what comes after
    the first one in a row of `expected` is not compared."""
    if tokens.shape != expected.shape:
        return f"shape {list(tokens.shape)} instead of {list(expected.shape)}"
    differ = tokens != expected
    if ends_at is not None:
        ended = np.cumsum(expected == ends_at, axis=1) - (expected == ends_at) > 0  # after a row's first end id
        differ &= ~ended
    if not differ.any():
        return None
    first = int(np.argmax(differ.any(axis=0)))
    return f"{int(differ.any(axis=1).sum())} of {len(tokens)} rows differ, from token {first + 1}"


def check(generators: dict[str, Generate], ends_at: dict[str, int] | None = None
          ) -> tuple[bench.Checked, dict[str, str | None]]:
    """Generate once with each (the first is the reference). `ends_at`: the end-of-sequence id of the
    contenders whose rows end there (token_mismatch). Returns what ran (errors: 0.0 for tokens equal
    to the reference's, inf for others; failures) and each contender's mismatch (None: equal)."""
    from attnfuse.models.peers import describe_error

    checked, mismatches = bench.Checked({}, {}, {}), {}
    expected = None
    for name, generate in generators.items():
        try:
            tokens = generate()
        except Exception as error:  # a contender that fails to generate is a result, as in bench.check_and_time
            if expected is None:
                raise
            checked.failures[name] = f"generate failed: {describe_error(error)}"
            continue
        expected = tokens if expected is None else expected
        mismatches[name] = token_mismatch(tokens, expected, (ends_at or {}).get(name))
        checked.errors[name] = 0.0 if mismatches[name] is None else np.inf
    return checked, mismatches


def time_generations(checked: bench.Checked, generators: dict[str, Generate], repeats: int, desc: str) -> None:
    """Times those that generated in `check`, interleaved, into checked.seconds: the check run was their
    warm-up (a generation is long; the contenders' sessions are warm already)."""
    checked.seconds = interleaved_medians({name: generators[name] for name in checked.errors}, repeats, warmup=0,
                                          desc=desc)


def generation_flops(flops_of: Callable[[decoder_inputs.Step], int], prompt: decoder_inputs.Step, new_tokens: int) -> int:
    """The prompts' forward (which gives the first token) and new_tokens - 1 steps of one token."""
    steps = (decoder_inputs.Step(new=1, past=prompt.new + k - 1, lengths=tuple(n + k for n in prompt.lengths))
             for k in range(1, new_tokens))
    return flops_of(prompt) + sum(map(flops_of, steps))
