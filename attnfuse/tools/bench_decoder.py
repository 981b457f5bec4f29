"""`attnfuse bench --model llama`: a Llama-shaped decoder with a KV cache, prefill and decode.

The model is attnfuse.models.decoders.bench's (hidden 1024, 16 query heads, 4 kv heads, 4 layers,
gated MLP 2816, random weights, exported by dynamo with past/present k/v); --quick takes the decoder
zoo's tiny Llama (hidden 64, 2 layers, 4 query heads, 2 kv heads) instead. Workloads:
  prefill  16 prompts, lengths uniform in [16, 256], left padded, past 0
  decode   batch 8, one new token over a past of 512 (the mask covers past + new)
Contenders: torch eager (the transformers model, SDPA, a DynamicCache made from the past k/v) | ORT
on the dynamo export | ORT on onnxscript's ort_fusions output of it | attnfuse (optimize_onnx on it,
default settings). Every output (logits and present k/v) is compared with torch's at real positions.
Peak memory: the resident high-water mark of a fresh process that loads the contender's model and
runs the workload once (attnfuse.tools.memory).
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from attnfuse.models.decoders import inputs as decoder_inputs
from attnfuse.models.decoders.bench import (
    VOCAB, bench_family, bench_inputs, decode_step, llama_bench_model, llama_bench_torch, prefill_step,
)
from attnfuse.models.decoders.wrappers import PAST_MODE
from attnfuse.tools import bench
from attnfuse.tools.memory import feeds_file, ort_peak_memory_mb, peak_memory_mb

CONTENDERS = (bench.TORCH, "ORT", "onnxscript", "attnfuse")
PEERS = CONTENDERS[:3]
TARGETS = {"prefill": 1.5, "decode": 1.2}  # the targets for attnfuse vs the fastest correct peer
ZOO_CASE = "llama-dynamo-sdpa-past"  # --quick: the decoder zoo's tiny Llama


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


def decoder_bench(quick: bool = False, vocab: int = VOCAB) -> DecoderBench:
    """The benchmark Llama with a `vocab`-token vocabulary, or (quick) the zoo's tiny Llama."""
    if quick:
        from attnfuse.models.decoders import cases

        case = cases.find(ZOO_CASE)
        config = cases.config(case)
        return DecoderBench(
            f"Llama tiny (hidden {config.hidden_size})", True, config.vocab_size, config,
            lambda: cases.build_torch(case), lambda: cases.exported(case), lambda step: cases.example(case, step),
            {"prefill": prefill_step(prompts=4, shortest=2, longest=16), "decode": decode_step(batch=2, past=16, shortest=2)})
    config = bench_family(vocab).make_config("sdpa")
    return DecoderBench(
        f"Llama h{config.hidden_size} x{config.num_hidden_layers}, vocab {vocab}", False, vocab, config,
        lambda: llama_bench_torch(vocab_size=vocab), lambda: llama_bench_model(vocab_size=vocab)[PAST_MODE],
        lambda step: bench_inputs(step, vocab_size=vocab), {"prefill": prefill_step(), "decode": decode_step()})


# ---- workloads and their arithmetic -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecoderWorkload:
    name: str
    step: decoder_inputs.Step
    feeds: dict[str, np.ndarray]

    @property
    def new_real(self) -> np.ndarray:
        """Real new tokens per row: the step's new tokens, fewer where a row is shorter (left padding)."""
        return np.minimum(self.step.new, np.asarray(self.step.lengths))

    @property
    def padding(self) -> float:
        """Padded fraction of the mask (past + new positions)."""
        return 1.0 - float(self.feeds["attention_mask"].mean())


def decoder_workloads(model: DecoderBench) -> list[DecoderWorkload]:
    return [DecoderWorkload(name, step, {k: v.numpy() for k, v in model.inputs(step).items()})
            for name, step in model.steps.items()]


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

def onnx_builders(path: Path) -> bench.OnnxBuilders:
    import onnx

    import attnfuse

    return {
        "ORT": lambda: onnx.load(path),
        "onnxscript": lambda: bench.peer_model(str(path), "onnxscript"),
        "attnfuse": lambda: attnfuse.optimize_onnx(str(path)).proto,
    }


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


