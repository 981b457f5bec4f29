"""The `attnfuse bench` command: options, the run over every model and workload, the tables.

The contenders and their measurement live in bench.py (encoders), bench_decoder.py (llama),
bench_int8.py / bench_int4.py (quantized rows) and encoder_peers.py (OpenVINO, CTranslate2); this
module is the only one that imports them all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from attnfuse.models.decoders.bench import VOCAB
from attnfuse.tools import bench, bench_decoder, bench_int4, bench_int8, encoder_peers
from attnfuse.tools.bench import (
    GEMM_SIZE, MIN_COSINES, ONNX_CONTENDERS, PEERS, SWEEP, TOLERANCE, TOLERANCES, WARMUPS, Contender, Geometry,
    ModelSpec, build_contenders, format_table, gemm_gflops, measure, model_specs, onnx_builders, plot,
    summary_table, torch_runner, workloads, markdown_table,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnfuse bench", description=bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "bert-base", "all", "llama"), default="all",
                        help="all: MiniLM and BERT-base; llama: the decoder benchmark (prefill and decode)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads and torch threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each contender, median shown (default 5)")
    parser.add_argument("--sweep", action="store_true",
                        help=f"also time padding fractions {', '.join(map(str, SWEEP))} (encoders)")
    parser.add_argument("--vocab", type=int, default=None, metavar="N",
                        help="llama's vocabulary (default 32000, the full one; a smaller one shrinks the LM head)")
    parser.add_argument("--no-memory", action="store_true", help="llama: skip the peak-memory processes")
    parser.add_argument("--peers", type=peer_list, default=None, metavar="LIST",
                        help="encoders: the CPU runtimes to time besides ONNX Runtime, comma-separated: openvino, "
                             "ctranslate2, all or none (default all, none with --quick); one not installed is listed "
                             "as such (pip install -e .[bench]); with openvino, attnfuse's file for it runs there too")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=None,
                        help="encoders: also the int8 contenders (attnfuse --quantize int8 against quantize_dynamic of "
                             "each peer's model; attnfuse/tools/bench_int8.py); default on, off with --quick")
    parser.add_argument("--int4", action=argparse.BooleanOptionalAction, default=None,
                        help="llama: also the int4 decode row (attnfuse --quantize int4 against ORT on the int4 export "
                             "and onnxruntime-genai's int4 build; attnfuse/tools/bench_int4.py); default on, off with --quick")
    parser.add_argument("--quick", action="store_true",
                        help="encoders batch 4, max length 32; llama the zoo's tiny one; 2 repeats: for tests")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every measurement here")
    parser.add_argument("--plot", type=Path, metavar="PATH",
                        help="PNG: speedup vs padding fraction (encoders), time and peak memory (llama)")
    return parser


def peer_list(text: str) -> list[str]:
    """--peers: "all", "none" or runtime names separated by commas."""

    names = [name.strip() for name in text.split(",") if name.strip()]
    if names in (["all"], ["none"]):
        return list(encoder_peers.RUNTIMES) if names == ["all"] else []
    unknown = [name for name in names if name not in encoder_peers.RUNTIMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or repr(text)}: not one of {', '.join(encoder_peers.RUNTIMES)}, all, none")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    decoder = args.model == "llama"
    if args.vocab is not None and (not decoder or args.quick):
        parser.error("--vocab applies to --model llama without --quick")
    if args.sweep and decoder:
        parser.error("--sweep applies to the encoders (minilm, bert-base, all)")
    if args.vocab is not None and args.vocab < 3:
        parser.error("--vocab must be at least 3 (ids 0-2 are the special tokens)")
    if args.peers and decoder:
        parser.error("--peers applies to the encoders (minilm, bert-base, all)")
    if args.peers is None:
        args.peers = [] if args.quick or decoder else peer_list("all")
    if args.int8 and decoder:
        parser.error("--int8 applies to the encoders (minilm, bert-base, all)")
    if args.int8 is None:
        args.int8 = not (args.quick or decoder)
    if args.int4 and not decoder:
        parser.error("--int4 applies to --model llama")
    if args.int4 is None:
        args.int4 = decoder and not args.quick
    if decoder:
        args.vocab = args.vocab or VOCAB
    repeats = args.repeats or (2 if args.quick else 5)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        records, gemm = run_all(args, repeats)
    finally:
        torch.set_num_threads(threads_before)
    print(format_table(records))
    if not decoder:
        print()
        print(summary_table(records))
    if args.int8:
        print()
        print(bench_int8.summary_table(records))
    print(f"\nfp32 GEMM on this machine: {gemm:.1f} GFLOP/s (torch.matmul {GEMM_SIZE}^3, {args.threads} threads); "
          f"ORT intra-op threads {args.threads}; median of {repeats} interleaved runs after {WARMUPS} warm-ups")
    if decoder:
        print(decoder_notes(records, args))
    print()
    print(markdown_table([r for r in records if not bench_int8.is_int8_row(r) and not bench_int4.is_int4_row(r)]))
    for shown, module in ((args.int8, bench_int8), (args.int4, bench_int4)):
        if shown:
            print()
            print(module.markdown_table(records))
    if args.json:
        settings = dict(threads=args.threads, repeats=repeats, warmups=WARMUPS, quick=args.quick, tolerance=TOLERANCE,
                        tolerances=TOLERANCES, min_cosines=MIN_COSINES, torch=torch.__version__, onnxruntime=__import__("onnxruntime").__version__,
                        **peer_versions(args.peers))
        if decoder:
            settings.update(vocab=args.vocab, peak_memory=not args.no_memory)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(settings=settings, gemm_gflops=gemm, results=records), indent=1) + "\n")
    if args.plot:
        (bench_decoder.plot if decoder else plot)(records, args.plot)
    wrong = [f"{r['model']} {r['workload']} {r['contender']}" for r in records if r["median_ms"] is not None and not r["correct"]]
    if wrong:
        print(f"attnfuse bench: outputs differ from torch beyond their precision's tolerance ({TOLERANCES}; "
              f"min cosines {MIN_COSINES}): "
              f"{'; '.join(wrong)}", file=sys.stderr)
    return 0


def peer_versions(runtimes: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for runtime in runtimes:
        try:
            versions[runtime] = version(runtime)
        except PackageNotFoundError:
            pass
    return versions


def decoder_notes(records: list[dict], args: argparse.Namespace) -> str:
    full = "the full one" if args.vocab == VOCAB else f"reduced from {VOCAB}"
    vocab = "" if args.quick else f"vocabulary {args.vocab} ({full}); "
    memory = "not measured" if args.no_memory else "VmHWM of a fresh process that loads the model and runs the workload once"
    targets = ", ".join(f"{name} {ratio:g}x" for name, ratio in bench_decoder.TARGETS.items())
    return (f"{vocab}peak MB: {memory}\n"
            f"targets (attnfuse vs the fastest correct peer, reported, not asserted): {targets}")


def with_runtime_peers(contenders: list[Contender], spec: ModelSpec, module: torch.nn.Module, runtimes: list[str],
                       threads: int, step: Callable[[str], None]) -> list[Contender]:
    """`contenders` with the runtime peers after the ONNX Runtime peers, attnfuse's forms staying last."""
    peers = encoder_peers.peer_contenders(
        runtimes, module, encoder_peers.transformers_folder(spec.module, module),
        spec.module.padded_batch(2, min(16, spec.max_length), seed=1), threads, lambda name: step(f"{spec.name}: {name}"))
    split = max(i for i, c in enumerate(contenders) if c.name in PEERS) + 1
    return [*contenders[:split], *peers, *contenders[split:]]


