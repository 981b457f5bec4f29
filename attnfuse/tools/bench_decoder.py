"""`attnfuse bench --model llama`: a Llama-shaped decoder with a KV cache: prefill, decode, generation.

The model is attnfuse.models.decoders.bench's (hidden 1024, 16 query heads, 4 kv heads, 4 layers,
gated MLP 2816, random weights, exported by dynamo with past/present k/v, and saved as a
transformers folder for the runtimes that build their own model); --quick takes the decoder zoo's
tiny Llama (hidden 64, 2 layers, 4 query heads, 2 kv heads) instead. Workloads:
  prefill     16 prompts, lengths uniform in [16, 256], left padded, past 0
  decode      batch 8, one new token over a past of 512 (the mask covers past + new)
  generate N  N greedy tokens from the prefill prompts, end to end (N = NEW_TOKENS)
Contenders: torch eager (the transformers model, SDPA, a DynamicCache made from the past k/v; its
own `generate`) | ORT on the dynamo export | ORT on ORT's transformers optimizer output of it
(model types gpt2 and qwen3: it has no llama type) | ORT on onnxscript's ort_fusions output |
onnxruntime-genai and CTranslate2 (attnfuse.tools.decoder_peers: each built from the transformers
folder, taking its own prompt layout and keeping its own cache) | attnfuse (optimize_onnx on the
export, default settings). An ONNX contender's outputs (logits and present k/v) are compared with
torch's at real positions; a runtime peer's prefill logits likewise, and its decode by its greedy
tokens; every contender's generated tokens must equal torch's. Peak memory: the resident
high-water mark of a fresh process that loads the contender's model and runs the workload once
(attnfuse.tools.memory).
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from attnfuse.models.decoders import inputs as decoder_inputs
from attnfuse.models.decoders.bench import (
    VOCAB, bench_family, bench_inputs, decode_step, llama_bench_model, llama_bench_torch, prefill_step,
    transformers_folder,
)
from attnfuse.models.decoders.families import FAMILIES
from attnfuse.models.decoders.generate import greedy_torch_causal
from attnfuse.models.decoders.wrappers import PAST_MODE
from attnfuse.tools import bench
from attnfuse.tools.decoder_peers import generation, peers
from attnfuse.tools.decoder_peers.prompts import Prompts
from attnfuse.tools.memory import feeds_file, ort_peak_memory_mb, peak_memory_mb

ORT_OPTIMIZER_TYPES = ("gpt2", "qwen3")  # ORT's transformers optimizer has no llama type; these read decoders
ONNX_PEERS = ("ORT", *(f"ORT optimizer ({t})" for t in ORT_OPTIMIZER_TYPES), "onnxscript")
RUNTIME_PEERS = tuple(peer.name for peer in peers.runtime_peers())
CONTENDERS = (bench.TORCH, *ONNX_PEERS, *RUNTIME_PEERS, "attnfuse")
PEERS = CONTENDERS[:-1]
TARGETS = {"prefill": 1.5, "decode": 1.1}  # issue 21's targets for attnfuse vs the fastest correct peer
ZOO_CASE = "llama-dynamo-sdpa-past"  # --quick: the decoder zoo's tiny Llama
NEW_TOKENS = {False: 32, True: 8}  # generate N, by --quick
GENERATE_REPEATS = 3  # a generation takes seconds: its median is of 3 runs (at most --repeats) after the check


@dataclasses.dataclass(frozen=True)
class DecoderBench:
    """A decoder, how each side makes it, and its workloads' steps."""
    name: str
    quick: bool
    vocab: int
    config: object  # its transformers config: the geometry FLOPs are counted from
    torch_model: Callable[[], torch.nn.Module]  # the flat-signature wrapper (forward(input_ids, mask, positions, *past))
    onnx_path: Callable[[], Path]  # the dynamo export with past/present k/v
    inputs: Callable[[decoder_inputs.Step], dict[str, torch.Tensor]]
    steps: dict[str, decoder_inputs.Step]
    folder: Callable[[], Path]  # its transformers folder (save_pretrained), which the runtime peers build from
    new_tokens: int  # generate N

    @property
    def pad(self) -> int:
        return self.config.pad_token_id or 0


