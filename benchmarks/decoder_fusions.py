"""Do the decoder fusions pay on ONNX Runtime's CPU provider? The benchmark Llama (hidden 1024,
16 heads, 4 kv heads, 4 layers; attnfuse/models/decoders/bench.py) with its attention fused,
then with RMSNorm fused (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization),
with rotary fused (RotaryEmbedding), and with both; a prefill of batch 8 x 256 tokens and a
decode step of batch 8 x 1 token over a past of 256. ONNX Runtime 2 threads, its own graph
optimizations on, median of interleaved runs; ratios against attention-only.

    python -m benchmarks.decoder_fusions [--repeats 7] [--vocab 1024] [--out results.json]

(from the repository root). Padding-free is off: the variants differ in the fused ops only.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from attnfuse.models.decoders import bench, inputs
from attnfuse.optimizer import io
from attnfuse.optimizer.api import capture, make_config
from attnfuse.passes.onnx import prepare, run_passes
from attnfuse.tools.timing import interleaved_medians, ort_session, table

NORMS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
ROTARY = {"RotaryEmbedding"}
VARIANTS = {"attention only": set(), "+ RMSNorm": NORMS, "+ rotary": ROTARY, "+ both": NORMS | ROTARY}
STEPS = {"prefill 8x256": inputs.Step(new=256, lengths=(256,) * 8),
         "decode 8x1 (past 256)": inputs.Step(new=1, past=256, lengths=(257,) * 8)}


def variants(path) -> dict[str, bytes]:
    """The model rewritten with each variant's fusions (and attention) applied, serialized."""
    config = make_config(None, {"padding_free": False, "verify": False})
    prepared = prepare(io.load_model(path))
    probe = capture(prepared, config)
    full = run_passes(prepared.clone(), probe, config)
    made = {}
    for name, ops in VARIANTS.items():
        left_out = frozenset(f.name for f in full.fusions if f.fused and f.op not in ops)
        model = prepared.clone()
        run_passes(model, probe, config, left_out)
        made[name] = io.to_proto(model).SerializeToString()
    return made


def measure(repeats: int, vocab: int) -> list[dict]:
    path = bench.llama_bench_model(vocab_size=vocab)["past"]
    sessions = {name: ort_session(model, threads=2) for name, model in variants(path).items()}
    records = []
    for step_name, step in STEPS.items():
        feeds = {k: v.numpy() for k, v in bench.bench_inputs(step, vocab_size=vocab).items()}
        outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
        reference = outputs["attention only"]
        errors = {name: float(np.abs(out - reference).max() / np.abs(reference).max()) for name, out in outputs.items()}
        times = interleaved_medians({name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()},
                                    repeats=repeats, desc=step_name)
        base = times["attention only"]
        records += [{"step": step_name, "variant": name, "median_ms": round(t * 1e3, 2),
                     "speedup": round(base / t, 3), "max_rel_error": errors[name]} for name, t in times.items()]
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--vocab", type=int, default=1024, help="a small vocabulary keeps the weight on the layers")
    parser.add_argument("--out", help="write the records as JSON")
    args = parser.parse_args(argv)
    records = measure(args.repeats, args.vocab)
    print(table(["step", "variant", "median ms", "vs attention only", "max rel error"],
                [[r["step"], r["variant"], r["median_ms"], f"{r['speedup']:.3f}x", f"{r['max_rel_error']:.1e}"]
                 for r in records]))
    if args.out:
        io.write_text(args.out, json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