def run_all(args: argparse.Namespace, repeats: int) -> tuple[list[dict], float]:
    plans = [(spec, workloads(spec, args.sweep)) for spec in model_specs(args.model, args.quick)]
    decoder = bench_decoder.decoder_bench(args.quick, args.vocab) if args.model == "llama" else None
    int8_steps = bench_int8.build_count() + 2 * ("openvino" in args.peers) if args.int8 else 0
    steps = 1 + sum(1 + len(ONNX_CONTENDERS) + len(args.peers) + ("openvino" in args.peers) + int8_steps + len(loads)
                    for _, loads in plans)
    steps += bench_decoder.progress_steps(decoder, args.int4) if decoder else 0
    records: list[dict] = []
    with tqdm(total=steps, desc="attnfuse bench", file=sys.stderr, disable=None) as bar:
        def step(description: str) -> None:
            bar.set_description(description)
            bar.update()

        step("GEMM rate")
        gemm = gemm_gflops(args.threads, repeats)
        for spec, loads in plans:
            step(f"{spec.name}: torch")
            module = spec.torch_model()
            geometry = Geometry.of(module)
            builders = bench_int8.cached(onnx_builders(spec, geometry))  # the int8 peers quantize these models
            contenders = build_contenders(spec.name, torch_runner(module), builders, args.threads, step)
            contenders = with_runtime_peers(contenders, spec, module, args.peers, args.threads, step)
            if "openvino" in args.peers:
                contenders += encoder_peers.attnfuse_openvino(spec, args.threads, step)
            if args.int8:
                export = lambda spec=spec: str(spec.exported(dynamo=True, attention="sdpa"))  # noqa: E731
                contenders += bench_int8.int8_contenders(builders, export, args.threads, step, spec.name)
                if "openvino" in args.peers:
                    contenders += encoder_peers.openvino_int8(spec, args.threads, step)
                    contenders += encoder_peers.attnfuse_openvino(spec, args.threads, step, quantize=bench_int8.INT8)
            for workload in loads:
                step(f"{spec.name}: {workload.name}")
                records += measure(spec, geometry, workload, contenders, repeats)
        if decoder:
            records += bench_decoder.run(decoder, args.threads, repeats, not args.no_memory, step, args.int4)
    return records, gemm