def decoder_bench(quick: bool = False, vocab: int = VOCAB) -> DecoderBench:
    """The benchmark Llama with a `vocab`-token vocabulary, or (quick) the zoo's tiny Llama."""
    if quick:
        from attnfuse.models.decoders import cases

        case = cases.find(ZOO_CASE)
        config = cases.config(case)
        return DecoderBench(
            f"Llama tiny (hidden {config.hidden_size})", True, config.vocab_size, config,
            lambda: cases.build_torch(case), lambda: cases.exported(case), lambda step: cases.example(case, step),
            {"prefill": prefill_step(prompts=4, shortest=2, longest=16), "decode": decode_step(batch=2, past=16, shortest=2)},
            lambda: transformers_folder(FAMILIES[case.family], case.attention), NEW_TOKENS[True])
    config = bench_family(vocab).make_config("sdpa")
    return DecoderBench(
        f"Llama h{config.hidden_size} x{config.num_hidden_layers}, vocab {vocab}", False, vocab, config,
        lambda: llama_bench_torch(vocab_size=vocab), lambda: llama_bench_model(vocab_size=vocab)[PAST_MODE],
        lambda step: bench_inputs(step, vocab_size=vocab), {"prefill": prefill_step(), "decode": decode_step()},
        lambda: transformers_folder(bench_family(vocab)), NEW_TOKENS[False])


# ---- workloads and their arithmetic -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecoderWorkload:
    name: str
    step: decoder_inputs.Step  # generate: its prompts' forward
    feeds: dict[str, np.ndarray]
    new_tokens: int = 0  # generate: tokens generated; 0: one forward

    @property
    def new_real(self) -> np.ndarray:
        """Real new tokens per row: the step's new tokens, fewer where a row is shorter (left padding)."""
        return np.minimum(self.step.new, np.asarray(self.step.lengths))

    @property
    def padding(self) -> float:
        """Padded fraction of the mask (past + new positions)."""
        return 1.0 - float(self.feeds["attention_mask"].mean())


def decoder_workloads(model: DecoderBench) -> list[DecoderWorkload]:
    """prefill, decode, and generate N (from the prefill prompts)."""
    loads = [DecoderWorkload(name, step, {k: v.numpy() for k, v in model.inputs(step).items()})
             for name, step in model.steps.items()]
    prefill = loads[0]
    return loads + [dataclasses.replace(prefill, name=f"generate {model.new_tokens}", new_tokens=model.new_tokens)]


def peer_prompts(model: DecoderBench, workload: DecoderWorkload) -> Prompts:
    """The workload's prompts for the runtime peers: a batch without a past is its own prompts; a
    decode step's rows are prompts of its rows' lengths (the same ids as its past and new token)."""
    if workload.step.past == 0:
        return Prompts.from_feeds(workload.feeds, model.pad)
    step = workload.step
    return Prompts.of_lengths(step.lengths, model.vocab, model.pad, width=step.past + step.new)


def decoder_flops(config, step: decoder_inputs.Step) -> int:
    """FLOPs the real new tokens need. Per token and layer, 2 x the projections' weights: q and o
    (hidden x heads*head), k and v (hidden x kv_heads*head), the gated MLP (3 x hidden x intermediate);
    plus attention over the row's real keys so far, 4 x heads*head per key (q.k and p.v); plus the LM
    head, 2 x hidden x vocab per token."""
    kv_heads, head, hidden = decoder_inputs.cache_geometry(config)
    q_width, kv_width = config.num_attention_heads * head, kv_heads * head
    per_token = 2 * (2 * hidden * q_width + 2 * hidden * kv_width + 3 * hidden * config.intermediate_size)
    tokens = keys = 0
    for length in step.lengths:
        new = min(step.new, length)  # the j-th real new token (1-based) sees length - new + j real keys
        tokens += new
        keys += new * (length - new) + new * (new + 1) // 2
    layers = config.num_hidden_layers * (tokens * per_token + 4 * q_width * keys)
    return layers + tokens * 2 * hidden * config.vocab_size


