"""How much attention do the peers fuse? ONNX Runtime's transformers optimizer and onnxscript's
ORT fusions, on the 32 zoo exports (8 families x dynamo/TorchScript x eager/SDPA).

For each case and peer: attention sites fused (fused attention ops / Softmax nodes of the
input), whether the peer crashed, whether its output is a valid model (onnx.checker and an
ORT session), and whether it still computes the original's output on a padded batch.

    python -m benchmarks.peers_coverage --out peers_coverage.json   (from the repository root)
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

from attnfuse.models import peers, zoo

LENGTHS = [7, 4, 1]
TOLERANCE = 1e-4  # relative to the output's largest magnitude, as in tests/test_models.py


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return peers.ort_session(model).run(None, inputs)[0]


def relative_error(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray | None) -> float:
    if mask is not None:  # padded positions are not part of the result
        actual, expected = actual[mask.astype(bool)], expected[mask.astype(bool)]
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def measure(case: zoo.ZooCase, peer: str) -> dict:
    path = zoo.exported(case)
    original = onnx.load(path)
    inputs = {k: v.numpy() for k, v in zoo.example_inputs(case.family, len(LENGTHS), max(LENGTHS), lengths=LENGTHS).items()}
    record = {"case": case.id, "peer": peer, "sites": peers.count_attention(original)[1]}
    optimized, crash = peers.peer_fuse(path, peer)
    record.update(crash=crash, fused=None, invalid=None, error=None, equal=None)
    if optimized is None:
        return record
    record["fused"] = peers.count_attention(optimized)[0]
    record["invalid"] = peers.validity_error(optimized)
    if record["invalid"] is None:
        try:
            error = relative_error(run(optimized, inputs), run(original, inputs), inputs.get("attention_mask"))
            record.update(error=error, equal=error <= TOLERANCE)
        except Exception as failure:  # a model that loads but fails to run is invalid too
            record["invalid"] = "run: " + peers.describe_error(failure)
    return record


def cell(record: dict) -> str:
    if record["crash"]:
        return "crash"
    if record["invalid"]:
        return f"{record['fused']}/{record['sites']} invalid"
    return f"{record['fused']}/{record['sites']}" + ("" if record["equal"] else f" WRONG {record['error']:.0e}")


def table(records: list[dict], peer_names: list[str]) -> str:
    by_case: dict[str, dict[str, dict]] = {}
    for record in records:
        by_case.setdefault(record["case"], {})[record["peer"]] = record
    header = ["case", *peer_names]
    rows = [[case, *(cell(found[peer]) for peer in peer_names)] for case, found in by_case.items()]
    rows.append(["fused, valid and equal", *(
        f"{sum(r['fused'] for r in records if r['peer'] == peer and r['equal'])}"
        f"/{sum(r['sites'] for r in records if r['peer'] == peer)}" for peer in peer_names)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(text.ljust(width) for text, width in zip(row, widths)) + " |"
    rule = "| " + " | ".join("-" * width for width in widths) + " |"
    return "\n".join([line(header), rule, *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the records as JSON here")
    parser.add_argument("--peers", nargs="+", default=list(peers.PEERS), choices=peers.PEERS)
    parser.add_argument("--cases", nargs="+", help="case id prefixes, e.g. bert gpt2-dynamo (default: all 32)")
    args = parser.parse_args(argv)
    ort.set_default_logger_severity(3)  # ORT's optimizer opens sessions of its own, which warn about shape merges
    cases = [c for c in zoo.ZOO if not args.cases or any(c.id.startswith(prefix) for prefix in args.cases)]
    records = []
    for case in cases:
        for peer in args.peers:
            records.append(measure(case, peer))
            print(f"{case.id:28s} {peer:10s} {cell(records[-1])}", file=sys.stderr, flush=True)
    print(table(records, args.peers))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(records, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
