"""Do fused projections (q/k/v and gate/up as one product) and SiLU as one op pay?

Each model optimized with and without the rules (passes/rules/projections.py, silu.py), everything
else as `optimize_onnx` / `attnfuse.optimize` do by default (padding-free on), timed in one
interleaved run:

  ONNX Runtime, 2 threads: the benchmark Llama (attnfuse/models/decoders/bench.py; hidden 1024,
  16/4 heads, MLP 2816, 4 layers) on `attnfuse bench --model llama`'s prefill (16 prompts of
  16..256 tokens, left padded) and decode (batch 8, one token over a past of 512); MiniLM-L6 and
  BERT-base x4 on a batch of 32 / 16 rows of 8..128 tokens.
  torch, 2 threads (`attnfuse.optimize`): the same Llama (its transformers model, no LM head) on
  the same prefill and decode (a DynamicCache, cropped back after each step), MiniLM on its batch.

Every variant's outputs are compared with the one without the rules. The load average of the
(shared) machine is printed with each section.

    python -m benchmarks.projections [--repeats 9] [--decode-repeats 60] [--only onnx|torch] [--out results.json]
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
from unittest import mock

import numpy as np
import torch
import transformers
from transformers import DynamicCache

import attnfuse
from attnfuse.models import bertbase, minilm
from attnfuse.models.decoders import bench, families
from attnfuse.models.wrappers import TextModel
from attnfuse.optimizer import io
from attnfuse.passes import fx as fx_passes
from attnfuse.tools.timing import interleaved_medians, ort_session, table
from benchmarks.decoder_fusions import rewritten_variants

THREADS = 2
RULES = {"projections": "Projections", "silu": "Silu"}  # rule name -> its class in the fx pipeline
VARIANTS = {"without": {"projections", "silu"}, "+ SiLU": {"projections"}, "+ projections": {"silu"}, "both": set()}
# BERT has no SiLU, and transformers' Llama in torch has aten.silu already: projections only.
PROJECTIONS_ONLY = {"without": {"projections"}, "+ projections": set()}
# transformers 5.24 names the cache argument `cache` (past_key_values still works, with a warning).
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters else "past_key_values"


def load() -> str:
    return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


# ---- ONNX Runtime ----------------------------------------------------------------------------------


def onnx_models(vocab: int) -> dict[str, tuple[dict[str, bytes], dict[str, dict]]]:
    """{model: ({variant: serialized model}, {workload: feeds})}."""
    llama = rewritten_variants(bench.llama_bench_model(vocab_size=vocab)["past"], _leaving_out(VARIANTS))
    steps = {"prefill": bench.prefill_step(), "decode": bench.decode_step()}
    made = {"Llama": (llama, {name: {k: v.numpy() for k, v in bench.bench_inputs(step, vocab_size=vocab).items()}
                              for name, step in steps.items()})}
    for name, module, rows in (("MiniLM-L6", minilm, 32), ("BERT-base x4", bertbase, 16)):
        made[name] = (rewritten_variants(module.exported(dynamo=True), _leaving_out(PROJECTIONS_ONLY)),
                      {f"{rows} x 8..128": module.padded_batch(rows, 128, seed=0)})
    return made


def _leaving_out(variants: dict[str, set[str]]):
    return {name: (lambda entry, rules=rules: entry.candidate.rule in rules) for name, rules in variants.items()}


def measure_onnx(vocab: int, repeats: int, decode_repeats: int) -> list[dict]:
    records = []
    for model, (variants, workloads) in onnx_models(vocab).items():
        sessions = {name: ort_session(data, threads=THREADS) for name, data in variants.items()}
        for workload, feeds in workloads.items():
            runners = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
            outputs = {name: run() for name, run in runners.items()}
            runs = decode_repeats if workload == "decode" else repeats
            records += _records("ONNX Runtime", model, workload, runners, outputs, runs)
    return records


# ---- torch -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def rules_left_out(rules: set[str]):
    """The fx pipeline with each of `rules` replaced by one that finds nothing."""
    with contextlib.ExitStack() as stack:
        for rule in rules:
            nothing = type(RULES[rule], (), {"name": rule, "anchors": lambda self, graph, view: []})
            stack.enter_context(mock.patch.object(fx_passes, RULES[rule], nothing))
        yield


def optimized_variants(model: torch.nn.Module, example: dict, variants: dict[str, set[str]]) -> dict:
    made = {}
    for name, rules in variants.items():
        with rules_left_out(rules):
            made[name] = attnfuse.optimize(model, example_kwargs=example)
    return made


def left_padded(lengths: tuple[int, ...], width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids and a mask of rows of `lengths` real tokens, left padded to `width`."""
    mask = (torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(3, bench.VOCAB, mask.shape, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask}


def llama_prompts(step) -> dict[str, torch.Tensor]:
    return left_padded(step.lengths, step.new)


def llama_decode(model: torch.nn.Module, step) -> tuple[dict, DynamicCache]:
    """A decode step's inputs (one new token per row), over a cache the model made from left-padded
    prompts of `step.past` positions; and that cache."""
    prompts = left_padded(tuple(length - 1 for length in step.lengths), step.past)
    with torch.no_grad():
        cache = model(**prompts, **{CACHE: DynamicCache()}, use_cache=True).past_key_values
    rows = len(step.lengths)
    mask = torch.cat([prompts["attention_mask"], torch.ones(rows, 1, dtype=torch.long)], 1)
    ids = torch.randint(3, bench.VOCAB, (rows, 1), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": mask, CACHE: cache, "use_cache": True}, cache


def measure_torch(repeats: int, decode_repeats: int) -> list[dict]:
    torch.set_num_threads(THREADS)
    records = []
    llama = families.build(bench.bench_family(), "sdpa").model.eval()
    prompts = llama_prompts(bench.prefill_step())
    small = llama_prompts(bench.prefill_step(prompts=2, shortest=4, longest=8))
    records += _torch_records("Llama", "prefill", optimized_variants(TextModel(llama, use_cache=False).eval(), small,
                                                                      PROJECTIONS_ONLY), prompts, repeats)
    step, cache = llama_decode(llama, bench.decode_step())
    example, _ = llama_decode(llama, bench.decode_step(batch=2, past=6, shortest=2))
    past = cache.get_seq_length()
    decoders = optimized_variants(llama, example, PROJECTIONS_ONLY)
    records += _torch_records("Llama", "decode", decoders, step, decode_repeats,
                              after=lambda: _crop(cache, past), output=lambda out: out.last_hidden_state)
    encoder = minilm.load_torch("sdpa")
    batch = {k: torch.from_numpy(v) for k, v in minilm.padded_batch(32, 128, seed=0).items()}
    example = {k: torch.from_numpy(v) for k, v in minilm.padded_batch(2, 16, seed=1).items()}
    records += _torch_records("MiniLM-L6", "32 x 8..128", optimized_variants(encoder, example, PROJECTIONS_ONLY),
                              batch, repeats)
    return records


def _crop(cache: DynamicCache, length: int) -> None:
    """The cache back to `length` positions, if a step appended to it."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _torch_records(model: str, workload: str, modules: dict, inputs: dict, repeats: int, after=lambda: None,
                   output=lambda out: out) -> list[dict]:
    def runner(module):
        def run():
            with torch.no_grad():
                out = output(module(**inputs))
            after()
            return out
        return run

    runners = {name: runner(module) for name, module in modules.items()}
    outputs = {name: [run().numpy()] for name, run in runners.items()}
    return _records("torch", model, workload, runners, outputs, repeats)


# ---- both ------------------------------------------------------------------------------------------


def _records(runtime: str, model: str, workload: str, runners: dict, outputs: dict, repeats: int) -> list[dict]:
    print(f"{runtime}, {model}, {workload}: {load()}", flush=True)
    times = interleaved_medians(runners, repeats=repeats, desc=f"{model}, {workload}")
    base = "without"
    return [{"runtime": runtime, "model": model, "workload": workload, "variant": name,
             "median_ms": round(t * 1e3, 2), "speedup": round(times[base] / t, 3),
             "max_rel_error": max(_error(want, got) for want, got in zip(outputs[base], outputs[name]))}
            for name, t in times.items()]


def _error(want: np.ndarray, got: np.ndarray) -> float:
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    return float(np.abs(want - got).max() / max(np.abs(want).max(), 1e-30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="rounds of prefill and encoder batches")
    parser.add_argument("--decode-repeats", type=int, default=60, help="rounds of the decode step")
    parser.add_argument("--only", choices=("onnx", "torch"))
    parser.add_argument("--vocab", type=int, default=bench.VOCAB, help="the benchmark Llama's vocabulary")
    parser.add_argument("--out", help="write the records as JSON")
    args = parser.parse_args(argv)
    print(load(), flush=True)
    records = []
    if args.only != "torch":
        records += measure_onnx(args.vocab, args.repeats, args.decode_repeats)
    if args.only != "onnx":
        records += measure_torch(args.repeats, args.decode_repeats)
    print(load())
    print(table(["runtime", "model", "workload", "variant", "median ms", "speedup", "max rel error"],
                [[r["runtime"], r["model"], r["workload"], r["variant"], r["median_ms"], f"{r['speedup']:.3f}x",
                  f"{r['max_rel_error']:.1e}"] for r in records]))
    if args.out:
        io.write_text(args.out, json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