# ---- contenders ---------------------------------------------------------------------------------

class SameGraph(Exception):
    """A contender whose graph another contender already runs: listed with this reason, not run twice."""


def onnx_builders(path: Path, config) -> bench.OnnxBuilders:
    import onnx

    import attnfuse

    return {
        "ORT": lambda: onnx.load(path),
        **ort_optimizer_builders(path, config),
        "onnxscript": lambda: bench.peer_model(str(path), "onnxscript"),
        "attnfuse": lambda: attnfuse.optimize_onnx(str(path)).proto,
    }


def ort_optimizer_builders(path: Path, config) -> bench.OnnxBuilders:
    """ORT's transformers optimizer with each model type. A type that writes the graph an earlier type
    wrote raises SameGraph: a second session of one graph would only double the bench's memory and time."""
    geometry = dict(num_heads=config.num_attention_heads, hidden_size=config.hidden_size)
    written: dict[str, str] = {}  # graph digest -> the contender that runs it

    def build(name: str, model_type: str):
        model = bench.peer_model(str(path), "ort", model_type=model_type, **geometry)
        digest = graph_digest(model)
        if digest in written:
            raise SameGraph(f"the graph of {written[digest]}, not run twice")
        written[digest] = name
        return model

    names = {f"ORT optimizer ({t})": t for t in ORT_OPTIMIZER_TYPES}
    return {name: functools.partial(build, name, model_type) for name, model_type in names.items()}


def graph_digest(model) -> str:
    """The graph's nodes and its initializers' names and shapes (the weights are the export's)."""
    import hashlib

    digest = hashlib.sha1()
    for node in model.graph.node:
        digest.update(node.SerializeToString())
    for tensor in model.graph.initializer:
        digest.update(f"{tensor.name}{list(tensor.dims)}".encode())
    return digest.hexdigest()


def open_peers(model: DecoderBench, threads: int, step: Callable[[str], None]
               ) -> tuple[list[bench.Contender], dict[str, peers.OpenPeer]]:
    """Each runtime peer built from the model's transformers folder (on first use) and loaded; one
    that is not installed or cannot be built stays in the list with the reason."""
    from attnfuse.models._export import quiet
    from attnfuse.models.peers import describe_error

    entries, opened = [], {}
    for peer in peers.runtime_peers():
        step(f"{model.name}: {peer.name}")
        reason = peer.missing()
        if reason is None:
            try:
                with quiet():
                    opened[peer.name] = peer.open(peer.built(model.folder()), threads)
            except Exception as error:  # a peer that cannot be built is a result, not a crash of the bench
                reason = describe_error(error)
        entries.append(bench.Contender(peer.name, error=reason, peer=True, precision="f32" if reason is None else None,
                                       attention=opened[peer.name].attention if peer.name in opened else ""))
    return entries, opened


def torch_peak_code(model: DecoderBench, feeds_path: Path, threads: int) -> str:
    """Python for a fresh process that builds the torch contender and runs it once on the saved feeds."""
    return (
        "import numpy as np, torch\n"
        f"torch.set_num_threads({threads})\n"
        "from attnfuse.tools.bench_decoder import decoder_bench\n"
        f"module = decoder_bench(quick={model.quick}, vocab={model.vocab}).torch_model()\n"
        f"feeds = np.load({str(feeds_path)!r})\n"
        "with torch.inference_mode():\n"
        "    module(*[torch.from_numpy(feeds[name]) for name in module.signature.input_names])\n")


