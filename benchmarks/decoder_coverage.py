"""How much of the decoder zoo does attnfuse fuse? For every case (family x exporter x
attention x cache): attention sites fused / found, the Softmax nodes of the file, the other
fused ops, and the first reason a site was left alone (or the error that stopped inspect).

    python -m benchmarks.decoder_coverage [--cases llama gpt2-dynamo] [--out coverage.json]

(from the repository root). Unavailable cases are listed with their reason.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import onnx

import attnfuse
from attnfuse.models import decoders
from attnfuse.tools.timing import table


def softmax_count(path) -> int:
    return sum(node.op_type == "Softmax" for node in onnx.load(path, load_external_data=False).graph.node)


def first_reason(report) -> str:
    return next((site.reason for site in report.sites if not site.fused), "")


def measure(case: decoders.DecoderCase) -> dict:
    record = {"case": case.id, "unavailable": case.unavailable, "softmax": None, "fused": None, "total": None,
              "fused_ops": {}, "reason": "", "error": None, "seconds": None}
    if case.unavailable:
        return record
    path = decoders.exported(case)
    record["softmax"] = softmax_count(path)
    start = time.perf_counter()
    try:
        report = attnfuse.inspect_onnx(str(path))
    except Exception as failure:  # a baseline: record what stopped inspect, go on with the next case
        record["error"] = f"{type(failure).__name__}: {str(failure).strip()}"[:600]
    else:
        record.update(fused=report.attention_fused, total=report.attention_total, fused_ops=dict(report.fused_ops),
                      reason=first_reason(report))
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def shorten(text: str, head: int = 40, tail: int = 90) -> str:
    """The start and the end of a long message: which stage failed, and the detail."""
    text = " ".join(text.split())
    return text if len(text) <= head + tail + 5 else f"{text[:head]} ... {text[-tail:]}"


def row(record: dict) -> list[str]:
    if record["unavailable"]:
        return [record["case"], "-", "-", "-", f"unavailable: {record['unavailable']}"]
    if record["error"]:
        return [record["case"], "error", str(record["softmax"]), "", shorten(record["error"])]
    ops = ",".join(f"{op}:{n}" for op, n in sorted(record["fused_ops"].items()))
    return [record["case"], f"{record['fused']}/{record['total']}", str(record["softmax"]), ops,
            shorten(record["reason"])]


def summary(records: list[dict]) -> str:
    measured = [r for r in records if not r["unavailable"]]
    complete = sum(1 for r in measured if not r["error"] and r["total"] and r["fused"] == r["total"]
                   and r["total"] == r["softmax"])
    errors = sum(1 for r in measured if r["error"])
    fused = sum(r["fused"] or 0 for r in measured)
    softmax = sum(r["softmax"] or 0 for r in measured)
    return (f"{len(measured)} cases ({len(records) - len(measured)} unavailable): {complete} with every site fused, "
            f"{errors} errors; sites fused {fused} of {softmax} Softmax nodes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", help="case id prefixes, e.g. llama gpt2-dynamo (default: all)")
    parser.add_argument("--out", help="write the records as JSON here")
    args = parser.parse_args(argv)
    chosen = [c for c in decoders.CASES if not args.cases or any(c.id.startswith(p) for p in args.cases)]
    records = []
    for case in chosen:
        records.append(measure(case))
        print(" | ".join(row(records[-1])), file=sys.stderr, flush=True)
    print(table(["case", "fused/found", "softmax", "fused ops", "first reason"], [row(r) for r in records]))
    print(summary(records))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
