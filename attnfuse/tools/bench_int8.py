"""`attnfuse bench`'s int8 rows (encoders): attnfuse's int8 model against the int8 models its users make
with the peers, in the same interleaved run as the f32 contenders.

  ORT int8, ORT optimizer int8, onnxscript int8: ONNX Runtime's quantize_dynamic (QInt8 weights, its
      default op types) of the plain dynamo export, of ORT's transformers optimizer output, of onnxscript's
      ort_fusions output, each with weights per channel and per tensor; the faster correct one is kept
      (bench.keep_faster_setting). ORT's optimizer output needs DefaultTensorType=FLOAT to quantize at all
      (its contrib ops defeat the quantizer's type inference), which every peer gets.
  CTranslate2 int8: a runtime peer (encoder_peers.py)
  OpenVINO int8 f32 / default (bf16): the export with OpenVINO's int8 weights, per output channel (encoder_peers.py)
  attnfuse int8: optimize_onnx(export, quantize="int8") (optimizer/quantize.py: per channel, MatMuls only)
  attnfuse int8 per tensor: the same from weights per tensor, to show why per channel
  attnfuse int8 (OpenVINO f32 / bf16): optimize_onnx(export, target="openvino", quantize="int8"), int8 weights in
      blocks of 32, OpenVINO quantizing the activations (the last two with --peers openvino)

Every contender here computes in int8 (bench.TOLERANCES["int8"]); each is also judged by the min cosine
of its sentence embeddings against torch's fp32, and a peer whose cosine is better than attnfuse's does
not count as slower at equal quality: the summary gives attnfuse's speedup against the fastest int8 peer
and against the fastest whose cosine attnfuse matches.
"""
from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import Callable

import onnx

from attnfuse.tools.bench import Contender, OnnxBuilders, ort_runner, speedup, cosine_cell, table
from attnfuse.tools.encoder_peers import attnfuse_on_openvino, openvino_int8_name

INT8 = "int8"
PEER_BASES = {"ORT int8": "ORT", "ORT optimizer int8": "ORT optimizer", "onnxscript int8": "onnxscript"}
OPENVINO_PEERS = tuple(openvino_int8_name(precision) for precision in ("f32", "bf16"))
ATTNFUSE = "attnfuse int8"
ATTNFUSE_PER_TENSOR = "attnfuse int8 per tensor"
ATTNFUSE_FORMS = (ATTNFUSE, *(attnfuse_on_openvino(precision, INT8) for precision in ("f32", "bf16")))
ORT_NAMES = (*PEER_BASES, ATTNFUSE_PER_TENSOR, ATTNFUSE)  # int8_contenders'; the others are OpenVINO's
NAMES = (*ORT_NAMES, *OPENVINO_PEERS, *ATTNFUSE_FORMS[1:])
SETTINGS = {"per channel": True, "per tensor": False}


def cached(builders: OnnxBuilders) -> OnnxBuilders:
    """The same builders, each making its model once (the int8 peers quantize the f32 peers' models)."""
    return {name: functools.cache(build) for name, build in builders.items()}


def quantize_dynamic(model: onnx.ModelProto, per_channel: bool, extra_options: dict | None = None,
                     **options) -> onnx.ModelProto:
    """ONNX Runtime's quantize_dynamic as a user runs it (through files), its advice to pre-process silenced."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    logging.disable(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="attnfuse-int8-") as folder:
            source, target = Path(folder) / "model.onnx", Path(folder) / "int8.onnx"
            onnx.save(model, source)
            ort_quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=per_channel,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, **(extra_options or {})},
                                 **options)
            return onnx.load(target)
    finally:
        logging.disable(logging.NOTSET)


def int8_builds(builders: OnnxBuilders, export: Callable[[], str]) -> list[tuple[str, str, bool, Callable]]:
    """(name, setting, peer, build) of each int8 contender; `builders` are bench's (cached), `export` the
    plain dynamo export's path."""
    import attnfuse

    def peer(base: str, per_channel: bool) -> Callable[[], onnx.ModelProto]:
        return lambda: quantize_dynamic(builders[base](), per_channel)

    def per_tensor() -> onnx.ModelProto:
        weights = quantize_dynamic(onnx.load(export()), per_channel=False, op_types_to_quantize=["MatMul"])
        return attnfuse.optimize_onnx(weights).proto

    builds = [(name, setting, True, peer(base, per_channel))
              for name, base in PEER_BASES.items() for setting, per_channel in SETTINGS.items()]
    return [*builds, (ATTNFUSE_PER_TENSOR, "", False, per_tensor),
            (ATTNFUSE, "", False, lambda: attnfuse.optimize_onnx(export(), quantize="int8").proto)]


def int8_contenders(builders: OnnxBuilders, export: Callable[[], str], threads: int, step: Callable[[str], None],
                    label: str) -> list[Contender]:
    """Every int8 contender built and ready to run; one that cannot be built stays with the reason."""
    from attnfuse.models._export import quiet
    from attnfuse.models.peers import count_attention, describe_error

    contenders = []
    for name, setting, peer, build in int8_builds(builders, export):
        step(f"{label}: {name}" + (f" ({setting})" if setting else ""))
        try:
            with quiet():
                model = build()
            fused, total = count_attention(model)
            contenders.append(Contender(name, ort_runner(model, threads), attention=f"{fused}/{total}",
                                        precision=INT8, setting=setting, peer=peer))
        except Exception as error:  # a contender that cannot be built is a result, not a crash of the bench
            contenders.append(Contender(name, error=describe_error(error), precision=INT8, setting=setting, peer=peer))
    return contenders


