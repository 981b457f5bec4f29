"""`attnfuse bench`: attnfuse against torch eager and the peers, in one process, on the same inputs.

Contenders, every ONNX one in ONNX Runtime (CPU, --threads intra-op threads, default graph
optimizations), and torch on as many threads:
  torch eager (SDPA) | ORT on the dynamo export | ORT on ORT's transformers optimizer output
  (TorchScript export, eager attention: the case where it fuses) | ORT on onnxscript's ort_fusions
  output (dynamo export) | attnfuse without and with padding-free (dynamo export).
Every output is compared with torch's on real positions; a wrong contender is timed and marked,
never dropped, and never counts as the fastest peer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from tqdm import tqdm

from attnfuse.tools.timing import interleaved_medians, ort_session, table

TOLERANCE = 1e-4  # max error on real positions, relative to the largest output magnitude, as the optimizer's check
TORCH = "torch eager (sdpa)"
ONNX_CONTENDERS = ("ORT", "ORT optimizer", "onnxscript", "attnfuse", "attnfuse padding-free")
CONTENDERS = (TORCH, *ONNX_CONTENDERS)
PEERS = CONTENDERS[:4]
SWEEP = (0.2, 0.4, 0.6, 0.8)  # padding 0 is the "full" workload, already measured
GEMM_SIZE = 2048

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


# ---- the models ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSpec:
    key: str  # as --model names it
    name: str
    module: object  # attnfuse.models.minilm or .bertbase: load_torch, exported, padded_batch
    batch: int
    max_length: int = 128

    def torch_model(self) -> torch.nn.Module:
        return self.module.load_torch("sdpa")

    def exported(self, dynamo: bool, attention: str) -> Path:
        return self.module.exported(dynamo=dynamo, attention=attention)


def model_specs(choice: str, quick: bool) -> list[ModelSpec]:
    from attnfuse.models import bertbase, minilm

    specs = [ModelSpec("minilm", "MiniLM-L6", minilm, batch=32), ModelSpec("bert-base", "BERT-base x4", bertbase, batch=16)]
    if quick:
        specs = [dataclasses.replace(spec, batch=4, max_length=32) for spec in specs]
    return [spec for spec in specs if choice in ("all", spec.key)]


@dataclasses.dataclass(frozen=True)
class Geometry:
    layers: int
    hidden: int
    heads: int
    intermediate: int

    @classmethod
    def of(cls, module: torch.nn.Module) -> Geometry:
        config = module.model.config  # read from the model, never assumed
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size)


def real_token_flops(lengths: np.ndarray, geometry: Geometry) -> int:
    """FLOPs the real tokens need: per token and layer, the q, k, v, output projections and the MLP,
    2*(4*h*h + 2*h*i); plus attention (q.k and p.v) over the token's own row, 4*L*h."""
    lengths = np.asarray(lengths, dtype=np.int64)
    h, i = geometry.hidden, geometry.intermediate
    per_layer = int(lengths.sum()) * 2 * (4 * h * h + 2 * h * i) + 4 * h * int((lengths ** 2).sum())
    return geometry.layers * per_layer


# ---- the workloads ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    feeds: dict[str, np.ndarray]

    @property
    def lengths(self) -> np.ndarray:
        return self.feeds["attention_mask"].sum(1)

    @property
    def padding(self) -> float:
        return 1.0 - float(self.feeds["attention_mask"].mean())


def lengths_for_padding(batch: int, max_length: int, padding: float, rng: np.random.Generator) -> np.ndarray:
    """Row lengths in [1, max_length] whose real tokens are (1 - padding) of batch x max_length, to the token.

    Lengths are uniform around their mean, as wide as [1, max_length] allows, then nudged one
    token at a time (random rows with room) until the total is exact."""
    target = max(batch, round((1.0 - padding) * batch * max_length))
    mean = target / batch
    spread = min(mean - 1, max_length - mean)
    lengths = np.clip(np.rint(rng.uniform(mean - spread, mean + spread, size=batch)), 1, max_length).astype(np.int64)
    while (gap := target - int(lengths.sum())) != 0:
        step = int(np.sign(gap))
        room = np.flatnonzero(lengths < max_length if step > 0 else lengths > 1)
        lengths[rng.permutation(room)[: abs(gap)]] += step
    return lengths


