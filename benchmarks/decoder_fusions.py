"""Do the decoder fusions pay on ONNX Runtime's CPU provider?

Each fused op against the graph it replaces, at Llama's shapes (hidden 1024, 16 heads, 4 kv
heads, head size 64): a prefill of batch 8 x 256 tokens and a decode step of batch 8 x 1
token. The decomposed graphs are the dynamo exporter's spellings (attnfuse/models/
decoder_spellings.py); the fused ones are what attnfuse writes for them. For rotary with cos
and sin gathered from a constant table, the fused op reading the table and the position ids
is also compared with the fused op reading one cos/sin row per token.

`--model` adds the benchmark Llama (4 layers, attnfuse/models/decoders/bench.py) with its
attention fused, then RMSNorm, rotary and both on top (padding-free off), and the kernel time
of each step outside the matmuls and attention (ONNX Runtime's profiler), where the fused
ops' gain is not lost in the run-to-run spread of a whole model.

ONNX Runtime with 2 threads and its own graph optimizations on, median of interleaved runs
(2000 of them for a decode step's ops, which take microseconds; 100 of the model's decode step).

    python -m benchmarks.decoder_fusions [--repeats 30] [--model [--model-repeats 7]] [--out results.json]

(from the repository root).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
from collections.abc import Callable

import numpy as np
import onnx

import attnfuse
from attnfuse.core.driver import Applied
from attnfuse.models import decoder_spellings as spellings
from attnfuse.models.decoders import bench, inputs
from attnfuse.optimizer import io
from attnfuse.optimizer.api import capture, make_config
from attnfuse.passes.onnx import prepare, run_passes
from attnfuse.passes.result import is_site
from attnfuse.tools.timing import interleaved_medians, ort_session, table

RESULTS = pathlib.Path(__file__).parent / "results"
HIDDEN, HEADS, KV_HEADS, HEAD_SIZE = 1024, 16, 4, 64
SHAPES = {"prefill 8x256": (8, 256, 0), "decode 8x1": (8, 1, 256)}  # batch, new tokens, position of the first
DECODE_REPEATS = 2000  # a decode step's op takes some 20 us: many runs for a median that holds still
NORM = spellings.NormSpelling(hidden=HIDDEN)
ROTARY = spellings.RotarySpelling(heads=HEADS, kv_heads=KV_HEADS, head_size=HEAD_SIZE, rotary=HEAD_SIZE, table_rows=2048)


def op_contenders() -> dict[str, dict[str, onnx.ModelProto]]:
    """{construct: {contender: model}}: each decomposed graph and attnfuse's fused one. For cos and
    sin gathered from tables, the fused op reads the tables and the position ids; with the rows
    scaled after the gather (transformers' attention_scaling, 1 here) it reads one row per token:
    the two fused forms of the same rotary."""
    table = dataclasses.replace(ROTARY, angles="table")
    graphs = {"RMSNorm": spellings.norm_model(NORM),
              "residual + RMSNorm": spellings.norm_model(dataclasses.replace(NORM, residual=True)),
              "rotary (positions)": spellings.rotary_model(ROTARY),
              "rotary (table)": spellings.rotary_model(table)}
    made = {name: {"decomposed": model, "attnfuse": _fused(model)} for name, model in graphs.items()}
    made["rotary (table)"]["fused, one row per token"] = _fused(spellings.rotary_model(
        dataclasses.replace(table, scaling=1.0)))
    return made


def _fused(model: onnx.ModelProto) -> onnx.ModelProto:
    return attnfuse.optimize_onnx(model, padding_free=False).proto


def op_feeds(model: onnx.ModelProto, batch: int, tokens: int, first: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        if value.name == "position_ids":
            feeds[value.name] = np.broadcast_to(np.arange(first, first + tokens), (batch, tokens)).copy()
        else:
            width = value.type.tensor_type.shape.dim[-1].dim_value
            feeds[value.name] = rng.standard_normal((batch, tokens, width)).astype(np.float32)
    return feeds


def measure_ops(repeats: int) -> list[dict]:
    records = []
    for construct, contenders in op_contenders().items():
        sessions = {name: ort_session(model, threads=2) for name, model in contenders.items()}
        for shape_name, shape in SHAPES.items():
            feeds = op_feeds(contenders["decomposed"], *shape)
            runs = repeats if shape[1] > 1 else DECODE_REPEATS
            records += _timed(construct, shape_name, sessions, feeds, "decomposed", runs)
    return records


def _timed(construct: str, shape_name: str, sessions: dict, feeds: dict, baseline: str, repeats: int) -> list[dict]:
    outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
    expected = outputs[baseline]
    times = interleaved_medians({name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()},
                                repeats=repeats, desc=f"{construct}, {shape_name}")
    return [{"construct": construct, "shape": shape_name, "contender": name, "median_ms": round(t * 1e3, 3),
             "speedup": round(times[baseline] / t, 3),
             "max_rel_error": float(np.abs(outputs[name] - expected).max() / np.abs(expected).max())}
            for name, t in times.items()]


NORMS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
MODEL_VARIANTS = {"attention only": set(), "+ RMSNorm": NORMS, "+ rotary": {"RotaryEmbedding"},
                  "+ both": NORMS | {"RotaryEmbedding"}}
DECODE_MODEL_REPEATS = 100  # a decode step of the 4-layer model takes some 50 ms
MODEL_STEPS = {"prefill 8x256": inputs.Step(new=256, lengths=(256,) * 8),
               "decode 8x1": inputs.Step(new=1, past=256, lengths=(257,) * 8)}


def model_variants(path) -> dict[str, bytes]:
    """The benchmark Llama rewritten with each variant's fusions (and attention), serialized."""
    def leaves_out(ops):
        return lambda entry: not is_site(entry.outcome) and entry.outcome.op not in ops

    return rewritten_variants(path, {name: leaves_out(ops) for name, ops in MODEL_VARIANTS.items()},
                              padding_free=False)


def rewritten_variants(path, leave_out: dict[str, Callable[[Applied], bool]], **settings) -> dict[str, bytes]:
    """The model at `path` optimized (unverified, with `settings`) once per variant, serialized: each
    variant leaves out the rewrites of one full run for which its `leave_out` is true."""
    config = make_config(None, {"verify": False, **settings})
    options = config.pass_options()
    prepared = prepare(io.load_model(path))
    probe = capture(prepared, config)
    full = run_passes(prepared.clone(), probe.for_rewrite(), options)
    made = {}
    for name, leaves_out in leave_out.items():
        left_out = frozenset(entry.candidate for entry in full.applied if entry.outcome.fused and leaves_out(entry))
        model = prepared.clone()
        run_passes(model, probe.for_rewrite(), options, left_out)
        made[name] = io.to_proto(model).SerializeToString()
    return made


def model_steps(vocab: int) -> tuple[dict[str, bytes], dict[str, dict]]:
    """The benchmark Llama's variants (model_variants) and the feeds of each of MODEL_STEPS: built
    once, for the timings and the kernel times alike."""
    models = model_variants(bench.llama_bench_model(vocab_size=vocab)["past"])
    feeds = {name: {k: v.numpy() for k, v in bench.bench_inputs(step, vocab_size=vocab).items()}
             for name, step in MODEL_STEPS.items()}
    return models, feeds


def measure_model(models: dict[str, bytes], feeds: dict[str, dict], repeats: int) -> list[dict]:
    sessions = {name: ort_session(model, threads=2) for name, model in models.items()}
    records = []
    for step_name, step in MODEL_STEPS.items():
        runs = repeats if step.new > 1 else DECODE_MODEL_REPEATS
        records += _timed("Llama, 4 layers", step_name, sessions, feeds[step_name], "attention only", runs)
    return records


def kernel_times(model: bytes, feeds: dict, runs: int = 3) -> dict[str, float]:
    """ms per run spent in each op type's kernels (ONNX Runtime's profiler): within one model,
    the time of the ops a fusion replaces stands out of the matmuls' noise."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.enable_profiling, options.log_severity_level = 2, True, 3
    with tempfile.TemporaryDirectory() as folder:  # the trace never lands among the results
        options.profile_file_prefix = str(pathlib.Path(folder) / "profile")
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(pathlib.Path(session.end_profiling()).read_text())
    times: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            times[op] = times.get(op, 0.0) + event["dur"] / 1e3 / runs
    return times


def measure_kernels(models: dict[str, bytes], feeds: dict[str, dict]) -> list[dict]:
    """Each step's kernel time outside the matmuls and attention, attention-only against both fusions."""
    records = []
    for step_name, step in MODEL_STEPS.items():
        for name in ("attention only", "+ both"):
            times = kernel_times(models[name], feeds[step_name], runs=3 if step.new > 1 else 50)
            rest = {op: round(t, 3) for op, t in sorted(times.items(), key=lambda item: -item[1])
                    if op not in ("MatMul", "FusedMatMul", "GroupQueryAttention", "MultiHeadAttention")}
            records.append({"step": step_name, "variant": name, "other_ops_ms": round(sum(rest.values()), 2),
                            "by_op": {op: t for op, t in rest.items() if t >= 0.01 * sum(rest.values())}})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--model", action="store_true", help="also the 4-layer benchmark Llama (minutes)")
    parser.add_argument("--model-repeats", type=int, default=7, help="of the model's prefill")
    parser.add_argument("--vocab", type=int, default=1024, help="the benchmark Llama's vocabulary (small: the "
                        "weight stays on the layers)")
    parser.add_argument("--out", help="write the records as JSON")
    args = parser.parse_args(argv)
    records = measure_ops(args.repeats)
    kernels = []
    if args.model:
        models, feeds = model_steps(args.vocab)
        records += measure_model(models, feeds, args.model_repeats)
        kernels = measure_kernels(models, feeds)
    print(table(["construct", "shape", "contender", "median ms", "speedup", "max rel error"],
                [[r["construct"], r["shape"], r["contender"], r["median_ms"], f"{r['speedup']:.2f}x",
                  f"{r['max_rel_error']:.1e}"] for r in records]))
    for record in kernels:
        print(f"{record['step']}, {record['variant']}: kernels besides matmuls and attention {record['other_ops_ms']} ms "
              f"{record['by_op']}")
    if args.out:
        io.write_text(args.out, json.dumps({"timings": records, "kernels": kernels}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
