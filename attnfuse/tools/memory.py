"""Peak memory of a contender: the resident high-water mark of a fresh process that loads the
model and runs a workload once (shared by `attnfuse bench` and benchmarks/sparse_attention.py)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across fork and
# exec, so it would report the benchmark's own peak.
_PRINT_PEAK = "print(int([l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]) / 1024)\n"


def peak_memory_mb(code: str) -> float:
    """MB of resident memory at the peak of a fresh Python process that runs `code`."""
    out = subprocess.run([sys.executable, "-c", code + "\n" + _PRINT_PEAK], capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"peak memory process failed: {last}")
    return float(out.stdout.strip().splitlines()[-1])


def ort_peak_memory_mb(model_file: str | os.PathLike, feeds: dict[str, np.ndarray], threads: int) -> float:
    """Peak of a process that imports only numpy and onnxruntime, loads `model_file` into a CPU
    session of `threads` intra-op threads and runs it once on `feeds`."""
    with feeds_file(feeds) as path:
        return peak_memory_mb(
            "import numpy as np, onnxruntime as ort\n"
            f"o = ort.SessionOptions(); o.intra_op_num_threads = {threads}\n"
            f"s = ort.InferenceSession({str(model_file)!r}, o, providers=['CPUExecutionProvider'])\n"
            f"feeds = dict(np.load({str(path)!r}))\n"
            "s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})\n")


@contextlib.contextmanager
def feeds_file(feeds: dict[str, np.ndarray]) -> Iterator[Path]:
    """`feeds` saved to a temporary .npz for a child process to read, removed after."""
    fd, name = tempfile.mkstemp(prefix="attnfuse-feeds-", suffix=".npz")
    os.close(fd)
    try:
        np.savez(name, **feeds)
        yield Path(name)
    finally:
        os.unlink(name)
