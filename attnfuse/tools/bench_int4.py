"""`attnfuse bench --model llama`'s int4 decode row: 4-bit weights (MatMulNBits, blocks of 32, symmetric),
one decode step over a padded cache, against the int4 models a user makes with the peers.

  ORT int4: ONNX Runtime's MatMulNBitsQuantizer on the dynamo export, run as it is
  onnxruntime-genai int4: genai's model builder with `-p int4` (its CPU default: blocks of 32, symmetric,
      accuracy_level 4, i.e. int8 activations inside MatMulNBits), through its Generator
  attnfuse int4: optimize_onnx(export, quantize="int4")

torch eager (fp32) runs beside them: every ONNX contender's logits and present k/v are compared with its
at real positions, to the int4 tolerance (bench.TOLERANCES); attnfuse int4, whose weights are ORT int4's,
is also compared with ORT int4 (`vs_int4_export`, to VERSUS_EXPORT). genai decodes over its own cache:
it is judged by its prompts' logits (the prefill workload's) against torch's, to the same tolerance.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from attnfuse.core.tolerance import INT8_ACTIVATIONS
from attnfuse.tools import bench
from attnfuse.tools.decoder_peers import peers
from attnfuse.tools.decoder_peers.prompts import Prompts, packed

INT4 = "int4"
# attnfuse int4 against ORT int4, whose weights it has: both quantize activations to int8 inside MatMulNBits
# (accuracy_level 4), where a rewrite's last-place differences flip some roundings by a step, so they agree to
# int8 activations' tolerance, not float32's (optimize_onnx proves the rewrite at float32's, by the twins).
VERSUS_EXPORT = INT8_ACTIVATIONS
WORKLOAD = "decode int4"
ORT = "ORT int4"
ATTNFUSE = "attnfuse int4"
GENAI = peers.GENAI_INT4.name
CONTENDERS = (bench.TORCH, ORT, GENAI, ATTNFUSE)


def onnx_contenders(path, threads: int, step: Callable[[str], None], label: str) -> list[bench.Contender]:
    """ORT int4 and attnfuse int4, built from the export at `path`."""
    import attnfuse
    from attnfuse.optimizer.io import load_model, to_proto
    from attnfuse.optimizer.quantize import Quantization, quantize

    builders = {ORT: lambda: to_proto(quantize(load_model(path), Quantization.INT4)),
                ATTNFUSE: lambda: attnfuse.optimize_onnx(str(path), quantize=INT4).proto}
    contenders = bench.build_contenders(label, None, builders, threads, step)[1:]  # [0]: a torch it does not run
    for contender in contenders:
        contender.precision, contender.peer = INT4, contender.name == ORT
    return contenders


def genai_error(opened: peers.OpenPeer, prefill_feeds: dict[str, np.ndarray], torch_logits: np.ndarray, pad: int
                ) -> float:
    """genai int4's prompts' logits against torch's, at real tokens (what judges its decode steps)."""
    prompts = Prompts.from_feeds(prefill_feeds, pad)
    lengths = prompts.lengths
    run = opened.prefill(prompts)
    got = run.logits(run.run())
    return bench.relative_error(packed(got, lengths, "right"), packed(torch_logits, lengths, "left"), np.True_)


@dataclasses.dataclass
class Int4Run:
    """What `run` needs from bench_decoder: the model, its built torch contender and the two workloads."""
    model: object  # bench_decoder.DecoderBench
    torch: bench.Contender
    prefill_feeds: dict[str, np.ndarray]
    decode: object  # bench_decoder.DecoderWorkload