def peak_memory(model: DecoderBench, contender: bench.Contender, workload: DecoderWorkload, threads: int,
                opened: dict[str, peers.OpenPeer]) -> float | None:
    """The contender's peak resident MB in a fresh process, or None if it has no model or that run failed."""
    try:
        if contender.name == bench.TORCH:
            with feeds_file(workload.feeds) as path:
                return peak_memory_mb(torch_peak_code(model, path, threads))
        if contender.name in opened:
            return peers.peak_memory(opened[contender.name], peer_prompts(model, workload), workload.name, threads)
        if contender.model_file is not None:
            return ort_peak_memory_mb(contender.model_file, workload.feeds, threads)
    except RuntimeError as error:
        print(f"attnfuse bench: no peak memory for {contender.name}: {error}", file=sys.stderr)
    return None


# ---- measuring ----------------------------------------------------------------------------------

@dataclasses.dataclass
class BuiltContenders:
    """Everything `run` built: torch and the ONNX contenders (bench.Contender), the runtime peers
    (an entry each, with the reason where one did not open, and the opened ones), and torch's module."""
    onnx: list[bench.Contender]  # torch first
    peer_entries: list[bench.Contender]
    opened: dict[str, peers.OpenPeer]
    module: torch.nn.Module

    def in_order(self) -> list[bench.Contender]:
        return sorted(self.onnx + self.peer_entries, key=lambda c: CONTENDERS.index(c.name))


def measure(model: DecoderBench, workload: DecoderWorkload, built: BuiltContenders, tokens_equal: dict[str, bool],
            repeats: int, threads: int, memory: bool) -> list[dict]:
    """Prefill or decode: every contender checked against torch and timed in one interleaved run. A
    runtime peer's decode step is right if its greedy tokens were (`tokens_equal`, by contender)."""
    feeds, output_names = workload.feeds, built.module.signature.output_names
    prompts = peer_prompts(model, workload)
    steps = repeats + bench.WARMUPS  # a decode step's calls: the check, the warm-ups, the timed runs
    runs = {name: peer.prefill(prompts) if workload.step.past == 0 else peer.decode(prompts, steps)
            for name, peer in built.opened.items()}
    try:
        checked = peers.check_and_time(
            built.onnx, runs, feeds,
            lambda outputs: [decoder_inputs.real_positions(name, feeds, out) for name, out in zip(output_names, outputs)],
            repeats, desc=f"{model.name} {workload.name}")
    finally:
        for peer_run in runs.values():
            if peer_run.close is not None:
                peer_run.close()
    flops = decoder_flops(model.config, workload.step)
    records = []
    for c in built.in_order():
        record = dict(workload_fields(model, workload), **bench.contender_record(c, checked, flops, PEERS))
        by_tokens = c.name in runs and runs[c.name].logits is None and record["median_ms"] is not None
        if by_tokens:
            record["correct"] = tokens_equal.get(c.name, False)
        record.update(check=check_kind(c.name in built.opened, by_tokens), target=TARGETS.get(workload.name),
                      peak_mb=peak_memory(model, c, workload, threads, built.opened)
                      if memory and c.error is None else None)
        records.append(record)
    bench.add_speedups(records)
    return records


@dataclasses.dataclass
class Generation:
    """generate N: each contender's greedy tokens from the prefill prompts against torch's `generate`
    (checked before the other workloads: they judge the runtime peers' decode steps), and the end-to-end
    time (measured after them)."""
    generators: dict[str, generation.Generate]
    checked: bench.Checked
    mismatches: dict[str, str | None]

    @property
    def tokens_equal(self) -> dict[str, bool]:
        return {name: mismatch is None for name, mismatch in self.mismatches.items()}