def build_count() -> int:
    """How many builds int8_contenders reports as steps."""
    return len(PEER_BASES) * len(SETTINGS) + 2


def is_int8_row(record: dict) -> bool:
    """A record of this module's contenders (CTranslate2 int8 is the runtime peers')."""
    return record["contender"] in NAMES


def fastest(records: list[dict], at_most_cosine: float | None = None) -> dict | None:
    """The fastest correct int8 peer (whose min cosine is at most `at_most_cosine`, if given)."""
    peers = [r for r in records if r["peer"] and r["correct"] and r.get("precision") == INT8 and r["median_ms"]
             and (at_most_cosine is None or (r.get("min_cosine") or -1.0) <= at_most_cosine)]
    return min(peers, key=lambda r: r["median_ms"]) if peers else None


def summary_rows(records: list[dict]) -> list[dict]:
    """Per model and workload: attnfuse's fastest correct int8 form against the fastest correct int8 peer, and
    against the fastest one whose sentence cosine is no better than attnfuse's (the one it beats at equal quality)."""
    rows = []
    for model, workload in dict.fromkeys((r["model"], r["workload"]) for r in records):
        same = [r for r in records if (r["model"], r["workload"]) == (model, workload)]
        forms = [r for r in same if r["contender"] in ATTNFUSE_FORMS and r["median_ms"]]
        correct = [r for r in forms if r["correct"]] or forms
        if not correct:
            continue
        mine = min(correct, key=lambda r: r["median_ms"])
        best, matched = fastest(same), fastest(same, mine.get("min_cosine"))
        rows.append(dict(model=model, workload=workload, form=_named(mine), padding=mine["padding"],
                         ms=mine["median_ms"], cosine=mine.get("min_cosine"), correct=mine["correct"],
                         fastest=_versus(mine, best), fastest_matched=_versus(mine, matched)))
    return rows


def _versus(mine: dict, peer: dict | None) -> dict | None:
    if peer is None:
        return None
    return dict(contender=_named(peer), ms=peer["median_ms"], cosine=peer.get("min_cosine"),
                speedup=peer["median_ms"] / mine["median_ms"],
                cosine_no_worse=(mine.get("min_cosine") or -1.0) >= (peer.get("min_cosine") or -1.0))


def _named(record: dict) -> str:
    return record["contender"] + (f" ({record['setting']})" if record.get("setting") else "")


def summary_table(records: list[dict]) -> str:
    def cells(versus: dict | None) -> list[str]:
        if versus is None:
            return ["-"] * 4
        return [versus["contender"], f"{versus['ms']:.1f}", cosine_cell(versus["cosine"]), speedup(versus["speedup"])]

    rows = [[r["model"], r["workload"], f"{r['padding']:.0%}", r["form"], f"{r['ms']:.1f}", cosine_cell(r["cosine"]),
             *cells(r["fastest"]), "yes" if r["fastest"] and r["fastest"]["cosine_no_worse"] else "no",
             *cells(r["fastest_matched"])] for r in summary_rows(records)]
    return table(["model", "workload", "pad", "attnfuse's fastest int8", "ms", "its min cos", "fastest int8 peer", "ms",
                  "min cos",
                  "speedup", "cos no worse", "fastest int8 peer attnfuse's cos matches", "ms", "min cos", "speedup"],
                 rows)


def markdown_table(records: list[dict]) -> str:
    """README-ready: a row per model and workload, each int8 contender's median ms and min cosine."""
    names = [*PEER_BASES, "CTranslate2 int8", *OPENVINO_PEERS, ATTNFUSE_PER_TENSOR, *ATTNFUSE_FORMS]
    shown = [name for name in names if any(r["contender"] == name for r in records)]
    header = ["model", "workload", *shown, "attnfuse's fastest int8 vs fastest int8 peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    by = {(r["model"], r["workload"], r["contender"]): r for r in records}
    for row in summary_rows(records):
        cells = [_markdown_cell(by.get((row["model"], row["workload"], name))) for name in shown]
        lines.append("| " + " | ".join([row["model"], row["workload"], *cells, _headline(row)]) + " |")
    return "\n".join(lines)


def _markdown_cell(r: dict | None) -> str:
    if r is None or r["median_ms"] is None:
        return "-" if r is None else "failed"
    setting = f" {r['setting']}" if r.get("setting") else ""
    wrong = "" if r["correct"] else " (wrong)"
    return f"{r['median_ms']:.0f} ms{setting}, cos {cosine_cell(r.get('min_cosine'))}{wrong}"


def _headline(row: dict) -> str:
    best, matched = row["fastest"], row["fastest_matched"]
    if best is None:
        return "-"
    text = f"{row['form']}: **{speedup(best['speedup'])}** vs {best['contender']}"
    if not best["cosine_no_worse"]:
        text += " (its cosine is better)"
        if matched is not None:
            text += f"; {speedup(matched['speedup'])} vs {matched['contender']}, the fastest at attnfuse's cosine or below"
    return text