def run(setup: Int4Run, threads: int, repeats: int, step: Callable[[str], None],
        workload_fields: Callable[[object, object], dict], real: Callable, flops: int) -> list[dict]:
    """The int4 decode row: every int4 contender checked and timed in one interleaved run with torch."""
    model, decode = setup.model, setup.decode
    onnx = [setup.torch, *onnx_contenders(model.onnx_path(), threads, step, model.name)]
    step(f"{model.name}: {GENAI}")
    entry, opened = _open_genai(model, threads)
    error = None
    if opened is not None:
        torch_logits = setup.torch.run(setup.prefill_feeds)[0]
        error = genai_error(opened, setup.prefill_feeds, torch_logits, model.pad)
    step(f"{model.name}: {WORKLOAD}")
    prompts = Prompts.of_lengths(decode.step.lengths, model.vocab, model.pad, width=decode.step.past + decode.step.new)
    runs = {GENAI: opened.decode(prompts, repeats + bench.WARMUPS)} if opened is not None else {}
    try:
        checked = peers.check_and_time(onnx, runs, decode.feeds, real, repeats, desc=f"{model.name} {WORKLOAD}")
    finally:
        for peer_run in runs.values():
            if peer_run.close is not None:
                peer_run.close()
    if error is not None:
        checked.errors[GENAI] = error
    versus_export = _versus_export(onnx, decode.feeds)
    workload = dataclasses.replace(decode, name=WORKLOAD)
    records = []
    for c in [*onnx, entry]:
        record = dict(workload_fields(model, workload), **bench.contender_record(c, checked, flops, (ORT, GENAI)))
        record.update(check="prompts' logits" if c.name == GENAI else "logits, present k/v", target=None, peak_mb=None,
                      vs_int4_export=versus_export if c.name == ATTNFUSE else None)
        if c.name == ATTNFUSE:  # the same weights as ORT int4: its outputs to int8 activations' tolerance
            record["correct"] = record["correct"] and versus_export is not None and versus_export <= VERSUS_EXPORT
        records.append(record)
    records.sort(key=lambda r: CONTENDERS.index(r["contender"]))
    bench.add_speedups(records)
    return records


def _open_genai(model, threads: int) -> tuple[bench.Contender, peers.OpenPeer | None]:
    from attnfuse.models._export import quiet
    from attnfuse.models.peers import describe_error

    peer = peers.GENAI_INT4
    reason, opened = peer.missing(), None
    if reason is None:
        try:
            with quiet():
                opened = peer.open(peer.built(model.folder()), threads)
        except Exception as error:  # a peer that cannot be built is a result, not a crash of the bench
            reason = describe_error(error)
    entry = bench.Contender(GENAI, error=reason, peer=True, precision=INT4 if reason is None else None,
                            attention=opened.attention if opened is not None else "")
    return entry, opened


def _versus_export(onnx: list[bench.Contender], feeds: dict[str, np.ndarray]) -> float | None:
    """attnfuse int4's largest error against ORT int4 (the same weights) over its outputs, at real positions."""
    from attnfuse.models.decoders.inputs import real_positions

    by_name = {c.name: c for c in onnx if c.run is not None}
    if ORT not in by_name or ATTNFUSE not in by_name:
        return None
    expected, got = by_name[ORT].run(feeds), by_name[ATTNFUSE].run(feeds)
    if len(expected) != len(got):
        return float("inf")
    names = ["logits", *(f"present.{i}" for i in range(len(expected) - 1))]
    return max(bench.relative_error(a, e, real_positions(n, feeds, e)) for a, e, n in zip(got, expected, names))


def is_int4_row(record: dict) -> bool:
    return record["workload"] == WORKLOAD


def markdown_table(records: list[dict]) -> str:
    """README-ready: each contender's decode step (ms, error against torch's fp32), attnfuse int4 against the
    fastest correct int4 peer, and against ORT int4 (its own weights)."""
    rows = [r for r in records if is_int4_row(r)]
    header = ["model", "workload", *(r["contender"] for r in rows), "attnfuse int4 vs fastest int4 peer"]
    cells = [_cell(r) for r in rows]
    mine = next((r for r in rows if r["contender"] == ATTNFUSE), None)
    first = rows[0] if rows else None
    if first is None:
        return ""
    label = f"{WORKLOAD}: {first['batch']} x {first['width']}, past {first['past']}, {first['padding']:.0%} padding"
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
             "| " + " | ".join([first["model"], label, *cells, _headline(mine, rows)]) + " |"]
    return "\n".join(lines)


def _cell(r: dict) -> str:
    if r["median_ms"] is None:
        return r["build_error"] or "failed"
    error = "" if r["max_rel_error"] is None else f", err {r['max_rel_error']:.2g}"
    return f"{r['median_ms']:.1f} ms{error}" + ("" if r["correct"] else " (wrong)")


def _headline(mine: dict | None, rows: list[dict]) -> str:
    if mine is None or mine["median_ms"] is None:
        return "-"
    peers = [r for r in rows if r["peer"] and r["correct"] and r.get("precision") == INT4 and r["median_ms"]]
    export = f"; vs ORT int4's outputs {mine['vs_int4_export']:.1g}" if mine.get("vs_int4_export") is not None else ""
    if not peers:
        return "no correct int4 peer" + export
    best = min(peers, key=lambda r: r["median_ms"])
    return f"**{bench.speedup(best['median_ms'] / mine['median_ms'])}** vs {best['contender']}{export}"