def check_generation(model: DecoderBench, workload: DecoderWorkload, built: BuiltContenders) -> Generation:
    prompt = {name: workload.feeds[name] for name in ("input_ids", "attention_mask")}
    prompts, n = Prompts.from_feeds(prompt, model.pad), workload.new_tokens
    input_names = built.module.signature.input_names
    generators = {bench.TORCH: functools.partial(greedy_torch_causal, built.module.model, prompt, n)}
    generators.update({c.name: functools.partial(generation.greedy_over_runner, c.run, input_names, model.config,
                                                 prompt, n) for c in built.onnx[1:] if c.run is not None})
    generators.update({name: functools.partial(peer.generate, prompts, n) for name, peer in built.opened.items()})
    ends_at = {name: model.config.eos_token_id for name, peer in built.opened.items() if peer.peer.rows_end_at_eos}
    return Generation(generators, *generation.check(generators, ends_at))


def time_generation(model: DecoderBench, workload: DecoderWorkload, built: BuiltContenders, checked: Generation,
                    repeats: int) -> list[dict]:
    generation.time_generations(checked.checked, checked.generators, min(repeats, GENERATE_REPEATS),
                                desc=f"{model.name} {workload.name}")
    flops = generation.generation_flops(lambda step: decoder_flops(model.config, step), workload.step,
                                        workload.new_tokens)
    records = []
    for c in built.in_order():
        record = dict(workload_fields(model, workload), **bench.contender_record(c, checked.checked, flops, PEERS))
        record.update(check="greedy tokens", token_mismatch=checked.mismatches.get(c.name), target=None, peak_mb=None)
        records.append(record)
    bench.add_speedups(records)
    return records


def workload_fields(model: DecoderBench, workload: DecoderWorkload) -> dict:
    """The fields of a record that are about the model and the workload (the contender's come after)."""
    return dict(model=model.name, workload=workload.name, batch=workload.step.batch, width=workload.step.new,
                past=workload.step.past, new_tokens=workload.new_tokens, real_tokens=int(workload.new_real.sum()),
                padding=workload.padding)


def check_kind(runtime_peer: bool, by_tokens: bool) -> str:
    """What a prefill or decode record's `correct` rests on."""
    if by_tokens:
        return "greedy tokens"
    return "logits" if runtime_peer else "logits, present k/v"


def run(model: DecoderBench, threads: int, repeats: int, memory: bool, step: Callable[[str], None],
        int4: bool = False) -> list[dict]:
    """Build every contender once, then check, time (and weigh) them on each workload: generate N's
    tokens first, which judge the runtime peers' decode steps, its end-to-end times last; then, with
    `int4`, the int4 decode row (tools/bench_int4.py)."""
    loads = decoder_workloads(model)
    step(f"{model.name}: torch")
    module = model.torch_model()
    path = model.onnx_path()
    with tempfile.TemporaryDirectory(prefix="attnfuse-bench-") as folder:
        onnx_contenders = bench.build_contenders(model.name, bench.torch_runner(module, positional=True),
                                                 onnx_builders(path, model.config), threads, step,
                                                 save_to=Path(folder) if memory else None)
        built = BuiltContenders(onnx_contenders, *open_peers(model, threads, step), module)
        return_freed_memory()
        *forwards, generate = loads
        generated = check_generation(model, generate, built)
        records = []
        for workload in forwards:
            step(f"{model.name}: {workload.name}")
            records += measure(model, workload, built, generated.tokens_equal, repeats, threads, memory)
        step(f"{model.name}: {generate.name}")
        records += time_generation(model, generate, built, generated, repeats)
    if int4:
        records += int4_row(model, built, loads, threads, repeats, step)
    return records


def int4_row(model: DecoderBench, built: BuiltContenders, loads: list[DecoderWorkload], threads: int, repeats: int,
             step: Callable[[str], None]) -> list[dict]:
    from attnfuse.tools import bench_int4

    prefill, decode = loads[0], loads[1]
    names = built.module.signature.output_names
    real = lambda outputs: [decoder_inputs.real_positions(name, decode.feeds, out)  # noqa: E731
                            for name, out in zip(names, outputs)]
    setup = bench_int4.Int4Run(model, built.onnx[0], prefill.feeds, decode)
    return bench_int4.run(setup, threads, repeats, step, workload_fields, real,
                          decoder_flops(model.config, decode.step))


