"""`attnfuse bench`: attnfuse against torch eager and the peers, in one process, on the same inputs.

Encoders (--model minilm, bert-base, all): every ONNX contender in ONNX Runtime (CPU, --threads
intra-op threads, default graph optimizations), and torch on as many threads:
  torch eager (SDPA) | ORT on the dynamo export | ORT on ORT's transformers optimizer output
  (TorchScript export, eager attention: the case where it fuses) | ORT on onnxscript's ort_fusions
  output (dynamo export) | the CPU runtimes users deploy instead (--peers; attnfuse/tools/encoder_peers.py):
  OpenVINO f32 and at its own precision, CTranslate2 f32 and int8 | attnfuse without and with padding-free
  (dynamo export) | with OpenVINO among the peers, attnfuse's file for it (--target openvino, verified there)
  in OpenVINO at f32 and, where the CPU has AVX512_BF16 or AMX, bf16, under both performance hints.
Decoders (--model llama): see attnfuse/tools/bench_decoder.py; prefill and decode with a KV cache,
and each contender's peak memory.
Every output is compared with torch's on real positions (and, for encoders, the mean-pooled sentence
embeddings by cosine); a wrong contender is timed and marked, never dropped, and never counts as the
fastest peer. Each contender computes at a precision ("f32", "bf16", "int8"), which sets its tolerance;
speedups are given against the fastest correct f32 peer and against the fastest correct peer of any precision.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from attnfuse.tools.timing import interleaved_medians, ort_session, table

TOLERANCE = 1e-4  # max error on real positions, relative to the largest output magnitude, as the optimizer's check
# A contender that computes in a lower precision is checked at that precision's tolerance: bf16 as the optimizer's
# tolerance policy has it (the same margin over its unit roundoff as f32's); int8, whose dynamic quantization
# rounds each GEMM's activations to 1/127 of their range, at 0.1 (CTranslate2's int8 MiniLM: 4e-2 to 7e-2, embeddings
# cosine 0.97 to 0.997), which still catches a wrong model (errors of order 1), where no cosine is measured. Where
# one is (the encoders' sentence embeddings), int8 is judged as its users judge it, by the min cosine against
# torch's fp32 (MIN_COSINES): weights per output channel give 0.987 to 0.995 on MiniLM, whichever tool quantized
# them, per tensor 0.92 to 0.93; a max relative error bound would split contenders of one cosine by their worst
# token (per channel: 0.05 to 0.12), and each is reported beside the other.
# int4 (4-bit weights in blocks of 32) moves the benchmark Llama's logits (random weights, which quantize worse
# than trained ones) by 0.34 (ORT int4, decode) to 0.39 (onnxruntime-genai int4, prompts): 0.5. attnfuse int4 is
# held to more: its outputs must also equal ORT int4's (the same weights) to TOLERANCE (tools/bench_int4.py).
INT4_TOLERANCE = 0.5
TOLERANCES = {"f32": TOLERANCE, "bf16": 5e-2, "int8": 1e-1, "int4": INT4_TOLERANCE}
MIN_COSINES = {"int8": 0.95}
NOT_INSTALLED = "not installed: pip install -e .[bench]"
TORCH = "torch eager (sdpa)"
ONNX_CONTENDERS = ("ORT", "ORT optimizer", "onnxscript", "attnfuse", "attnfuse padding-free")
CONTENDERS = (TORCH, *ONNX_CONTENDERS)
PEERS = CONTENDERS[:4]
SWEEP = (0.2, 0.4, 0.6, 0.8)  # padding 0 is the "full" workload, already measured
GEMM_SIZE = 2048

WARMUPS = 4  # the checking run and three more: torch needs a second before it settles, and a fresh
# session's first runs were slow enough to skew the first workload measured

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]  # feeds by name -> the outputs, in order


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

OnnxBuilders = dict[str, Callable[[], onnx.ModelProto]]


def onnx_builders(spec: ModelSpec, geometry: Geometry) -> OnnxBuilders:
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
    return lambda feeds: session.run(None, {name: feeds[name] for name in names})


def torch_runner(module: torch.nn.Module, positional: bool = False) -> Runner:
    """`module` called on the feeds by keyword, or in the feeds' order (a decoder's flat past k/v are *args)."""
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        tensors = {name: torch.from_numpy(array) for name, array in feeds.items()}
        with torch.inference_mode():
            out = module(*tensors.values()) if positional else module(**tensors)
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
    return run


@dataclasses.dataclass
class Contender:
    name: str
    run: Runner | None = None
    error: str | None = None  # why it could not be built (NOT_INSTALLED: a peer runtime that is missing)
    attention: str = ""  # "fused/total" attention sites of its model
    model_file: Path | None = None  # its ONNX file, where a fresh process is to load it (peak memory)
    precision: str | None = "f32"  # what it computes in: a key of TOLERANCES (None: unknown, it was not built)
    setting: str = ""  # one of several ways to run the same contender (OpenVINO's hints): the faster is kept
    peer: bool = False  # a peer whatever the caller's list of peer names says (the runtime peers)

    @property
    def key(self) -> str:
        """Its name in Checked: name and setting, unique among the contenders of a run."""
        return f"{self.name} ({self.setting})" if self.setting else self.name


def build_contenders(name: str, torch_run: Runner, builders: OnnxBuilders, threads: int, step: Callable[[str], None],
                     save_to: Path | None = None) -> list[Contender]:
    """Torch, then each ONNX contender built as `builders` say (and saved under `save_to`, if given);
    one that cannot be built stays in the list with the reason."""
    from attnfuse.models._export import quiet
    from attnfuse.models.peers import count_attention, describe_error

    contenders = [Contender(TORCH, torch_run)]
    for contender, build in builders.items():
        step(f"{name}: {contender}")
        try:
            with quiet():
                model = build()
            fused, total = count_attention(model)
            model_file = None
            if save_to is not None:
                model_file = save_to / f"{contender.replace(' ', '-')}.onnx"
                onnx.save(model, model_file)
            contenders.append(Contender(contender, ort_runner(model, threads), attention=f"{fused}/{total}",
                                        model_file=model_file))
        except Exception as error:  # a contender that cannot be built is a result, not a crash of the bench
            contenders.append(Contender(contender, error=describe_error(error)))
    return contenders


# ---- measuring ----------------------------------------------------------------------------------

def relative_error(actual: np.ndarray, expected: np.ndarray, real: np.ndarray) -> float:
    """Max error over the `real` positions (a boolean array broadcastable to the output; padded positions
    are not part of the result), relative to the output's largest magnitude there."""
    if actual.shape != expected.shape:
        return np.inf
    real = np.broadcast_to(real, expected.shape)
    return float(np.abs(actual[real] - expected[real]).max() / np.abs(expected[real]).max())


