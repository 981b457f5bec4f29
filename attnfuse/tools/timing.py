"""Timing for benchmarks and the demo: interleaved runs, medians, ratios."""
from __future__ import annotations

import statistics
import time
from typing import Callable

from tqdm import tqdm


def ort_session(model, threads: int | None = None):
    """A CPU session for timing: `model` is a path, serialized bytes or a ModelProto.

    ONNX Runtime's workers spin for a while after a run ends; interleaved with other contenders
    on a few cores, that spinning is charged to whoever runs next. They still spin during a run,
    as ONNX Runtime does by default, but stop when it returns."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # peers' outputs make ORT warn about every shape it re-merges
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def interleaved_medians(runners: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                        desc: str = "timing") -> dict[str, float]:
    """Median seconds of each runner. Runs go round-robin so that the machine's drift
    (other load, clocks) falls on every contender alike, and each round starts one contender
    later: a contender's place in the round (what ran just before it) moved its time by a few
    percent here."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with tqdm(total=repeats * len(runners), desc=desc, leave=False, disable=None) as bar:
        for round_ in range(repeats):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                runners[name]()
                samples[name].append(time.perf_counter() - start)
                bar.update()
    return {name: statistics.median(times) for name, times in samples.items()}


def table(header: list[str], rows: list[list[object]]) -> str:
    cells = [header, *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