def return_freed_memory() -> None:
    """The optimizers and converters free gigabytes that the allocator keeps: hand them back to the system
    before the workloads fill every session's arena (glibc; elsewhere nothing happens)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def progress_steps(model: DecoderBench, int4: bool = False) -> int:
    """The steps `run` reports: torch, each ONNX contender, each runtime peer, each workload (and the int4 row's)."""
    return len(CONTENDERS) + len(model.steps) + 1 + (4 if int4 else 0)


# ---- reporting ----------------------------------------------------------------------------------

def plot(records: list[dict], path: Path) -> None:
    """Per workload (columns): median ms and, where measured, peak MB (rows) of each contender, bars
    marked with every contender's ratio to the fastest correct peer, or why it does not count."""
    loads = list(dict.fromkeys(r["workload"] for r in records))
    fields = [("median_ms", "median ms"), ("peak_mb", "peak MB (fresh process)")]
    fields = [(field, label) for field, label in fields if any(r.get(field) for r in records)]
    figure, plt = bench.figure((6 * len(loads), 1.5 + 3.5 * len(fields)))
    axes = figure.subplots(len(fields), len(loads), squeeze=False)
    for column, workload in enumerate(loads):
        rows = [r for r in records if r["workload"] == workload]
        for row, (field, label) in enumerate(fields):
            axis = axes[row][column]
            heights = [r[field] or 0.0 for r in rows]
            bars = axis.bar(range(len(rows)), heights, color=[f"C{i}" for i in range(len(rows))])
            for bar, r in zip(bars, rows):
                bar.set_hatch("" if r["correct"] else "//")
                note = bar_note(r) if field == "median_ms" else ("" if r[field] else "-")
                axis.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                              fontsize=7)
            axis.set_xticks(range(len(rows)), [r["contender"] for r in rows], fontsize=7, rotation=30, ha="right")
            axis.set_ylabel(label)
            axis.margins(y=0.15)
            if row == 0:
                axis.set_title(f"{workload}: batch {rows[0]['batch']} x {rows[0]['width']}, past {rows[0]['past']}",
                               fontsize=9)
    figure.suptitle(f"{records[0]['model']} on the CPU (hatched: wrong or failed)", fontsize=10)
    bench.save_figure(figure, plt, path)


def bar_note(r: dict) -> str:
    if r["median_ms"] is None:
        return "failed"
    return bench.speedup(r["vs_fastest_peer"]) + ("" if r["correct"] else "\nwrong")


def summary_table(records: list[dict]) -> str:
    """README-ready, a row per contender: prefill ms, decode ms per step, generate N end to end, whether
    its tokens were torch's, and its ratio to the fastest correct peer on each (>1: faster)."""
    by = {(r["workload"], r["contender"]): r for r in records}
    loads = list(dict.fromkeys(r["workload"] for r in records))
    generate = next((w for w in loads if w.startswith("generate")), None)
    header = ["contender", "attention fused", *(f"{w} ({unit(w)})" for w in loads), "tokens equal"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in dict.fromkeys(r["contender"] for r in records):
        first = next(by[(w, name)] for w in loads if (w, name) in by)
        cells = [name, first["attention_fused"] or "-", *(summary_cell(by.get((w, name))) for w in loads),
                 tokens_cell(by.get((generate, name)))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unit(workload: str) -> str:
    return "ms per step" if workload == "decode" else "ms"


def summary_cell(r: dict | None) -> str:
    if r is None or r["median_ms"] is None:
        return "-" if r is None or not r["build_error"] else r["build_error"]
    ms = r["median_ms"]
    cell = f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"
    ratio = f" ({bench.speedup(r['vs_fastest_peer'])})"
    return cell + ratio + ("" if r["correct"] else " wrong")


def tokens_cell(r: dict | None) -> str:
    if r is None or r["median_ms"] is None:
        return "-"
    return "yes" if r["token_mismatch"] is None else f"no: {r['token_mismatch']}"
