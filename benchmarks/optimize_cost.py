"""What optimizing one file costs: ONNX Runtime sessions created, wall and CPU seconds.

    python benchmarks/optimize_cost.py FILE.onnx
    PYTHONPATH=/path/to/another/checkout python benchmarks/optimize_cost.py FILE.onnx   (its code instead)

Proof by evaluation runs regions of the graph in ONNX Runtime: the session count is what it costs.
"""
from __future__ import annotations

import sys
import time

import onnxruntime as ort


class _Counted(ort.InferenceSession):
    made = 0

    def __init__(self, *args, **kwargs):
        _Counted.made += 1
        super().__init__(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    (path,) = argv if argv is not None else sys.argv[1:]
    ort.InferenceSession = _Counted  # before attnfuse reads it
    import attnfuse

    wall, cpu = time.perf_counter(), time.process_time()
    report = attnfuse.optimize_onnx(path).report
    print(f"{attnfuse.__file__}: {_Counted.made} sessions, {time.perf_counter() - wall:.2f} s wall, "
          f"{time.process_time() - cpu:.2f} s CPU; attention {report.attention_fused}/{report.attention_total}, "
          f"verified {report.verify.ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