def peak_memory(model: DecoderBench, contender: bench.Contender, feeds: dict[str, np.ndarray], threads: int) -> float | None:
    """The contender's peak resident MB in a fresh process, or None if it has no model or that run failed."""
    try:
        if contender.name == bench.TORCH:
            with feeds_file(feeds) as path:
                return peak_memory_mb(torch_peak_code(model, path, threads))
        if contender.model_file is not None:
            return ort_peak_memory_mb(contender.model_file, feeds, threads)
    except RuntimeError as error:
        print(f"attnfuse bench: no peak memory for {contender.name}: {error}", file=sys.stderr)
    return None


# ---- measuring ----------------------------------------------------------------------------------

def measure(model: DecoderBench, workload: DecoderWorkload, contenders: list[bench.Contender], output_names: list[str],
            repeats: int, threads: int, memory: bool) -> list[dict]:
    feeds = workload.feeds
    checked = bench.check_and_time(
        contenders, feeds, lambda outputs: [decoder_inputs.real_positions(name, feeds, out)
                                            for name, out in zip(output_names, outputs)],
        repeats, desc=f"{model.name} {workload.name}")
    flops = decoder_flops(model.config, workload.step)
    records = []
    for c in contenders:
        record = dict(model=model.name, workload=workload.name, batch=workload.step.batch, width=workload.step.new,
                      past=workload.step.past, real_tokens=int(workload.new_real.sum()), padding=workload.padding,
                      **bench.contender_record(c, checked, flops, PEERS))
        record.update(peak_mb=peak_memory(model, c, feeds, threads) if memory and c.error is None else None,
                      target=TARGETS.get(workload.name))
        records.append(record)
    bench.add_speedups(records)
    return records


def run(model: DecoderBench, threads: int, repeats: int, memory: bool, step: Callable[[str], None]) -> list[dict]:
    """Build every contender once, then check, time (and weigh) them on each workload."""
    loads = decoder_workloads(model)
    step(f"{model.name}: torch")
    module = model.torch_model()
    path = model.onnx_path()
    with tempfile.TemporaryDirectory(prefix="attnfuse-bench-") as folder:
        contenders = bench.build_contenders(model.name, bench.torch_runner(module, positional=True), onnx_builders(path),
                                            threads, step, save_to=Path(folder) if memory else None)
        records = []
        for workload in loads:
            step(f"{model.name}: {workload.name}")
            records += measure(model, workload, contenders, module.signature.output_names, repeats, threads, memory)
    return records


def progress_steps(model: DecoderBench) -> int:
    """The steps `run` reports: torch, each ONNX contender, each workload."""
    return len(CONTENDERS) + len(model.steps)


# ---- reporting ----------------------------------------------------------------------------------

def plot(records: list[dict], path: Path) -> None:
    """Per workload (columns): median ms and peak MB (rows) of each contender, bars marked with
    attnfuse's and every contender's ratio to the fastest correct peer, or why it does not count."""
    loads = list(dict.fromkeys(r["workload"] for r in records))
    figure, plt = bench.figure((4.5 * len(loads), 7))
    axes = figure.subplots(2, len(loads), squeeze=False)
    for column, workload in enumerate(loads):
        rows = [r for r in records if r["workload"] == workload]
        for row, (field, label) in enumerate((("median_ms", "median ms"), ("peak_mb", "peak MB (fresh process)"))):
            axis = axes[row][column]
            heights = [r[field] or 0.0 for r in rows]
            bars = axis.bar(range(len(rows)), heights, color=[f"C{i}" for i in range(len(rows))])
            for bar, r in zip(bars, rows):
                bar.set_hatch("" if r["correct"] else "//")
                note = bar_note(r) if field == "median_ms" else ("" if r[field] else "-")
                axis.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                              fontsize=7)
            axis.set_xticks(range(len(rows)), [r["contender"].replace(" (", "\n(") for r in rows], fontsize=7)
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