def max_relative_error(actual: list[np.ndarray], expected: list[np.ndarray], real: list[np.ndarray]) -> float:
    """The worst output's relative error; a contender with other outputs than torch's is wrong."""
    if len(actual) != len(expected):
        return np.inf
    return max(relative_error(a, e, r) for a, e, r in zip(actual, expected, real))


@dataclasses.dataclass
class Checked:
    """What check_and_time found, by contender key."""
    seconds: dict[str, float]
    errors: dict[str, float]  # max relative error against torch at real positions
    failures: dict[str, str]  # why its run failed
    cosines: dict[str, float] = dataclasses.field(default_factory=dict)  # min cosine of its sentence embeddings

Similarity = Callable[[list[np.ndarray], list[np.ndarray]], float]  # (outputs, torch's) -> min cosine


def sentence_cosine(mask: np.ndarray) -> Similarity:
    """The min cosine between the mean-pooled, normalized embeddings (what sentence-transformers computes
    for MiniLM) of a contender's first output and torch's, over the batch's rows."""
    from attnfuse.models.minilm import sentence_embeddings
    from attnfuse.tools.demo import cosine_similarity

    def cosine(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
        if actual[0].shape != expected[0].shape:
            return -1.0
        pair = (sentence_embeddings(out.astype(np.float32), mask) for out in (actual[0], expected[0]))
        return float(cosine_similarity(*pair).min())
    return cosine


def check_and_time(contenders: list[Contender], feeds: dict[str, np.ndarray],
                   real: Callable[[list[np.ndarray]], list[np.ndarray]], repeats: int, desc: str,
                   cosine: Similarity | None = None) -> Checked:
    """Run each contender once and compare its outputs with torch's (the first contender) at the positions
    `real(torch's outputs)` marks (and by `cosine`, if given), one contender at a time so that only torch's
    outputs are kept; then time those that ran, interleaved, after WARMUPS runs (the checking run is the first)."""
    from attnfuse.models.peers import describe_error

    checked = Checked({}, {}, {})
    expected = positions = None
    for c in contenders:
        if c.run is None:
            continue
        try:
            outputs = c.run(feeds)
        except Exception as error:  # a contender that fails on the workload is a result too
            if expected is None:
                raise  # torch's outputs are the reference: nothing can be checked without them
            checked.failures[c.key] = f"run failed: {describe_error(error)}"
            continue
        if expected is None:
            expected, positions = outputs, real(outputs)
        checked.errors[c.key] = max_relative_error(outputs, expected, positions)
        if cosine is not None:
            checked.cosines[c.key] = cosine(outputs, expected)
        del outputs
    del expected
    ran = [c for c in contenders if c.key in checked.errors]
    checked.seconds = interleaved_medians({c.key: (lambda c=c: c.run(feeds)) for c in ran}, repeats,
                                          warmup=WARMUPS - 1, desc=desc)
    return checked


def contender_record(c: Contender, checked: Checked, flops: int, peers: tuple[str, ...]) -> dict:
    """The fields of a record that are about the contender (the model's and workload's come before)."""
    seconds, error = checked.seconds.get(c.key), checked.errors.get(c.key)
    tolerance = TOLERANCES.get(c.precision, TOLERANCE)
    cosine, min_cosine = checked.cosines.get(c.key), MIN_COSINES.get(c.precision)
    judged_by_cosine = cosine is not None and min_cosine is not None
    correct = error is not None and (cosine >= min_cosine if judged_by_cosine else error <= tolerance)
    return dict(
        contender=c.name, peer=c.peer or c.name in peers, attention_fused=c.attention or None,
        build_error=c.error or checked.failures.get(c.key),
        median_ms=None if seconds is None else seconds * 1e3,
        max_rel_error=error, correct=correct,
        real_gflops=None if seconds is None else flops / seconds / 1e9,
        precision=c.precision, setting=c.setting or None, tolerance=tolerance, min_cosine=cosine,
        min_cosine_bound=min_cosine if judged_by_cosine else None,
    )


def measure(spec: ModelSpec, geometry: Geometry, workload: Workload, contenders: list[Contender], repeats: int) -> list[dict]:
    """Check every contender against torch, time them all interleaved, and return one record each."""
    feeds, mask = workload.feeds, workload.feeds["attention_mask"]
    checked = check_and_time(contenders, feeds, lambda outputs: [mask[:, :, None].astype(bool)] * len(outputs),
                             repeats, desc=f"{spec.name} {workload.name}", cosine=sentence_cosine(mask))
    flops = real_token_flops(workload.lengths, geometry)
    records = [dict(model=spec.name, workload=workload.name, batch=int(mask.shape[0]), width=int(mask.shape[1]),
                    real_tokens=int(mask.sum()), padding=workload.padding,
                    **contender_record(c, checked, flops, PEERS)) for c in contenders]
    records = keep_faster_setting(records)
    add_speedups(records)
    return records


def keep_faster_setting(records: list[dict]) -> list[dict]:
    """One record per contender name: of those run with several settings (OpenVINO's hints), the fastest
    correct one (else the fastest), with every setting's time in `setting_ms`."""
    by_name: dict[str, list[dict]] = {}
    for r in records:
        by_name.setdefault(r["contender"], []).append(r)
    kept = []
    for same in by_name.values():
        if len(same) == 1:
            kept.append(same[0])
            continue
        best = min(same, key=lambda r: (not r["correct"], r["median_ms"] is None, r["median_ms"] or 0.0))
        kept.append(dict(best, setting_ms={r["setting"]: r["median_ms"] for r in same}))
    return kept


def add_speedups(records: list[dict]) -> None:
    """Ratios of times (>1: faster) against torch eager, against the fastest correct f32 peer (fastest_peer,
    vs_fastest_peer) and against the fastest correct peer of any precision (..._any_precision)."""
    timed = [r for r in records if r["median_ms"] is not None]
    torch_ms = next(r["median_ms"] for r in timed if r["contender"] == TORCH)
    for suffix, precisions in (("", {"f32"}), ("_any_precision", None)):
        best = fastest_correct_peer(timed, precisions)
        for r in records:
            ms = r["median_ms"]
            r["fastest_peer" + suffix] = best and best["contender"]
            r["vs_fastest_peer" + suffix] = None if ms is None or best is None else best["median_ms"] / ms
    for r in records:
        r["vs_torch"] = None if r["median_ms"] is None else torch_ms / r["median_ms"]


def fastest_correct_peer(timed: list[dict], precisions: set[str] | None) -> dict | None:
    """The fastest correct peer computing in one of `precisions` (None: any); records without a precision are f32."""
    peers = [r for r in timed if r["peer"] and r["correct"] and (precisions is None or r.get("precision", "f32") in precisions)]
    return min(peers, key=lambda r: r["median_ms"]) if peers else None


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
    memory = any(r.get("peak_mb") for r in records)
    cosine = any(r.get("min_cosine") is not None for r in records)
    header = ["model", "workload", "pad", "contender", "prec", "attn", "median ms", "max rel err",
              *(["min cos"] if cosine else []), "real GFLOP/s", "vs torch", "vs fastest f32 peer",
              "vs fastest peer any prec", *(["peak MB"] if memory else [])]
    rows = [[r["model"], r["workload"], f"{r['padding']:.0%}", contender_label(r), r.get("precision") or "-",
             r["attention_fused"] or "-", *timing_cells(r, cosine), *([megabytes(r.get("peak_mb"))] if memory else [])]
            for r in records]
    return table(header, rows)


def contender_label(r: dict) -> str:
    """Its name, and the setting kept where it ran with several (OpenVINO's hint)."""
    return f"{r['contender']} ({r['setting']})" if r.get("setting") else r["contender"]


def timing_cells(r: dict, cosine: bool = False) -> list[str]:
    """median, error (and min cosine), GFLOP/s, and speedups vs torch, the fastest f32 peer and any peer."""
    blank = [""] * (5 + cosine)
    if r["build_error"] == NOT_INSTALLED:
        return [NOT_INSTALLED, *blank]
    if r["build_error"]:
        return [f"FAILED: {r['build_error'][:60]}", *blank]
    verdict = "" if r["correct"] else " WRONG"
    cos = [cosine_cell(r.get("min_cosine"))] if cosine else []
    return [f"{r['median_ms']:.1f}", f"{r['max_rel_error']:.1e}{verdict}", *cos, f"{r['real_gflops']:.1f}",
            speedup(r["vs_torch"]), speedup(r["vs_fastest_peer"]), speedup(r.get("vs_fastest_peer_any_precision"))]


def cosine_cell(cosine: float | None) -> str:
    return "-" if cosine is None else f"{cosine:.5f}"


def summary_table(records: list[dict]) -> str:
    """Per workload, attnfuse's fastest correct f32 form against the fastest correct f32 peer, and its fastest correct
    form of any precision whose embeddings cosine is no worse than that peer's against the fastest correct peer of
    any precision."""
    rows = []
    for (model, workload), group in by_workload(records).items():
        by_name = {r["contender"]: r for r in group}
        other = by_name.get(group[0].get("fastest_peer_any_precision"))
        floor = (other or {}).get("min_cosine") or -1.0
        f32 = fastest_mine(group, lambda r: r.get("precision") == "f32")
        any_precision = fastest_mine(group, lambda r: (r.get("min_cosine") or 1.0) >= floor)
        rows.append([model, workload, percent(group[0]["padding"]), group[0]["fastest_peer"] or "-",
                     *mine_cells(f32, "vs_fastest_peer"), (other or {}).get("contender", "-"), cosine_cell(floor),
                     *mine_cells(any_precision, "vs_fastest_peer_any_precision"),
                     cosine_cell((any_precision or {}).get("min_cosine"))])
    return table(["model", "workload", "pad", "fastest f32 peer", "attnfuse's fastest f32 form", "ms", "speedup",
                  "fastest peer", "its min cos", "attnfuse's fastest form at a cos no worse", "ms", "speedup",
                  "its min cos"], rows)


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.0%}"


