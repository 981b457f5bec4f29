"""The zoo exported by torch.onnx at opset 23, where it writes ONNX's own Attention, RMSNormalization and
RotaryEmbedding: every encoder family and every decoder family with a KV cache (dynamo, SDPA), each
optimized and verified. Prints, per model, the opset-23 ops it came with, the attention sites fused, the
fused ops written and the verification.

    python -m benchmarks.opset23_coverage [--folder DIR]   (from the repository root; ~2 minutes)
"""
from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import onnx

import attnfuse
from attnfuse.models import zoo
from attnfuse.models.decoders import cases

OPSET = 23
OPSET_23_OPS = ("Attention", "RMSNormalization", "RotaryEmbedding")


def models() -> dict[str, callable]:
    exports = {family: (lambda path, family=family: zoo.export(zoo.ZooCase(family, "dynamo", "sdpa"), path, OPSET))
               for family in zoo.FAMILIES}
    exports.update({case.id: (lambda path, case=case: cases.export(case, path, OPSET)) for case in cases.CASES
                    if case.id.endswith("dynamo-sdpa-past") and not case.unavailable})
    return exports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="keep the exports here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.folder or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        all_fused = 0
        exports = models()
        for name, export in exports.items():
            path = folder / f"{name}-opset{OPSET}.onnx"
            if not path.exists():
                export(path)
            came_with = collections.Counter(n.op_type for n in onnx.load(path).graph.node if n.op_type in OPSET_23_OPS)
            report = attnfuse.optimize_onnx(str(path)).report
            all_fused += report.attention_fused == report.attention_total
            print(f"{name}: came with {dict(came_with)}; attention {report.attention_fused}/{report.attention_total}; "
                  f"fused ops {dict(report.fused_ops)}; verify {'ok' if report.verify.ok else 'FAILED'} "
                  f"(max rel error {report.verify.max_rel_error:.2g})", flush=True)
        print(f"{all_fused} of {len(exports)} models with every attention site fused")


if __name__ == "__main__":
    main()