def with_lengths(feeds: dict[str, np.ndarray], lengths: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """A batch of the given row lengths, padded to `width`, cut from `feeds`' real tokens laid end
    to end (repeated as needed), so every workload of a model runs on the same text."""
    mask = feeds["attention_mask"].astype(bool)
    stream = feeds["input_ids"][mask]
    new_mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    input_ids = np.zeros_like(new_mask)
    input_ids[new_mask.astype(bool)] = np.resize(stream, int(new_mask.sum()))
    return {"input_ids": input_ids, "attention_mask": new_mask, "token_type_ids": np.zeros_like(new_mask)}


def workloads(spec: ModelSpec, sweep: bool, seed: int = 0) -> list[Workload]:
    varlen = spec.module.padded_batch(spec.batch, spec.max_length, seed=seed)
    full = np.full(spec.batch, spec.max_length)
    result = [Workload("varlen", varlen), Workload("full", with_lengths(varlen, full, spec.max_length))]
    rng = np.random.default_rng(seed)
    for padding in SWEEP if sweep else ():
        lengths = lengths_for_padding(spec.batch, spec.max_length, padding, rng)
        result.append(Workload(f"pad {padding:.1f}", with_lengths(varlen, lengths, spec.max_length)))
    return result


# ---- the contenders -----------------------------------------------------------------------------

def onnx_builders(spec: ModelSpec, geometry: Geometry) -> dict[str, Callable[[], onnx.ModelProto]]:
    """How each ONNX contender's model is made, as its user would make it."""
    import attnfuse

    dynamo = lambda: str(spec.exported(dynamo=True, attention="sdpa"))  # noqa: E731
    torchscript_eager = lambda: str(spec.exported(dynamo=False, attention="eager"))  # noqa: E731
    ort_geometry = dict(model_type="bert", num_heads=geometry.heads, hidden_size=geometry.hidden)
    return {
        "ORT": lambda: onnx.load(dynamo()),
        "ORT optimizer": lambda: peer_model(torchscript_eager(), "ort", **ort_geometry),
        "onnxscript": lambda: peer_model(dynamo(), "onnxscript"),
        "attnfuse": lambda: attnfuse.optimize_onnx(dynamo(), padding_free=False).proto,
        "attnfuse padding-free": lambda: attnfuse.optimize_onnx(dynamo()).proto,
    }


def peer_model(path: str, peer: str, **options) -> onnx.ModelProto:
    from attnfuse.models.peers import peer_fuse

    model, error = peer_fuse(path, peer, **options)
    if model is None:
        raise RuntimeError(error)
    return model


def ort_runner(model: onnx.ModelProto, threads: int) -> Runner:
    """The one way every ONNX contender runs: a CPU session with `threads` intra-op threads."""
    session = ort_session(model, threads)
    names = [i.name for i in session.get_inputs()]
    return lambda feeds: session.run(None, {name: feeds[name] for name in names})[0]


def torch_runner(module: torch.nn.Module) -> Runner:
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return module(**{name: torch.from_numpy(array) for name, array in feeds.items()}).numpy()
    return run


@dataclasses.dataclass
class Contender:
    name: str
    run: Runner | None = None
    error: str | None = None  # why it could not be built
    attention: str = ""  # "fused/total" attention sites of its model


def build_contenders(spec: ModelSpec, module: torch.nn.Module, threads: int, step: Callable[[str], None]) -> list[Contender]:
    from attnfuse.models._export import quiet
    from attnfuse.models.peers import count_attention, describe_error

    contenders = [Contender(TORCH, torch_runner(module))]
    for name, build in onnx_builders(spec, Geometry.of(module)).items():
        step(f"{spec.name}: {name}")
        try:
            with quiet():
                model = build()
            fused, total = count_attention(model)
            contenders.append(Contender(name, ort_runner(model, threads), attention=f"{fused}/{total}"))
        except Exception as error:  # a contender that cannot be built is a result, not a crash of the bench
            contenders.append(Contender(name, error=describe_error(error)))
    return contenders


# ---- measuring ----------------------------------------------------------------------------------

def relative_error(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> float:
    """Max error over real positions (padded ones are not part of the result), relative to the output's scale."""
    real = mask.astype(bool)
    return float(np.abs(actual[real] - expected[real]).max() / np.abs(expected[real]).max())


def measure(spec: ModelSpec, geometry: Geometry, workload: Workload, contenders: list[Contender], repeats: int) -> list[dict]:
    """Check every contender against torch, time them all interleaved, and return one record each."""
    feeds, mask = workload.feeds, workload.feeds["attention_mask"]
    runnable = [c for c in contenders if c.run is not None]
    outputs = {c.name: c.run(feeds) for c in runnable}
    errors = {name: relative_error(output, outputs[TORCH], mask) for name, output in outputs.items()}
    # The checking runs above are a first warm-up, and three more follow: torch needs a second before it
    # settles, and a fresh session's first runs were slow enough to skew the first workload measured.
    times = interleaved_medians({c.name: (lambda c=c: c.run(feeds)) for c in runnable}, repeats, warmup=3,
                                desc=f"{spec.name} {workload.name}")
    flops = real_token_flops(workload.lengths, geometry)
    records = []
    for c in contenders:
        seconds = times.get(c.name)
        records.append(dict(
            model=spec.name, workload=workload.name, batch=int(mask.shape[0]), width=int(mask.shape[1]),
            real_tokens=int(mask.sum()), padding=workload.padding, contender=c.name, peer=c.name in PEERS,
            attention_fused=c.attention or None, build_error=c.error,
            median_ms=None if seconds is None else seconds * 1e3,
            max_rel_error=errors.get(c.name), correct=errors.get(c.name, np.inf) <= TOLERANCE,
            real_gflops=None if seconds is None else flops / seconds / 1e9,
        ))
    add_speedups(records)
    return records


def add_speedups(records: list[dict]) -> None:
    """Ratios of times (>1: faster) against torch eager and against the fastest correct peer."""
    timed = [r for r in records if r["median_ms"] is not None]
    torch_ms = next(r["median_ms"] for r in timed if r["contender"] == TORCH)
    best = min((r for r in timed if r["peer"] and r["correct"]), key=lambda r: r["median_ms"])
    for r in records:
        ms = r["median_ms"]
        r["fastest_peer"] = best["contender"]
        r["vs_torch"] = None if ms is None else torch_ms / ms
        r["vs_fastest_peer"] = None if ms is None else best["median_ms"] / ms


def gemm_gflops(threads: int, repeats: int, size: int = GEMM_SIZE) -> float:
    """The machine's fp32 GEMM rate on `threads` threads: the ceiling real-token GFLOP/s is read against."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)  # warm-up
    seconds = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        torch.matmul(a, b)
        seconds.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(seconds) / 1e9


# ---- reporting ----------------------------------------------------------------------------------

def format_table(records: list[dict]) -> str:
    header = ["model", "workload", "pad", "contender", "attn", "median ms", "max rel err", "real GFLOP/s",
              "vs torch", "vs fastest peer"]
    rows = [[r["model"], r["workload"], f"{r['padding']:.0%}", r["contender"], r["attention_fused"] or "-",
             *timing_cells(r)] for r in records]
    return table(header, rows)


def timing_cells(r: dict) -> list[str]:
    if r["build_error"]:
        return [f"FAILED: {r['build_error'][:60]}", "", "", "", ""]
    verdict = "" if r["correct"] else " WRONG"
    return [f"{r['median_ms']:.1f}", f"{r['max_rel_error']:.1e}{verdict}", f"{r['real_gflops']:.1f}",
            speedup(r["vs_torch"]), speedup(r["vs_fastest_peer"])]


def summary_table(records: list[dict]) -> str:
    """attnfuse padding-free against the fastest correct peer, per workload, by padding."""
    mine = sorted((r for r in records if r["contender"] == "attnfuse padding-free"), key=lambda r: (r["model"], r["padding"]))
    rows = [[r["model"], r["workload"], f"{r['padding']:.0%}", r["fastest_peer"], *timing_cells(r)[:1],
             speedup(r["vs_fastest_peer"])] for r in mine]
    return table(["model", "workload", "pad", "fastest peer", "attnfuse pf ms", "speedup"], rows)


def speedup(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r["model"] for r in records):
        for contender, style in (("attnfuse padding-free", "o-"), ("attnfuse", "s--")):
            points = sorted((r["padding"], r["vs_fastest_peer"]) for r in records
                            if r["model"] == model and r["contender"] == contender and r["median_ms"] is not None)
            if points:
                axes.plot(*zip(*points), style, label=f"{model}: {contender}")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xlabel("padding fraction (padded positions / batch x max length)")
    axes.set_ylabel("speedup vs fastest peer (x)")
    axes.set_title("attnfuse on ONNX Runtime CPU vs the fastest peer")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


# ---- the command --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnfuse bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "bert-base", "all"), default="all")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads and torch threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each contender, median shown (default 5)")
    parser.add_argument("--sweep", action="store_true", help=f"also time padding fractions {', '.join(map(str, SWEEP))}")
    parser.add_argument("--quick", action="store_true", help="batch 4, max length 32, 2 repeats: for tests")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every measurement here")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="PNG of speedup vs padding fraction")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        records, gemm = run_all(model_specs(args.model, args.quick), args.sweep, args.threads, repeats)
    finally:
        torch.set_num_threads(threads_before)
    print(format_table(records))
    print()
    print(summary_table(records))
    print(f"\nfp32 GEMM on this machine: {gemm:.1f} GFLOP/s (torch.matmul {GEMM_SIZE}^3, {args.threads} threads); "
          f"ORT intra-op threads {args.threads}; median of {repeats} interleaved runs")
    if args.json:
        settings = dict(threads=args.threads, repeats=repeats, quick=args.quick, tolerance=TOLERANCE,
                        torch=torch.__version__, onnxruntime=__import__("onnxruntime").__version__)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(settings=settings, gemm_gflops=gemm, results=records), indent=1) + "\n")
    if args.plot:
        plot(records, args.plot)
    wrong = [f"{r['model']} {r['workload']} {r['contender']}" for r in records if r["median_ms"] is not None and not r["correct"]]
    if wrong:
        print(f"attnfuse bench: outputs differ from torch (> {TOLERANCE:g}): {'; '.join(wrong)}", file=sys.stderr)
    return 0


def run_all(specs: list[ModelSpec], sweep: bool, threads: int, repeats: int) -> tuple[list[dict], float]:
    plans = [(spec, workloads(spec, sweep)) for spec in specs]
    steps = 1 + sum(1 + len(ONNX_CONTENDERS) + len(loads) for _, loads in plans)
    records: list[dict] = []
    with tqdm(total=steps, desc="attnfuse bench", file=sys.stderr, disable=None) as bar:
        def step(description: str) -> None:
            bar.set_description(description)
            bar.update()

        step("GEMM rate")
        gemm = gemm_gflops(threads, repeats)
        for spec, loads in plans:
            step(f"{spec.name}: torch")
            module = spec.torch_model()
            geometry = Geometry.of(module)
            contenders = build_contenders(spec, module, threads, step)
            for workload in loads:
                step(f"{spec.name}: {workload.name}")
                records += measure(spec, geometry, workload, contenders, repeats)
    return records, gemm
