"""How far issue 21's floors are from what this machine can do in float32: the decoder benchmark's weight
products alone, timed in ONNX Runtime beside attnfuse's own file, against what each floor asks.

    python benchmarks/peers/llama_bounds.py [--results benchmarks/results/llama_peers.json] [--threads 2]

For the benchmark Llama (random weights of its shapes: per layer q, k, v, o, gate, up, down; the LM head) one
ONNX graph applies every weight matrix to the rows a workload has: prefill its real tokens (padding-free
already), decode one row a sequence; and reads, once, the real cached keys and values a decode step attends
to (a sum over them). Every product is an output, so none is skipped. That graph is the least work of any
graph of this model: attention's arithmetic, norms, rotary, cache copies and all layout ops left out, the
products at ONNX Runtime's own MatMul kernels (what attnfuse's files, and onnxruntime-genai's, run). It runs
interleaved with attnfuse's file for the bench's export (optimize_onnx, default settings) on the bench's
feeds, so their ratio is the most attnfuse's step can still gain, whatever the machine's speed that minute.

A bench run's JSON (`attnfuse bench --model llama --json ...`) gives attnfuse's ratio to the fastest correct
float32 peer; a floor of F x that peer asks attnfuse for F / ratio. Where that is more than the most it can
gain, no float32 graph run by ONNX Runtime meets the floor on this machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FLOORS = {"prefill": 1.5, "decode": 1.1}  # issue 21: at least this many times the fastest f32 peer


def weight_shapes(config) -> list[tuple[int, int]]:
    """[K, N] of every weight matrix a token passes through (embeddings excepted: one row a token)."""
    hidden, head = config.hidden_size, config.hidden_size // config.num_attention_heads
    q, kv, mlp = config.num_attention_heads * head, config.num_key_value_heads * head, config.intermediate_size
    layer = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, mlp), (hidden, mlp), (mlp, hidden)]
    return layer * config.num_hidden_layers + [(hidden, config.vocab_size)]


def products_model(shapes: list[tuple[int, int]], seed: int = 0):
    """x_K @ W_i for every [K, N] in `shapes` (one input x_K [rows, K] per K, rows open), each an output; and
    the sum of an input `cache` [keys, width] (the cached keys and values a step must read once)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    widths = sorted({k for k, _ in shapes})
    nodes, weights, outputs = [], [], []
    for i, (k, n) in enumerate(shapes):
        weights.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["rows", n]))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["rows", k]) for k in widths]
    inputs.append(helper.make_tensor_value_info("cache", TensorProto.FLOAT, ["keys", "width"]))
    nodes.append(helper.make_node("ReduceSum", ["cache", helper.make_tensor("axis", TensorProto.INT64, [1], [0]).name],
                                  ["cache_read"]))
    weights.append(helper.make_tensor("axis", TensorProto.INT64, [1], [0]))
    outputs.append(helper.make_tensor_value_info("cache_read", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "weight_products", inputs, outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), widths


def timed_beside(shapes: list[tuple[int, int]], cache: tuple[int, int], mine: str, workloads: list, threads: int,
                 repeats: int) -> dict[str, tuple[float, float]]:
    """{workload: (median ms of the weight products on its rows and one read of its real cached keys and values
    (`cache`: how many [keys, width] tensors, k and v of each layer, and their width), of attnfuse's file `mine`
    on its feeds)}, interleaved, in ONNX Runtime as the bench runs it."""
    import onnx
    import onnxruntime as ort

    model, widths = products_model(shapes)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.force_spinning_stop", "1")
    with tempfile.TemporaryDirectory(prefix="attnfuse-bounds-") as folder:
        path = Path(folder) / "products.onnx"
        onnx.save(model, path, save_as_external_data=True)
        products = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    attnfuse = ort.InferenceSession(mine, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in attnfuse.get_inputs()]
    rng = np.random.default_rng(1)
    times = {}
    for workload in workloads:
        rows = int(workload.new_real.sum())
        least = {f"x{k}": rng.standard_normal((rows, k)).astype(np.float32) for k in widths}
        least["cache"] = rng.standard_normal((cache[0] * cached_keys(workload.step), cache[1])).astype(np.float32)
        runs = {"products": (products, least),
                "attnfuse": (attnfuse, {name: workload.feeds[name] for name in names})}
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(repeats + 1):
            for name, (session, feeds) in runs.items():
                start = time.perf_counter()
                session.run(None, feeds)
                if round_:  # the first round warms up
                    seconds[name].append(time.perf_counter() - start)
        times[workload.name] = (statistics.median(seconds["products"]) * 1e3, statistics.median(seconds["attnfuse"]) * 1e3)
    return times


def cached_keys(step) -> int:
    """The real cached keys of a step's rows, together (each row's past, its padding left out)."""
    return sum(min(length - step.new, step.past) for length in step.lengths) if step.past else 0


def fastest(results: list[dict], workload: str) -> tuple[dict | None, dict | None]:
    """The fastest correct float32 peer of `workload` in a bench run, and attnfuse's record."""
    rows = [r for r in results if r["workload"] == workload and r.get("median_ms") and r.get("correct")]
    peers = [r for r in rows if r.get("peer") and r.get("precision") == "f32"]
    mine = next((r for r in rows if r["contender"] == "attnfuse"), None)
    return (min(peers, key=lambda r: r["median_ms"]) if peers else None), mine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/llama_peers.json"),
                        help="a bench run's JSON (attnfuse bench --model llama --json PATH)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"no bench results at {args.results}")

    import onnx

    import attnfuse
    from attnfuse.tools.bench_decoder import decoder_bench, decoder_workloads

    model = decoder_bench()
    shapes = weight_shapes(model.config)
    workloads = [w for w in decoder_workloads(model) if w.name in FLOORS]
    run = json.loads(args.results.read_text())
    with tempfile.TemporaryDirectory(prefix="attnfuse-bounds-") as folder:
        mine = str(Path(folder) / "attnfuse.onnx")
        onnx.save(attnfuse.optimize_onnx(str(model.onnx_path())).proto, mine)
        config = model.config
        cache = (2 * config.num_hidden_layers,
                 config.num_key_value_heads * (config.hidden_size // config.num_attention_heads))
        times = timed_beside(shapes, cache, mine, workloads, args.threads, args.repeats)
    import torch

    from attnfuse.tools.bench import gemm_gflops

    torch.set_num_threads(args.threads)
    weights = sum(k * n for k, n in shapes)
    tokens = int(workloads[0].new_real.sum())
    decode_bytes = 4 * (weights + cache[0] * cache[1] * cached_keys(workloads[1].step))
    print(f"{model.name}, {args.threads} threads, median of {args.repeats} interleaved runs; peers from {args.results}")
    print(f"the weight products: prefill {2 * tokens * weights / times['prefill'][0] / 1e6:.0f} GFLOP/s on {tokens} "
          f"tokens (fp32 GEMM here: {gemm_gflops(args.threads, args.repeats):.0f}), decode "
          f"{decode_bytes / times['decode'][0] / 1e6:.1f} GB/s of weights and cache ({decode_bytes / 1e6:.0f} MB)")
    print("| workload | weight products (and cache read) alone | attnfuse here | most attnfuse can gain | attnfuse vs fastest f32 "
          "peer (bench run) | floor | gain it asks |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for workload in workloads:
        least, here = times[workload.name]
        peer, mine_record = fastest(run["results"], workload.name)
        if peer is None or mine_record is None:
            print(f"| {workload.name} | {least:.1f} ms | {here:.1f} ms | {here / least:.2f}x | no correct f32 peer | - | - |")
            continue
        ratio, floor = peer["median_ms"] / mine_record["median_ms"], FLOORS[workload.name]
        verdict = "within reach" if floor / ratio <= here / least else "more than it can gain"
        print(f"| {workload.name} | {least:.1f} ms | {here:.1f} ms | {here / least:.2f}x | {ratio:.2f}x "
              f"{peer['contender']} | {floor}x | {floor / ratio:.2f}x ({verdict}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
