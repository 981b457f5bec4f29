"""Where attnfuse's graph of the benchmark Llama spends its time, beside onnxruntime-genai's model of the same
weights: ONNX Runtime's profiles of both, by op type, on the decoder benchmark's prefill and decode step.

    python benchmarks/peers/profile_llama.py [--quick] [--int4] [--runs 3] [--threads 2]

attnfuse's graph is optimize_onnx's output for the bench's dynamo export (made here, default settings);
genai's is its model builder's model.onnx (benchmarks/peers/install_decoder_peers.sh), run here as a plain
ONNX Runtime session: prompts right padded, a decode step fed a past of 512 as a plain tensor (genai
itself shares one buffer between past and present). Both sessions as the bench makes them (the threads,
workers that stop spinning). Prints, per workload and op type, the kernel milliseconds per run and the
number of nodes, for each graph side by side, and the wall time per run. --int4: attnfuse's `--quantize int4`
output beside genai's `-p int4` build (both 4-bit weights in blocks of 32, int8 activations inside MatMulNBits).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def profile(model_path: str, feeds: dict[str, np.ndarray], threads: int, runs: int, folder: Path
            ) -> tuple[dict[str, tuple[float, int]], float]:
    """{op type: (kernel ms per run, nodes)} and the median wall ms of `runs` runs after one warm-up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / Path(model_path).stem)
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    session.run(None, {name: feeds[name] for name in names})  # warm-up, in the profile too: dropped below
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: feeds[name] for name in names})
        walls.append((time.perf_counter() - start) * 1e3)
    events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(nodes) // (runs + 1)
    totals: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for event in nodes[per_run:]:  # the timed runs
        totals[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    for event in nodes[:per_run]:
        counts[event["args"]["op_name"]] += 1
    return {op: (ms, counts[op]) for op, ms in totals.items()}, float(np.median(walls))


def genai_feeds(session_inputs, prompts, past: int, kv_heads: int, head_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """genai's inputs: right-padded ids and mask over the past and new tokens, past k/v random."""
    ids = prompts.right_padded()
    lengths = np.asarray(prompts.lengths)
    if past:  # one new token per row after a past: its last real token
        ids = ids[np.arange(len(ids)), lengths - 1][:, None]
        mask = (np.arange(past + 1)[None, :] < lengths[:, None]).astype(np.int64)
    else:
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": ids, "attention_mask": mask}
    for name in session_inputs:
        if name.startswith("past_key_values."):
            feeds[name] = rng.standard_normal((len(ids), kv_heads, past, head_dim)).astype(np.float32)
    return feeds


def table(rows: dict[str, dict[str, tuple[float, int]]], walls: dict[str, float]) -> str:
    sides = list(rows)
    ops = sorted({op for side in rows.values() for op in side}, key=lambda op: -max(s.get(op, (0, 0))[0] for s in rows.values()))
    lines = ["| op | " + " | ".join(f"{side} ms (nodes)" for side in sides) + " |", "|" + " --- |" * (len(sides) + 1)]
    for op in ops:
        cells = [f"{rows[s][op][0]:.2f} ({rows[s][op][1]})" if op in rows[s] else "-" for s in sides]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| kernels, total | " + " | ".join(f"{sum(ms for ms, _ in rows[s].values()):.2f}" for s in sides) + " |")
    lines.append("| wall, median | " + " | ".join(f"{walls[s]:.2f}" for s in sides) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the decoder zoo's tiny Llama")
    parser.add_argument("--int4", action="store_true", help="both models with 4-bit weights")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import onnx
    import onnxruntime as ort

    import attnfuse
    from attnfuse.models.decoders import inputs as decoder_inputs
    from attnfuse.tools.bench_decoder import decoder_bench, decoder_workloads, peer_prompts
    from attnfuse.tools.decoder_peers import peers

    genai = peers.GENAI_INT4 if args.int4 else next(p for p in peers.runtime_peers() if p.name == "onnxruntime-genai")
    if genai.missing():
        parser.error(f"onnxruntime-genai: {genai.missing()}")
    model = decoder_bench(args.quick)
    genai_model = str(genai.built(model.folder()) / "model.onnx")
    genai_inputs = [i.name for i in ort.InferenceSession(genai_model, providers=["CPUExecutionProvider"]).get_inputs()]
    kv_heads, head_dim, _ = decoder_inputs.cache_geometry(model.config)
    with tempfile.TemporaryDirectory(prefix="attnfuse-profile-") as scratch:
        folder = Path(scratch)
        mine = folder / "attnfuse.onnx"
        quantize = "int4" if args.int4 else None
        onnx.save(attnfuse.optimize_onnx(str(model.onnx_path()), quantize=quantize).proto, mine)
        for workload in decoder_workloads(model)[:2]:  # prefill, decode
            prompts = peer_prompts(model, workload)
            feeds = genai_feeds(genai_inputs, prompts, workload.step.past, kv_heads, head_dim)
            rows, walls = {}, {}
            rows["attnfuse"], walls["attnfuse"] = profile(str(mine), workload.feeds, args.threads, args.runs, folder)
            rows["genai"], walls["genai"] = profile(genai_model, feeds, args.threads, args.runs, folder)
            print(f"\n{model.name}, {workload.name}: batch {workload.step.batch} x {workload.step.new}, "
                  f"past {workload.step.past} ({args.threads} threads, {args.runs} runs)")
            print(table(rows, walls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