def by_workload(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    grouped: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        grouped.setdefault((r["model"], r["workload"]), []).append(r)
    return grouped


def fastest_mine(records: list[dict], keep: Callable[[dict], bool]) -> dict | None:
    """The fastest correct attnfuse form (a contender that is no peer) that `keep` keeps."""
    mine = [r for r in records if not r["peer"] and r["correct"] and r["median_ms"] is not None and keep(r)]
    return min(mine, key=lambda r: r["median_ms"]) if mine else None


def mine_cells(r: dict | None, ratio: str) -> list[str]:
    return ["-", "-", "-"] if r is None else [contender_label(r), f"{r['median_ms']:.1f}", speedup(r[ratio])]


def markdown_table(records: list[dict]) -> str:
    """README-ready: a row per model and workload, a column per contender (median ms, its peak MB where
    measured), and the last contender (attnfuse's best) against the fastest correct peer."""
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for r in records:
        rows.setdefault((r["model"], r["workload"]), {})[r["contender"]] = r
    contenders = column_order([list(by_contender) for by_contender in rows.values()])
    header = ["model", "workload", *contenders, f"{contenders[-1]} vs fastest peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (model, _), by_contender in rows.items():
        first, mine = next(iter(by_contender.values())), by_contender.get(contenders[-1])
        cells = [model, workload_label(first), *(markdown_cell(by_contender.get(c)) for c in contenders),
                 headline(mine)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def column_order(rows: list[list[str]]) -> list[str]:
    """Every name of every row, each row's names in its order: a name that only some rows have (a peer
    that failed to build for one model) goes after the name that comes before it in its row."""
    order: list[str] = []
    for names in rows:
        place = 0
        for name in names:
            if name in order:
                place = order.index(name) + 1
            else:
                order.insert(place, name)
                place += 1
    return order


def workload_label(r: dict) -> str:
    past = f", past {r['past']}" if r.get("past") else ""
    return f"{r['workload']}: {r['batch']} x {r['width']}{past}, {r['padding']:.0%} padding"


def markdown_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["build_error"] == NOT_INSTALLED:
        return "not installed"
    if r["median_ms"] is None:
        return "failed"
    ms = r["median_ms"]
    cell = f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"
    cell += "" if r["correct"] else " (wrong)"
    return cell + (f", {megabytes(r['peak_mb'])} MB" if r.get("peak_mb") else "")


def headline(r: dict | None) -> str:
    if r is None or r["median_ms"] is None:
        return "-"
    target = f" (target {r['target']:g}x)" if r.get("target") else ""
    wrong = "" if r["correct"] else ", wrong: does not count"
    other = r.get("fastest_peer_any_precision")
    any_precision = f"; {speedup(r['vs_fastest_peer_any_precision'])} vs {other}" if other and other != r["fastest_peer"] else ""
    return f"**{speedup(r['vs_fastest_peer'])}** vs {r['fastest_peer']}{target}{any_precision}{wrong}"


def speedup(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def megabytes(mb: float | None) -> str:
    return "-" if mb is None else f"{mb:.0f}"


def figure(size: tuple[float, float] = (7, 4.5)):
    """A new matplotlib figure (no display needed), and pyplot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(figsize=size, layout="constrained"), plt


def save_figure(fig, plt, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot(records: list[dict], path: Path) -> None:
    """Speedup against the fastest peer by padding fraction, per model."""
    fig, plt = figure()
    axes = fig.subplots()
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
    save_figure(fig, plt, path)
